"""bench/vs_transformers.py runs end to end, and the chunked loss it times is the full-logits loss, with less memory."""

import json
import os
import re
import subprocess
import sys

import torch

import losses
from vs_transformers import LiveBytes  # bench/vs_transformers.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_the_table(tmp_path):
    out = tmp_path / "results.md"
    r = subprocess.run([sys.executable, "bench/vs_transformers.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Command: `python bench/vs_transformers.py --quick`" in text
    for row in ("training step, tokens/s", "training step MFU", "peak memory of a stage IV step",
                "decoding batch 1", "decoding batch 8", "peak memory of the loss alone",
                "decoding batch 1, the weight products alone"):
        assert re.search(r"\| " + re.escape(row) + r".*\| [\d.,]+%? \| [\d.,]+%? \| [\d.]+× \|", text), row
    diff = float(re.search(r"logits max rel diff nanoVT vs transformers: (\S+)", text).group(1))
    assert diff <= 1e-4
    for side in ("nano", "compiled"):  # the static-cache step, eager and compiled, decodes transformers' tokens
        assert re.search(rf"greedy tokens at batch 1, {side} vs transformers: (\d+)/\1 equal", text), side
    assert re.search(r"\| decoding batch 1, compiled, .*\| [\d.,]+ \| [\d.,]+ \| [\d.]+× \|", text)
    lm = re.search(r"LM loss: nanoVT (\S+), transformers (\S+)", text)
    assert abs(float(lm.group(1)) - float(lm.group(2))) <= 1e-4


def test_matvec_floor_reads_every_decoder_matrix_and_the_head_once_per_step():
    """The ceiling row of the decoding table: one step = one product with each of the decoder's linear
    weights and the MM head (the bytes a decoding step must read), and nothing more."""
    import vs_transformers as bench
    from torch.utils._python_dispatch import TorchDispatchMode

    _, _, nano = bench.build_pair("quick", torch.float32, torch.device("cpu"))
    want = [m.weight for m in nano.decoder.modules() if isinstance(m, torch.nn.Linear)] + [nano.mm_head.weight]
    assert len(want) == 7 * len(nano.decoder.blocks) + 1

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ptrs, self.ops = [], set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            if func.overloadpacket.__name__ in ("mm", "addmm", "linear"):  # a weight, or its transposed view
                self.ptrs += [a.data_ptr() for a in args if isinstance(a, torch.Tensor) and a.dim() == 2
                              and a.data_ptr() in weights]
            return func(*args, **(kwargs or {}))

    weights = {w.data_ptr() for w in want}
    assert len(weights) == len(want)
    step = bench.matvec_floor(nano, 3, torch.device("cpu"))
    with Reads() as r:
        y = step(2)
    assert y.shape == (3, nano.mm_head.weight.shape[0])
    assert sorted(r.ptrs) == sorted(w.data_ptr() for w in want * 2)
    assert r.ops <= {"mm", "t", "linear", "matmul", "view", "_unsafe_view", "addmm", "reshape"}, r.ops


def loss_problem(T=512, C=4000, d=64, n_img=144, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, T, d, generator=g).requires_grad_()
    w_mm = (torch.randn(C, d, generator=g) * 0.2).requires_grad_()
    w_vm = torch.randn(C, d, generator=g) * 0.2
    image_mask = torch.zeros(2, T, dtype=torch.bool)
    image_mask[:, 10:10 + n_img] = True
    labels = torch.randint(0, C, (2, T), generator=g)
    labels[:, :10 + n_img + 8] = losses.IGNORE_INDEX
    x_image = torch.randn(2 * n_img, d, generator=g)
    return hidden, w_mm, labels, image_mask, x_image, w_vm


def test_chunked_loss_equals_full_logits_with_a_quarter_of_the_memory():
    """Eight chunks of 128 rows; values and gradients equal to the
    full-logits path; peak memory (LiveBytes, as bench/vs_transformers.py measures it) at most 25% of it."""
    hidden, w_mm, labels, image_mask, x_image, w_vm = loss_problem()
    grads, values, peak = {}, {}, {}

    def full():
        tot = losses.mm_loss(hidden @ w_mm.T, labels, x_image @ w_vm.T, image_mask)[0]
        tot.backward()
        return tot

    def chunked():
        lm, vm = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm, chunk_size=128)
        (lm + vm).backward()
        return lm + vm

    for name, fn in (("full", full), ("chunked", chunked)):
        hidden.grad = w_mm.grad = None
        with LiveBytes() as mode:
            values[name] = fn().detach()
        peak[name] = mode.peak
        grads[name] = (hidden.grad, w_mm.grad)
    assert torch.allclose(values["chunked"], values["full"], rtol=1e-5)
    for a, b in zip(grads["chunked"], grads["full"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert peak["chunked"] <= 0.25 * peak["full"], (peak["chunked"], peak["full"])


def test_memory_sim_counts_local_shards_and_no_shadow_ops(tmp_path):
    """bench/memory_sim.py on 8 fake ranks (2 Vicuna-7B blocks, stage IV): rank 0 holds an eighth of the
    float32 weights and the AdamW state of an eighth of the trained ones, and the first step peaks where the
    second does (DTensor's global-shape shape propagation, which runs only on the first step, is not counted:
    FSDPMemTracker counted it as full-size AdamW and clip transients)."""
    out = tmp_path / "sim.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory_sim.py"), "--decoders", "vicuna-7b-v1.5",
                    "--stages", "4", "--layers", "2", "--micro", "1", "--seq", "1024", "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())[0]
    assert abs(r["weights"] - 4 * r["params"] / 8) / r["weights"] < 0.01  # shards padded to 8 rows at most
    phases, w, g, a = dict(r["phases"]), r["weights"], r["grads"], r["state"]
    # the clip and the update hold the shards of weights, gradients (and AdamW state, once made) and
    # (nearly) nothing more, on both steps
    assert phases["clip 1"] <= 1.02 * (w + g) and phases["clip 2"] <= 1.02 * (w + g + a), r["phases"]
    for i in (1, 2):
        assert phases[f"optimizer step {i}"] <= 1.02 * (w + g + a), r["phases"]
    assert r["end"] <= 1.01 * (r["weights"] + r["state"])  # after zero_grad: weights and AdamW state only


def test_memory_sim_agrees_with_a_real_run(tmp_path):
    """The simulation's count against the process's own memory: a 91M model at world 1 (FSDP2 over one gloo
    process, float32), stage III, simulated, then trained for real (VmHWM per phase above the RSS with the
    model on meta). Measured = simulated + a roughly constant 30-60 MiB (heap that is not tensors) in every
    phase; stages I and IV were checked the same way (bench/memory_sim.py --validate)."""
    out = tmp_path / "validate.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory_sim.py"), "--validate", "--stages", "3",
                    "--micro", "2", "--seq", "512", "--json", str(out)], cwd=ROOT, check=True, capture_output=True,
                   text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())
    assert len(rows) == 9
    for phase, sim, real in rows:
        assert -20 * 2**20 < real - sim < 120 * 2**20, rows
