"""A tiny random nanoVT checkpoint and shapes world for the sample / eval / ablation tests (seconds)."""

import os
import shutil
import subprocess
import sys

import shapes
import train
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_world(path, n_images=120):
    shapes.make_shapes_world(path, n_images=n_images, image_size=32, vocab_size=600, workers=1)
    return str(path)


def tiny_args(world, out, *extra):
    """train.py arguments: configs/tiny.py on `world` (the conftest fixture), writing to `out`, toy hook off."""
    return [os.path.join(ROOT, "configs/tiny.py"), "--hook={}", f"--tokenizer={world}/tokenizer.model",
            f"--data_path={world}/instruct.json", f"--out_dir={out}", *extra]


def run_py(argv):
    return train.run(train.load_config(argv))


def make_checkpoint(world, out):
    """configs/tiny.py's model with fresh weights, saved as a checkpoint directory with its tokenizer."""
    cfg = train.load_config([os.path.join(ROOT, "configs/tiny.py"), f"--tokenizer={world}/tokenizer.model"])
    tok = load_tokenizer(cfg.tokenizer)
    model = train.build_model(cfg, tok).eval()
    model.save_pretrained(str(out))
    shutil.copyfile(cfg.tokenizer, os.path.join(out, "tokenizer.model"))
    return str(out)


def torchrun(script, *argv, env=None):
    """`torchrun --standalone --nproc_per_node=2 script argv` from the repository root: a free port each
    time (no clash between test runs side by side), one BLAS thread per process, and faulthandler on, so
    that a process that aborts prints every thread's Python stack. Returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r
