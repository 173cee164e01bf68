"""Steps of the S3 endpoint's upload-lifetime test, one per run (MODE = the first argument):
  begin          creates bucket "keep" and an upload of key "k" with one part; prints its id
  begin-more     another upload, of key "k2", with one part; prints its id
  forget ID      removes the upload's record alone (through the file API), leaving its parts
  present ID     the upload is listed with its part
  gone ID        the upload is gone (NoSuchUpload), and no file of it is left (file API)"""

import os
import sys
import urllib.request

import boto3
import botocore
from botocore.config import Config

s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"], aws_access_key_id=os.environ["ACCESS_KEY"],
                  aws_secret_access_key=os.environ["SECRET_KEY"], region_name="us-east-1",
                  config=Config(retries={"max_attempts": 1}))
mode = sys.argv[1]
if mode == "begin":
    s3.create_bucket(Bucket="keep")
    uid = s3.create_multipart_upload(Bucket="keep", Key="k")["UploadId"]
    s3.upload_part(Bucket="keep", Key="k", UploadId=uid, PartNumber=1, Body=os.urandom(3 << 20))
    print(uid)
elif mode == "begin-more":
    uid = s3.create_multipart_upload(Bucket="keep", Key="k2")["UploadId"]
    s3.upload_part(Bucket="keep", Key="k2", UploadId=uid, PartNumber=1, Body=os.urandom(1 << 20))
    print(uid)
elif mode == "forget":
    # The record alone goes, through the file API: the parts stay without it.
    req = urllib.request.Request(f"{os.environ['FILES_URL']}/v1/files/.s3-uploads/{sys.argv[2]}", method="DELETE")
    with urllib.request.urlopen(req) as f:
        assert f.status in (200, 204), f.status
    with urllib.request.urlopen(f"{os.environ['FILES_URL']}/v1/files?prefix=.s3-parts/{sys.argv[2]}/") as f:
        assert sys.argv[2] in f.read().decode()
    print("ok")
elif mode == "present":
    uid = sys.argv[2]
    parts = s3.list_parts(Bucket="keep", Key="k", UploadId=uid)["Parts"]
    assert [p["PartNumber"] for p in parts] == [1] and parts[0]["Size"] == 3 << 20, parts
    ups = s3.list_multipart_uploads(Bucket="keep")["Uploads"]
    assert [u["UploadId"] for u in ups] == [uid], ups
    print("ok")
elif mode == "gone":
    uid = sys.argv[2]
    try:
        s3.list_parts(Bucket="keep", Key="k", UploadId=uid)
        raise AssertionError("the upload is still there")
    except botocore.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] == "NoSuchUpload", e.response
    for prefix in (".s3-uploads/", ".s3-parts/"):
        with urllib.request.urlopen(f"{os.environ['FILES_URL']}/v1/files?prefix={prefix}") as f:
            listing = f.read().decode()
        assert uid not in listing, listing
    print("ok")
