"""Drives the daemon's S3 endpoint with the AWS CLI at its default settings: a multipart
`aws s3 cp` of over 100 MiB (parts uploaded in parallel), `ls`, `aws s3 sync` both ways (with
changes and --delete), a presigned GET, and a wrong key. Run by the test suite
(`s3_gateway.rs`) with ENDPOINT, ACCESS_KEY, SECRET_KEY and FILES_URL set; exits non-zero
with the first failure."""

import atexit
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request

from tree_compare import same_trees

endpoint = os.environ["ENDPOINT"]
files_url = os.environ["FILES_URL"]
env = dict(os.environ)
env.update({
    "AWS_ACCESS_KEY_ID": os.environ["ACCESS_KEY"],
    "AWS_SECRET_ACCESS_KEY": os.environ["SECRET_KEY"],
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
})


def aws(*args, secret=None, ok=True):
    e = dict(env)
    if secret:
        e["AWS_SECRET_ACCESS_KEY"] = secret
    p = subprocess.run(["aws", "--endpoint-url", endpoint, *args], env=e, capture_output=True, text=True,
                       timeout=600)
    if ok and p.returncode != 0:
        raise AssertionError(f"aws {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


work = tempfile.mkdtemp()
# Hundreds of MiB: removed however the script ends.
atexit.register(shutil.rmtree, work, True)
aws("s3", "mb", "s3://cli")

# Over 100 MiB: the CLI cuts 8 MiB parts and sends up to 10 at once.
big = os.path.join(work, "big")
with open(big, "wb") as f:
    for _ in range(105):
        f.write(os.urandom(1 << 20))
    f.write(os.urandom(12345))
aws("s3", "cp", big, "s3://cli/dir/big")
listing = aws("s3", "ls", "s3://cli/dir/").stdout
check("big" in listing and str(os.path.getsize(big)) in listing, f"ls: {listing}")
head = aws("s3api", "head-object", "--bucket", "cli", "--key", "dir/big").stdout
check('-14\\"' in head, f"a multipart ETag of 14 parts: {head}")
back = os.path.join(work, "back")
aws("s3", "cp", "s3://cli/dir/big", back)
check(md5_of(back) == md5_of(big), "cp round trip")
h = hashlib.md5()
with urllib.request.urlopen(f"{files_url}/v1/files/cli/dir/big") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
check(h.hexdigest() == md5_of(big), "the object read through the file API")

# A tree of a few hundred files, synced up, down, changed and synced again.
rng = random.Random(7)
tree = os.path.join(work, "tree")
for i in range(300):
    d = os.path.join(tree, f"d{i % 7}", f"e{i % 3}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}.bin"), "wb") as f:
        f.write(os.urandom(rng.choice([0, 1, 100, 4096, 70000, 1 << 20])))
aws("s3", "sync", tree, "s3://cli/tree")
down = os.path.join(work, "down")
aws("s3", "sync", "s3://cli/tree", down)
check(same_trees(tree, down), "sync down equals the tree")
os.remove(os.path.join(tree, "d0", "e0", "f0.bin"))
with open(os.path.join(tree, "d1", "e1", "f1.bin"), "wb") as f:
    f.write(b"changed, and of another size")
with open(os.path.join(tree, "new.bin"), "wb") as f:
    f.write(os.urandom(9 << 20))
aws("s3", "sync", "--delete", tree, "s3://cli/tree")
aws("s3", "sync", "--delete", "s3://cli/tree", down)
check(same_trees(tree, down), "sync --delete both ways")
count = len([l for l in aws("s3", "ls", "--recursive", "s3://cli/tree/").stdout.splitlines() if l.strip()])
check(count == 300, f"{count} objects after the sync, not 300")

# A presigned GET, and a wrong key.
url = aws("s3", "presign", "s3://cli/tree/new.bin", "--expires-in", "60").stdout.strip()
with urllib.request.urlopen(url) as f:
    check(hashlib.md5(f.read()).hexdigest() == md5_of(os.path.join(tree, "new.bin")), "presigned get")
p = aws("s3", "ls", "s3://cli/", secret="wrong", ok=False)
check(p.returncode != 0 and "SignatureDoesNotMatch" in p.stderr, f"wrong secret: {p.stderr}")
aws("s3", "rm", "--recursive", "s3://cli/")
aws("s3", "rb", "s3://cli")
print("ok")
