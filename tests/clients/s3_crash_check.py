"""The check after the S3 crash test's restart (see s3_crash_load.py): every acknowledged
object reads back exact; every upload is resumable (ListParts lists each acknowledged part
with its ETag) unless its completion was sent and its object is there; one resumable upload
is completed; every file the sync reported uploaded reads back as the local file."""

import hashlib
import os
import sys

import boto3
from botocore.config import Config
import botocore

endpoint, journal_path, tree = os.environ["ENDPOINT"], os.environ["JOURNAL"], os.environ["TREE"]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=os.environ["ACCESS_KEY"],
                  aws_secret_access_key=os.environ["SECRET_KEY"], region_name="us-east-1",
                  config=Config(retries={"max_attempts": 2}))


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def md5_of_object(key):
    h = hashlib.md5()
    for chunk in s3.get_object(Bucket="crash", Key=key)["Body"].iter_chunks(1 << 20):
        h.update(chunk)
    return h.hexdigest()


uploads, parts, completing, objects = {}, {}, set(), {}
for line in open(journal_path):
    f = line.split()
    if not f:
        continue
    if f[0] == "upload":
        uploads[f[1]] = f[2]
    elif f[0] == "part":
        parts.setdefault(f[1], {})[int(f[2])] = f[3]
    elif f[0] == "completing":
        completing.add(f[1])
    elif f[0] == "object":
        objects[f[1]] = f[2]

for key, md5 in objects.items():
    check(md5_of_object(key) == md5, f"acknowledged object {key} reads back wrong")

resumable = []
for uid, key in uploads.items():
    try:
        listed = s3.list_parts(Bucket="crash", Key=key, UploadId=uid).get("Parts", [])
    except botocore.exceptions.ClientError as e:
        code = e.response["Error"]["Code"]
        check(code == "NoSuchUpload", f"list parts of {uid}: {code}")
        # Gone: only a completion may have taken it, and then the object is there.
        check(uid in completing, f"upload {uid} of {key} lost without a completion")
        s3.head_object(Bucket="crash", Key=key)
        continue
    have = {p["PartNumber"]: p["ETag"].strip('"') for p in listed}
    for n, etag in parts.get(uid, {}).items():
        check(have.get(n) == etag, f"upload {uid}: acknowledged part {n} is {have.get(n)}, not {etag}")
    if key not in objects and listed:
        resumable.append((uid, key, listed))

# A resumable upload completes, and its ETag is the one of the parts listed.
for uid, key, listed in resumable[:1]:
    with open(journal_path, "a") as j:
        j.write(f"completing {uid} {key}\n")
    r = s3.complete_multipart_upload(Bucket="crash", Key=key, UploadId=uid, MultipartUpload={
        "Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in listed]})
    md5s = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in listed)
    check(r["ETag"].strip('"') == f"{hashlib.md5(md5s).hexdigest()}-{len(listed)}", "completion after restart")

synced = 0
if os.path.exists(journal_path + ".sync"):
    for line in open(journal_path + ".sync", errors="replace"):
        # "upload: LOCAL to s3://crash/tree/REL", among progress lines separated by \r.
        for piece in line.split("\r"):
            if piece.startswith("upload: ") and " to s3://crash/" in piece:
                local, remote = piece[len("upload: "):].strip().rsplit(" to s3://crash/", 1)
                with open(local, "rb") as f:
                    want = hashlib.md5(f.read()).hexdigest()
                check(md5_of_object(remote) == want, f"synced {remote} reads back wrong")
                synced += 1
print(f"ok: {len(objects)} objects, {len(uploads)} uploads ({len(resumable)} resumable), {synced} synced files")
