"""Steps of the S3 endpoint's upload-lifetime test, one per run (MODE = the first argument):
  begin          creates bucket "keep" and an upload of key "k" with one part; prints its id
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
