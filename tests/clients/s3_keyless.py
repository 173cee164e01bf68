"""A client with keys of its own against an endpoint without keys: its signatures are
ignored, so every request works as an anonymous one (headers and presigned URLs). Run by
the test suite with ENDPOINT set."""

import os
import urllib.request

import boto3
from botocore.config import Config

s3 = boto3.client("s3", endpoint_url=os.environ["ENDPOINT"], aws_access_key_id="any",
                  aws_secret_access_key="thing", region_name="us-east-1", config=Config(retries={"max_attempts": 0}))
s3.create_bucket(Bucket="open")
body = os.urandom(200000)
s3.put_object(Bucket="open", Key="a/b", Body=body)
assert s3.get_object(Bucket="open", Key="a/b")["Body"].read() == body
assert [o["Key"] for o in s3.list_objects_v2(Bucket="open")["Contents"]] == ["a/b"]
url = s3.generate_presigned_url("get_object", Params={"Bucket": "open", "Key": "a/b"}, ExpiresIn=60)
with urllib.request.urlopen(url) as f:
    assert f.read() == body
print("ok")
