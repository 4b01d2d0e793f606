"""--dtype: a bf16 checkpoint loaded in bf16 never exists in float32 (peak memory measured while loading),
and the flags resolve as documented."""

import json
import os
import subprocess
import sys

import pytest
import torch

import inference
from model import DecoderConfig, VisionConfig, VTLMM, VTLMMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: anonymous resident memory (RssAnon: the file's mmap pages excluded) sampled
# after every parameter is set, while the tensor read from the file is still alive beside its conversion.
MEASURE = r"""
import json, sys, torch
import inference, weights as W
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
base = anon()
peak = [base]
real = W._set_param
def spy(*args):
    real(*args)
    peak[0] = max(peak[0], anon())
W._set_param = spy
m = W.from_pretrained(sys.argv[1], dtype=inference.resolve_dtype(sys.argv[2], "cpu"))
peak[0] = max(peak[0], anon())
print(json.dumps({"peak": peak[0] - base, "dtype": str({p.dtype for p in m.parameters()}),
                  "bytes": sum(p.numel() * p.element_size() for p in m.parameters())}))
"""


def _bf16_checkpoint(path):
    """A nanoVT checkpoint of ~56M parameters stored in bf16 (112 MB; 223 MB in float32)."""
    from safetensors.torch import save_file
    cfg = VTLMMConfig(vision=VisionConfig(image_size=28, patch_size=14, width=32, layers=1, heads=2, mlp=64),
                      decoder=DecoderConfig(vocab_size=32000, dim=512, layers=2, heads=8, kv_heads=8, hidden=1376))
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in VTLMM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=g, dtype=torch.bfloat16) for n, s in shapes.items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"nanovt": cfg.to_dict()}, f)
    return sum(s.numel() for s in shapes.values())


def _measure(ckpt, dtype):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",  # large frees go back to the OS at once
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", MEASURE, ckpt, dtype], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")
def test_bf16_load_makes_no_float32_copy(tmp_path):
    n = _bf16_checkpoint(str(tmp_path))
    fp32_bytes = 4 * n
    bf16 = _measure(str(tmp_path), "bf16")
    assert bf16["dtype"] == "{torch.bfloat16}" and bf16["bytes"] == 2 * n
    # the whole model in bf16 plus at most a tensor or two in flight: well under one float32 copy
    assert bf16["peak"] < 0.65 * fp32_bytes, (bf16["peak"], fp32_bytes)
    # the measurement sees a float32 model when there is one
    fp32 = _measure(str(tmp_path), "fp32")
    assert fp32["dtype"] == "{torch.float32}" and fp32["peak"] > 0.95 * fp32_bytes


def test_dtype_and_device_flags():
    assert inference.resolve_dtype("auto", "cpu") == torch.float32
    assert inference.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert inference.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert [inference.resolve_dtype(d) for d in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16,
                                                                            torch.float32]
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        inference.resolve_dtype("float8")
    assert inference.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference.resolve_device("cpu") == "cpu"


if __name__ == "__main__":  # print the numbers: PYTHONPATH=. python tests/test_load_dtype.py
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        n = _bf16_checkpoint(d)
        for dtype in ("bf16", "fp32"):
            r = _measure(d, dtype)
            print(f"{n:,} parameters stored in bf16, loaded with --dtype {dtype}: peak RssAnon "
                  f"+{r['peak'] / 1e6:.1f} MB = {r['peak'] / (4 * n):.2f} x one float32 copy ({4 * n / 1e6:.1f} MB)")
