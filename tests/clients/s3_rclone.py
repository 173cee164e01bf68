"""Drives the daemon's S3 endpoint with rclone (an S3 remote of provider Other): `rclone copy`,
`rclone check` (sizes and MD5s) and `rclone sync` of a tree of a few hundred files, with
multipart uploads for the larger ones, then a copy back compared byte for byte. Run by the
test suite (`s3_gateway.rs`) with ENDPOINT, ACCESS_KEY and SECRET_KEY set; exits non-zero
with the first failure."""

import atexit
import os
import random
import shutil
import subprocess
import tempfile

from tree_compare import same_trees

env = dict(os.environ)
# rclone's S3 client refuses a CA bundle given by environment (the endpoint is plain HTTP).
env.pop("AWS_CA_BUNDLE", None)
env.update({
    "RCLONE_CONFIG": "/dev/null",
    "RCLONE_CONFIG_BC_TYPE": "s3",
    "RCLONE_CONFIG_BC_PROVIDER": "Other",
    "RCLONE_CONFIG_BC_ENDPOINT": os.environ["ENDPOINT"],
    "RCLONE_CONFIG_BC_ACCESS_KEY_ID": os.environ["ACCESS_KEY"],
    "RCLONE_CONFIG_BC_SECRET_ACCESS_KEY": os.environ["SECRET_KEY"],
    "RCLONE_CONFIG_BC_REGION": "us-east-1",
    "RCLONE_CONFIG_BC_FORCE_PATH_STYLE": "true",
    # Files over 5 MiB go up in 5 MiB parts, 4 at once.
    "RCLONE_S3_UPLOAD_CUTOFF": "5M",
    "RCLONE_S3_CHUNK_SIZE": "5M",
    "RCLONE_S3_UPLOAD_CONCURRENCY": "4",
})


def rclone(*args, ok=True):
    p = subprocess.run(["rclone", *args], env=env, capture_output=True, text=True, timeout=600)
    if ok and p.returncode != 0:
        raise AssertionError(f"rclone {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def check(cond, what):
    if not cond:
        raise AssertionError(what)


work = tempfile.mkdtemp()
# Hundreds of MiB: removed however the script ends.
atexit.register(shutil.rmtree, work, True)
rng = random.Random(11)
tree = os.path.join(work, "tree")
for i in range(300):
    d = os.path.join(tree, f"a{i % 5}", f"b{i % 4}")
    os.makedirs(d, exist_ok=True)
    size = rng.choice([0, 1, 333, 65536, 1 << 20, 3 << 20]) if i % 50 else 12 << 20
    with open(os.path.join(d, f"file {i}.dat"), "wb") as f:
        f.write(os.urandom(size))
rclone("mkdir", "bc:rctree")
rclone("copy", tree, "bc:rctree/tree")
p = rclone("check", tree, "bc:rctree/tree")
check("0 differences found" in p.stderr, f"check after copy: {p.stderr}")
# Changes: one file removed, one rewritten, one added, then a sync and a check.
os.remove(os.path.join(tree, "a1", "b1", "file 1.dat"))
with open(os.path.join(tree, "a2", "b2", "file 2.dat"), "wb") as f:
    f.write(b"rewritten")
with open(os.path.join(tree, "added.dat"), "wb") as f:
    f.write(os.urandom(7 << 20))
rclone("sync", tree, "bc:rctree/tree")
p = rclone("check", tree, "bc:rctree/tree")
check("0 differences found" in p.stderr, f"check after sync: {p.stderr}")
back = os.path.join(work, "back")
rclone("copy", "bc:rctree/tree", back)
check(same_trees(tree, back), "the tree copied back equals the tree")
files = [l for l in rclone("lsf", "-R", "--files-only", "bc:rctree/tree").stdout.splitlines() if l]
check(len(files) == 300, f"{len(files)} files listed, not 300")
print("ok")
