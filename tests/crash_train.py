"""Run train.py with a crash injected into checkpoint saving (tests only; nothing in the training
code knows about it).

    python tests/crash_train.py PHASE STEP CONFIG [--key=value ...]

PHASE says where the process dies (os._exit(3), as a kill would leave it) while step-STEP is saved:
  write    in the DCP writer, after its files are written, with the first one cut in half
  publish  while meta.json (the marker written last) is half written, before the rename
  prune    after step-STEP is published, before older checkpoints are pruned
  slow     never dies: every write sleeps 0.3 s first and prints "writing step-N", so that a test
           can kill the process at a moment of its choosing, during an asynchronous save
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed.checkpoint as dcp  # noqa: E402

import checkpoint  # noqa: E402
import train  # noqa: E402

phase, at = sys.argv[1], int(sys.argv[2])
tag = f"step-{at}.tmp"

write_data = dcp.FileSystemWriter.write_data


def patched_write_data(self, plan, planner):
    path = str(self.path)
    if phase == "slow":
        print(f"writing {os.path.basename(path)}", flush=True)
        time.sleep(0.3)
    fut = write_data(self, plan, planner)
    if phase == "write" and path.endswith(tag):
        fut.wait()
        first = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
        f = os.path.join(path, first)
        os.truncate(f, os.path.getsize(f) // 2)
        os._exit(3)
    return fut


write_json = checkpoint.write_json


def patched_write_json(path, obj):
    if phase == "publish" and path.endswith(os.path.join(tag, checkpoint.META)):
        with open(path, "w") as f:
            f.write('{"complete": tr')  # torn JSON
        os._exit(3)
    return write_json(path, obj)


prune = checkpoint.Checkpointer.prune


def patched_prune(self, newest):
    if phase == "prune" and newest == at:
        os._exit(3)
    return prune(self, newest)


dcp.FileSystemWriter.write_data = patched_write_data
checkpoint.write_json = patched_write_json
checkpoint.Checkpointer.prune = patched_prune
train.run(train.load_config(sys.argv[3:]))
