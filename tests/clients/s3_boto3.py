"""Drives the daemon's S3 endpoint with boto3 at its default settings (checksums on,
aws-chunked uploads with trailers) and checks every answer. Run by the test suite
(`s3_gateway.rs`) with ENDPOINT, ACCESS_KEY, SECRET_KEY and FILES_URL (the file API) set;
exits non-zero with the first failure."""

import hashlib
import os
import sys
import urllib.parse
import urllib.request
import http.client

import boto3
import botocore
from botocore.config import Config

endpoint = os.environ["ENDPOINT"]
files_url = os.environ["FILES_URL"]


def client(secret=None, **config):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ["ACCESS_KEY"],
        aws_secret_access_key=secret or os.environ["SECRET_KEY"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, **config),
    )


s3 = client()


def error_code(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError(f"{fn.__name__} succeeded")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# Buckets.
s3.create_bucket(Bucket="alpha")
s3.create_bucket(Bucket="beta")
check(error_code(s3.create_bucket, Bucket="alpha")[0] == "BucketAlreadyOwnedByYou", "create twice")
check(error_code(s3.create_bucket, Bucket="Bad_Name")[0] == "InvalidBucketName", "bad bucket name")
names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
check(names == ["alpha", "beta"], f"list buckets: {names}")
s3.head_bucket(Bucket="alpha")
check(error_code(s3.head_bucket, Bucket="nope")[1] == 404, "head missing bucket")
s3.get_bucket_location(Bucket="alpha")
check(error_code(s3.put_object, Bucket="nope", Key="k", Body=b"x")[0] == "NoSuchBucket", "put into missing bucket")

# Objects of many sizes: ETag is the MD5, bytes exact, metadata and type kept.
sizes = [0, 1, 1000, 65536, 1 << 20, 3 * (1 << 20) + 17]
for i, n in enumerate(sizes):
    data = os.urandom(n)
    key = f"dir/obj-{i}"
    r = s3.put_object(Bucket="alpha", Key=key, Body=data, ContentType="application/x-test",
                      Metadata={"index": str(i)})
    md5 = hashlib.md5(data).hexdigest()
    check(r["ETag"] == f'"{md5}"', f"put etag {r['ETag']} != {md5}")
    g = s3.get_object(Bucket="alpha", Key=key)
    check(g["Body"].read() == data, f"get {key}")
    check(g["ETag"] == f'"{md5}"', "get etag")
    check(g["ContentType"] == "application/x-test", f"type {g['ContentType']}")
    check(g["Metadata"] == {"index": str(i)}, f"metadata {g['Metadata']}")
    check(g["ContentLength"] == n, "length")
    h = s3.head_object(Bucket="alpha", Key=key)
    check(h["ContentLength"] == n and h["ETag"] == f'"{md5}"', "head")
    # The same file through the file API.
    with urllib.request.urlopen(f"{files_url}/v1/files/alpha/{key}") as f:
        check(f.read() == data, "file API read")

# Ranges and conditions.
data = bytes(range(256)) * 100
etag = s3.put_object(Bucket="alpha", Key="r", Body=data)["ETag"]
g = s3.get_object(Bucket="alpha", Key="r", Range="bytes=100-199")
check(g["Body"].read() == data[100:200] and g["ContentRange"] == f"bytes 100-199/{len(data)}", "range")
g = s3.get_object(Bucket="alpha", Key="r", Range="bytes=-10")
check(g["Body"].read() == data[-10:], "suffix range")
check(error_code(s3.get_object, Bucket="alpha", Key="r", Range="bytes=999999-")[0] == "InvalidRange", "bad range")
check(error_code(s3.get_object, Bucket="alpha", Key="r", IfMatch='"0000"')[1] == 412, "If-Match")
check(error_code(s3.get_object, Bucket="alpha", Key="r", IfNoneMatch=etag)[1] == 304, "If-None-Match")
s3.get_object(Bucket="alpha", Key="r", IfMatch=etag)
check(error_code(s3.put_object, Bucket="alpha", Key="r", Body=b"z", IfNoneMatch="*")[1] == 412, "conditional create")
s3.put_object(Bucket="alpha", Key="new-only", Body=b"z", IfNoneMatch="*")
check(error_code(s3.get_object, Bucket="alpha", Key="missing")[0] == "NoSuchKey", "missing key")

# A bad digest changes nothing: the old object stays.
before = s3.get_object(Bucket="alpha", Key="r")["Body"].read()
code = error_code(s3.put_object, Bucket="alpha", Key="r", Body=b"other bytes",
                  ContentMD5="AAAAAAAAAAAAAAAAAAAAAA==")[0]
check(code in ("BadDigest", "InvalidDigest"), f"bad md5: {code}")
code = error_code(s3.put_object, Bucket="alpha", Key="r", Body=b"other bytes",
                  ChecksumSHA256="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")[0]
check(code == "BadDigest", f"bad sha256: {code}")
check(s3.get_object(Bucket="alpha", Key="r")["Body"].read() == before, "old object kept")

# Listings: prefixes, delimiters, pages, start-after, v1 markers.
for k in ["l/a", "l/b/1", "l/b/2", "l/c", "l/d/1", "l/é"]:
    s3.put_object(Bucket="beta", Key=k, Body=k.encode())
r = s3.list_objects_v2(Bucket="beta", Prefix="l/", Delimiter="/")
check([o["Key"] for o in r["Contents"]] == ["l/a", "l/c", "l/é"], f"v2 keys {r.get('Contents')}")
check([p["Prefix"] for p in r["CommonPrefixes"]] == ["l/b/", "l/d/"], "v2 prefixes")
keys, token = [], None
while True:
    kw = {"ContinuationToken": token} if token else {}
    r = s3.list_objects_v2(Bucket="beta", MaxKeys=2, **kw)
    keys += [o["Key"] for o in r.get("Contents", [])]
    if not r["IsTruncated"]:
        break
    token = r["NextContinuationToken"]
check(keys == ["l/a", "l/b/1", "l/b/2", "l/c", "l/d/1", "l/é"], f"pages {keys}")
r = s3.list_objects_v2(Bucket="beta", StartAfter="l/b/2")
check([o["Key"] for o in r["Contents"]] == ["l/c", "l/d/1", "l/é"], "start-after")
pages = s3.get_paginator("list_objects").paginate(Bucket="beta", PaginationConfig={"PageSize": 2})
v1 = [o["Key"] for p in pages for o in p.get("Contents", [])]
check(v1 == keys, f"v1 pages {v1}")

# Copy, delete, delete many, delete bucket.
r = s3.copy_object(Bucket="beta", Key="copy", CopySource={"Bucket": "alpha", "Key": "r"})
check(r["CopyObjectResult"]["ETag"] == etag, "copy etag")
check(s3.get_object(Bucket="beta", Key="copy")["Body"].read() == before, "copy bytes")
s3.delete_object(Bucket="beta", Key="copy")
s3.delete_object(Bucket="beta", Key="never-there")
check(error_code(s3.delete_bucket, Bucket="beta")[0] == "BucketNotEmpty", "delete non-empty bucket")
r = s3.delete_objects(Bucket="beta", Delete={"Objects": [{"Key": k} for k in keys]})
check(sorted(d["Key"] for d in r["Deleted"]) == sorted(keys), "delete objects")
s3.delete_bucket(Bucket="beta")
check([b["Name"] for b in s3.list_buckets()["Buckets"]] == ["alpha"], "bucket gone")

# aws-chunked bodies with checksum trailers: boto3 sends them over TLS only, so it is told
# this endpoint is https:// for a moment. The framing must be decoded (never stored), the
# trailer checked, and a wrong trailer must leave the old object.
import botocore.httpchecksum as hc
real_urlparse = hc.urlparse
sent = []
s3.meta.events.register("before-send.s3.PutObject",
                        lambda request, **kw: sent.append(request.headers.get("x-amz-content-sha256")))
hc.urlparse = lambda url, *a, **kw: real_urlparse(url.replace("http://", "https://", 1), *a, **kw)
try:
    chunked = os.urandom(300001)
    s3.put_object(Bucket="alpha", Key="trailer", Body=chunked)
    check(sent[-1] == b"STREAMING-UNSIGNED-PAYLOAD-TRAILER", f"boto3 sent {sent[-1]!r}, not aws-chunked")
    check(s3.get_object(Bucket="alpha", Key="trailer")["Body"].read() == chunked, "aws-chunked bytes")
    real_b64digest = hc.BaseChecksum.b64digest
    hc.BaseChecksum.b64digest = lambda self: "AAAAAA=="
    try:
        code = error_code(s3.put_object, Bucket="alpha", Key="trailer", Body=os.urandom(1000))[0]
    finally:
        hc.BaseChecksum.b64digest = real_b64digest
    check(code == "BadDigest", f"wrong trailer: {code}")
    check(s3.get_object(Bucket="alpha", Key="trailer")["Body"].read() == chunked, "old object kept")
finally:
    hc.urlparse = real_urlparse

# An empty object sent with Expect: 100-continue (as botocore sends every PUT) must not
# leave its connection unable to carry the next upload (it waited for the idle timeout).
quick = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=os.environ["ACCESS_KEY"],
                     aws_secret_access_key=os.environ["SECRET_KEY"], region_name="us-east-1",
                     config=Config(read_timeout=5, retries={"max_attempts": 0, "mode": "standard"}))
for body in (b"", os.urandom(1 << 20), b"", os.urandom(1 << 20)):
    quick.put_object(Bucket="alpha", Key="expect", Body=body)
check(quick.get_object(Bucket="alpha", Key="expect")["Body"].read() == body, "empty then full PUTs")

# Multipart uploads: parts of 2 MiB (not a block's multiple of anything but the default
# block size), a replaced part, a part copied from a range of another object.
MiB = 1 << 20
p1, p2, p2b = os.urandom(2 * MiB), os.urandom(2 * MiB), os.urandom(2 * MiB)
up = s3.create_multipart_upload(Bucket="alpha", Key="mp/big", ContentType="application/x-test",
                                Metadata={"origin": "multipart"})
uid = up["UploadId"]
e1 = s3.upload_part(Bucket="alpha", Key="mp/big", UploadId=uid, PartNumber=1, Body=p1)["ETag"]
check(e1 == '"%s"' % hashlib.md5(p1).hexdigest(), f"part etag {e1}")
s3.upload_part(Bucket="alpha", Key="mp/big", UploadId=uid, PartNumber=2, Body=p2)
e2 = s3.upload_part(Bucket="alpha", Key="mp/big", UploadId=uid, PartNumber=2, Body=p2b)["ETag"]
r = s3.upload_part_copy(Bucket="alpha", Key="mp/big", UploadId=uid, PartNumber=3,
                        CopySource={"Bucket": "alpha", "Key": "r"}, CopySourceRange="bytes=0-99")
e3 = r["CopyPartResult"]["ETag"]
check(e3 == '"%s"' % hashlib.md5(before[:100]).hexdigest(), f"part copy etag {e3}")
parts = s3.list_parts(Bucket="alpha", Key="mp/big", UploadId=uid)["Parts"]
check([(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [(1, 2 * MiB, e1), (2, 2 * MiB, e2), (3, 100, e3)],
      f"list parts {parts}")
page = s3.list_parts(Bucket="alpha", Key="mp/big", UploadId=uid, MaxParts=2)
check(page["IsTruncated"] and page["NextPartNumberMarker"] == 2, f"parts page {page}")
ups = s3.list_multipart_uploads(Bucket="alpha")["Uploads"]
check([(u["Key"], u["UploadId"]) for u in ups] == [("mp/big", uid)], f"list uploads {ups}")
check(error_code(s3.get_object, Bucket="alpha", Key="mp/big")[0] == "NoSuchKey", "no object before completion")
check(error_code(s3.complete_multipart_upload, Bucket="alpha", Key="mp/big", UploadId=uid,
                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e2}]})[0] == "InvalidPart", "wrong part etag")
check(error_code(s3.complete_multipart_upload, Bucket="alpha", Key="mp/big", UploadId=uid,
                 MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]})[0]
      == "InvalidPartOrder", "parts out of order")
check(error_code(s3.complete_multipart_upload, Bucket="alpha", Key="mp/big", UploadId=uid,
                 MultipartUpload={"Parts": [{"PartNumber": 4, "ETag": e1}]})[0] == "InvalidPart", "missing part")
r = s3.complete_multipart_upload(Bucket="alpha", Key="mp/big", UploadId=uid, MultipartUpload={
    "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}, {"PartNumber": 3, "ETag": e3}]})
md5s = b"".join(hashlib.md5(x).digest() for x in (p1, p2b, before[:100]))
want = '"%s-3"' % hashlib.md5(md5s).hexdigest()
check(r["ETag"] == want, f"multipart etag {r['ETag']} != {want}")
whole = p1 + p2b + before[:100]
g = s3.get_object(Bucket="alpha", Key="mp/big")
check(g["Body"].read() == whole and g["ETag"] == want, "multipart object bytes")
check(g["ContentType"] == "application/x-test" and g["Metadata"] == {"origin": "multipart"}, f"multipart meta {g}")
h = s3.head_object(Bucket="alpha", Key="mp/big")
check(h["ETag"] == want and h["ContentLength"] == len(whole), "multipart head right after completion")
g = s3.get_object(Bucket="alpha", Key="mp/big", PartNumber=2)
check(g["Body"].read() == p2b and g["PartsCount"] == 3, "get part 2")
check(error_code(s3.get_object, Bucket="alpha", Key="mp/big", PartNumber=4)[0] == "InvalidPartNumber", "part 4")
h = s3.head_object(Bucket="alpha", Key="mp/big", PartNumber=2)
check(h["ResponseMetadata"]["HTTPStatusCode"] == 206 and h["ContentLength"] == len(p2b) and h["PartsCount"] == 3,
      f"head part 2: {h['ResponseMetadata']['HTTPStatusCode']} {h.get('ContentLength')}")
with urllib.request.urlopen(f"{files_url}/v1/files/alpha/mp/big") as f:
    check(f.read() == whole, "multipart object through the file API")
check(s3.list_multipart_uploads(Bucket="alpha").get("Uploads", []) == [], "upload gone after completion")
check(error_code(s3.list_parts, Bucket="alpha", Key="mp/big", UploadId=uid)[0] == "NoSuchUpload", "parts gone")
check(error_code(s3.upload_part, Bucket="alpha", Key="mp/big", UploadId=uid, PartNumber=1, Body=b"x")[0]
      == "NoSuchUpload", "part of a completed upload")
# Aborted: its parts go.
uid = s3.create_multipart_upload(Bucket="alpha", Key="mp/aborted")["UploadId"]
s3.upload_part(Bucket="alpha", Key="mp/aborted", UploadId=uid, PartNumber=1, Body=b"abc" * 1000)
s3.abort_multipart_upload(Bucket="alpha", Key="mp/aborted", UploadId=uid)
check(error_code(s3.list_parts, Bucket="alpha", Key="mp/aborted", UploadId=uid)[0] == "NoSuchUpload", "aborted")
with urllib.request.urlopen(f"{files_url}/v1/files?prefix=.s3-parts/") as f:
    listing = f.read().decode()
check(uid not in listing, f"aborted parts left: {listing}")
check(error_code(s3.abort_multipart_upload, Bucket="alpha", Key="mp/aborted", UploadId=uid)[0] == "NoSuchUpload",
      "abort twice")
check(error_code(s3.upload_part, Bucket="alpha", Key="k", UploadId="../../etc", PartNumber=1, Body=b"x")[0]
      == "NoSuchUpload", "bogus upload id")
# Listing uploads with a delimiter, one per page: a common prefix is listed once.
s3.create_bucket(Bucket="uploads")
for k in ("a/x", "a/y", "b"):
    s3.create_multipart_upload(Bucket="uploads", Key=k)
seen, marker = [], {}
for _ in range(10):
    page = s3.list_multipart_uploads(Bucket="uploads", Delimiter="/", MaxUploads=1, **marker)
    seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])] + [u["Key"] for u in page.get("Uploads", [])]
    if not page["IsTruncated"]:
        break
    marker = {"KeyMarker": page["NextKeyMarker"]}
    if page.get("NextUploadIdMarker"):
        marker["UploadIdMarker"] = page["NextUploadIdMarker"]
check(seen == ["a/", "b"], f"uploads by pages: {seen}")
# Deleting the bucket aborts its uploads: made again, it has none.
s3.delete_bucket(Bucket="uploads")
s3.create_bucket(Bucket="uploads")
check(s3.list_multipart_uploads(Bucket="uploads").get("Uploads", []) == [], "uploads of a deleted bucket")
s3.delete_bucket(Bucket="uploads")

# A bigger upload through boto3's transfer manager: parallel parts of 5 MiB.
from boto3.s3.transfer import TransferConfig
big = os.urandom(23 * MiB)
import io
s3.upload_fileobj(io.BytesIO(big), "alpha", "mp/managed",
                  Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4))
out = io.BytesIO()
s3.download_fileobj("alpha", "mp/managed", out,
                    Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4))
check(out.getvalue() == big, "transfer manager round trip")
check(s3.head_object(Bucket="alpha", Key="mp/managed")["ETag"].endswith('-5"'), "managed upload etag")

# Presigned URLs.
url = s3.generate_presigned_url("get_object", Params={"Bucket": "alpha", "Key": "r"}, ExpiresIn=60)
with urllib.request.urlopen(url) as f:
    check(f.read() == before, "presigned get")
for version in ("s3v4", "s3"):
    signer = client(signature_version=version)
    url = signer.generate_presigned_url("put_object", Params={"Bucket": "alpha", "Key": "presigned"},
                                        ExpiresIn=60)
    # http.client sends no Content-Type, which SigV2 signs.
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc)
    conn.request("PUT", f"{parts.path}?{parts.query}", body=b"via presigned put")
    answer = conn.getresponse()
    check(answer.status == 200, f"presigned put ({version}): {answer.status} {answer.read()}")
    conn.close()
check(s3.get_object(Bucket="alpha", Key="presigned")["Body"].read() == b"via presigned put", "presigned put bytes")

# Wrong keys and unsigned requests are refused.
code = error_code(client(secret="wrong-secret").list_buckets)[0]
check(code == "SignatureDoesNotMatch", f"wrong secret: {code}")
anonymous = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         config=Config(signature_version=botocore.UNSIGNED))
code = error_code(anonymous.list_buckets)[0]
check(code == "AccessDenied", f"unsigned: {code}")

# Every operation is counted per operation in /metrics.
with urllib.request.urlopen(f"{files_url}/metrics") as f:
    metrics = f.read().decode()
for op in ("PutObject", "CompleteMultipartUpload", "UploadPart", "ListParts"):
    check(f'blockcache_s3_requests_total{{operation="{op}",code="OK"}}' in metrics
          or f'blockcache_s3_requests_total{{code="OK",operation="{op}"}}' in metrics, f"metrics of {op}")
check('code="NoSuchUpload"' in metrics, "errors counted by code")

print("ok")
