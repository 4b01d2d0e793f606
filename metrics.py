"""
What a training run reports (train.py): a progress bar, and every log_every steps a line printed and a
record in out_dir/metrics.jsonl with the LM and VM losses, lr, gradient norm, tokens/s, MFU (model
FLOPs utilisation: the training FLOPs of the real tokens per second, over the devices' peak FLOP/s)
and peak GPU memory. The peak comes from a table of dense tensor-core peaks keyed by the device name
CUDA reports (gpu_peak_flops), or from --peak_flops; on CPUs there is none, and MFU is left out.
"""

import json
import os
import re
import sys
import time

import torch

# Dense (no 2:4 sparsity) tensor-core peaks per device, in TFLOP/s: (bf16 with float32 accumulation,
# TF32). NVIDIA's sheets print the sparse figure; dense is half of it. Sources: the H100 datasheet
# (SXM bf16 1,979 / TF32 989 sparse; PCIe 1,513 / 756), the H100 NVL and H200 NVL figures (1,671 /
# 835 sparse, NVIDIA's H100 and H200 pages), the H200 datasheet (as H100 SXM), the A100 datasheet
# (312 / 156 dense, 40 and 80 GB, SXM and PCIe), the L40S datasheet (362.05 / 183), the L40 datasheet
# (181.05 / 90.5), the L4 datasheet (121 / 60), the A10 datasheet (125 / 62.5), and the Ada
# whitepaper's RTX 4090 column (165.2 / 82.6, bf16 with FP32 accumulate). Matched on the name CUDA
# reports, most specific first; anything else needs --peak_flops.
PEAK_TFLOPS = [
    (r"H100.*NVL", 835, 418), (r"H100.*PCIe", 756, 378), (r"H100", 989, 495),
    (r"H200.*NVL", 835, 418), (r"H200", 989, 495),
    (r"A100", 312, 156), (r"L40S", 362, 183), (r"L40\b", 181, 90.5), (r"\bL4\b", 121, 60),
    (r"\bA10\b", 125, 62.5), (r"RTX 4090", 165, 82.6),
]


def gpu_peak_flops(name, dtype="bf16"):
    """Dense peak FLOP/s of a GPU by the exact name torch.cuda.get_device_name reports (None if unknown):
    bf16 tensor cores, or TF32 for float32 runs (TF32 is allowed for float32 matmuls)."""
    for pattern, bf16, tf32 in PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return (bf16 if dtype == "bf16" else tf32) * 1e12
    return None


def peak_flops(device, dtype="bf16"):
    """Peak FLOP/s of one device, for MFU: the table for GPUs (None if the name is not in it). None on
    CPUs: no table of CPU peaks is kept, and a peak timed on one matmul at start-up can sit below what
    the run itself reaches (another process slowed it, or the run's GEMMs are faster), which read as
    MFU over 100%; a CPU run logs tokens/s, and MFU only with --peak_flops=FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name, dtype)
    if peak is None:
        print(f"note: no peak FLOP/s known for {name!r}; MFU is not reported (set --peak_flops=FLOPS)")
    return peak


class Progress:
    """The progress bar, metrics.jsonl and the printed line every log_every steps, with tokens/s and MFU
    over the steps since the last record. `s` is the stage being trained (train.Stage); `dtype` its
    compute dtype, "bf16" or "fp32", which picks the peak."""

    def __init__(self, s, dtype):
        cfg, d = s.cfg, s.d
        self.peak = cfg.peak_flops or peak_flops(d.device, dtype)  # one device; None: unknown GPU
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.bar = None
        if d.main:
            from tqdm import tqdm
            self.bar = tqdm(total=s.total, initial=s.step, desc=f"stage {cfg.stage}", dynamic_ncols=True,
                            disable=not sys.stderr.isatty() and not os.environ.get("NANOVT_PROGRESS"))
        s.model.train()
        self.t0, self.tokens_since, self.flops_since = time.perf_counter(), 0, 0.0
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        self.world = d.world

    def count(self, tokens, flops):
        """One micro-batch's real tokens and FLOPs on this process (as much on each process, by estimate)."""
        self.tokens_since += tokens * self.world
        self.flops_since += flops * self.world

    def log_step(self, s, lr, log_lm, log_vm, grad_norm):
        """After optimizer step s.step: the bar moves; every log_every steps and at the end, a record."""
        cfg, d, step, bar = s.cfg, s.d, s.step, self.bar
        if bar:
            bar.update(1)
        if not (step == s.total or step % cfg.log_every == 0):
            return
        dt = time.perf_counter() - self.t0
        tps = self.tokens_since / dt
        peak = self.peak
        rec = dict(stage=cfg.stage, step=step, loss=log_lm + log_vm, lm=log_lm, vm=log_vm, lr=lr,
                   grad_norm=grad_norm, skipped=s.skipped, tokens_per_s=round(tps, 1),
                   mfu=round(self.flops_since / dt / (peak * d.world), 4) if peak else None,
                   peak_mem_gb=round(torch.cuda.max_memory_allocated(d.device) / 2**30, 2)
                   if d.device.type == "cuda" else None)
        if d.main:
            bar.set_postfix(loss=f"{log_lm + log_vm:.4f}", lr=f"{lr:.2e}")
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            msg = (f"step {step}/{s.total} loss {rec['loss']:.4f} (lm {log_lm:.4f} vm {log_vm:.4f}) "
                   f"lr {lr:.2e} grad {rec['grad_norm']:.3f} {tps:,.0f} tok/s"
                   + (f" mfu {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""))
            (bar.write if bar and not bar.disable else print)(msg)
        self.t0, self.tokens_since, self.flops_since = time.perf_counter(), 0, 0.0

    def close(self):
        if self.bar:
            self.bar.close()
