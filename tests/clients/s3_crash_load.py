"""Load for the S3 crash test: multipart uploads and single PUTs from threads, and an
`aws s3 sync` of a tree (when the AWS CLI is here), against the daemon until it is killed.
Every step the daemon acknowledged is appended to JOURNAL (and synced) before the next one
starts, so the check after the restart knows what must be there:
  upload ID KEY        an upload was created
  part ID N ETAG       part N of it was acknowledged
  completing ID KEY    its completion was sent
  object KEY MD5       the object was acknowledged (PUT or completion)
The sync's own output (`upload: LOCAL to s3://...` per acknowledged file) goes to
JOURNAL.sync. Exits when the daemon stops answering."""

import hashlib
import os
import subprocess
import sys
import threading

import boto3
from botocore.config import Config

endpoint, journal_path, tree = os.environ["ENDPOINT"], os.environ["JOURNAL"], os.environ["TREE"]
lock = threading.Lock()
# Keys of this run differ from those of earlier runs into the same journal.
run_id = os.urandom(4).hex()
journal = open(journal_path, "a")


def note(line):
    with lock:
        journal.write(line + "\n")
        journal.flush()
        os.fsync(journal.fileno())


def client():
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=os.environ["ACCESS_KEY"],
                        aws_secret_access_key=os.environ["SECRET_KEY"], region_name="us-east-1",
                        config=Config(retries={"max_attempts": 0, "mode": "standard"}, connect_timeout=5,
                                      read_timeout=20))


def multipart(worker):
    s3 = client()
    i = 0
    while True:
        key = f"mp/{run_id}/{worker}/{i}"
        i += 1
        uid = s3.create_multipart_upload(Bucket="crash", Key=key)["UploadId"]
        note(f"upload {uid} {key}")
        parts, whole = [], hashlib.md5()
        for n in range(1, 4):
            body = os.urandom((1 << 20) + 4096 * n)
            etag = s3.upload_part(Bucket="crash", Key=key, UploadId=uid, PartNumber=n, Body=body)["ETag"]
            note(f"part {uid} {n} {etag.strip(chr(34))}")
            parts.append({"PartNumber": n, "ETag": etag})
            whole.update(body)
        note(f"completing {uid} {key}")
        s3.complete_multipart_upload(Bucket="crash", Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
        note(f"object {key} {whole.hexdigest()}")


def single(worker):
    s3 = client()
    i = 0
    while True:
        key = f"put/{run_id}/{worker}/{i}"
        i += 1
        body = os.urandom(int.from_bytes(os.urandom(3), "big") % (3 << 20))
        s3.put_object(Bucket="crash", Key=key, Body=body)
        note(f"object {key} {hashlib.md5(body).hexdigest()}")


def run(job, worker):
    try:
        job(worker)
    except Exception as e:  # the daemon was killed
        print(f"{job.__name__} {worker} stopped: {type(e).__name__}", flush=True)


try:
    client().create_bucket(Bucket="crash")
except Exception as e:  # made by an earlier round
    print(f"create bucket: {type(e).__name__}", flush=True)
threads = [threading.Thread(target=run, args=(job, w)) for job in (multipart, single) for w in range(2)]
for t in threads:
    t.start()
sync = None
if subprocess.run(["aws", "--version"], capture_output=True).returncode == 0:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ["ACCESS_KEY"], AWS_SECRET_ACCESS_KEY=os.environ["SECRET_KEY"],
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_MAX_ATTEMPTS="1")
    with open(journal_path + ".sync", "w") as out:
        sync = subprocess.run(["aws", "--endpoint-url", endpoint, "s3", "sync", tree, "s3://crash/tree"], env=env,
                              stdout=out, stderr=subprocess.DEVNULL)
for t in threads:
    t.join()
print("load stopped", flush=True)
