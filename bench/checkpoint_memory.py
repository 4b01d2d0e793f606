"""
Host memory and time of saving and resuming a training checkpoint with checkpoint.py (each rank writes
and reads its own shard with torch.distributed.checkpoint), 2 gloo processes on the CPU, a
253M-parameter model in stage IV (decoder and MM head trained: 199M parameters with AdamW moments).

    python bench/checkpoint_memory.py            # a few minutes; writes bench/results_checkpoint.md
    python bench/checkpoint_memory.py --dir D    # where the checkpoints go (default: a temporary directory)

Each phase runs in fresh processes (torchrun, 2 ranks): build the model, shard it (FSDP2), give
AdamW its state, then measure. Memory is each rank's peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the phase) above its resident set at that moment: the extra host
memory the phase needs on top of the training state every rank holds anyway. Time is the phase's
wall-clock on the slowest rank. bench/results_checkpoint.md also has the rows of the path checkpoint.py
replaced (rank 0 gathering and writing everything), which this tool measured side by side until it was
retired (`git show 0aedc80:bench/checkpoint.py`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, proc_status  # bench/common.py, which also puts the repository on sys.path

MODEL = dict(vision=dict(image_size=112, patch_size=14, width=256, layers=2, heads=4, mlp=1024),
             decoder=dict(dim=1536, layers=4, heads=12, kv_heads=4, hidden=4096, vocab_size=32000))
PHASES = ["new_save", "new_resume", "new_async_save", "new_final_bf16"]


# ----------------------------------------------------------------------------------------------
# one phase, on one rank (under torchrun)


def worker(phase, ckdir):
    import torch
    import torch.distributed as dist

    import checkpoint
    import train
    torch.set_num_threads(1)
    cfg = train.TrainConfig(model=MODEL, stage=4, fsdp="on", dtype="fp32", activation_checkpointing=False)
    d = train.setup_distributed(cfg)
    model = train.build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    train.set_trainable(model, 4)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, _ = train.parallelize(model, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for p in params:  # one AdamW step on random gradients: the state every rank holds while training
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    new_dir = os.path.join(ckdir, "new")
    fp = {"bench": 1}
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = proc_status("VmRSS") / 1024  # KiB
    t0 = time.perf_counter()
    blocked = None
    if phase == "new_save":
        checkpoint.Checkpointer(new_dir, "bench", keep=1).save(1, model, opt, {"fingerprint": fp, "data": {}})
    elif phase == "new_async_save":
        c = checkpoint.Checkpointer(os.path.join(ckdir, "new_async"), "bench", keep=1, async_save=True)
        c.save(1, model, opt, {"fingerprint": fp, "data": {}})
        blocked = time.perf_counter() - t0  # training goes on from here while the shard is written
        c.close()
    elif phase == "new_resume":
        assert checkpoint.resume(new_dir, model, opt, fp) is not None
    elif phase == "new_final_bf16":
        checkpoint.save_final(os.path.join(ckdir, "final"), model, model.cfg.to_dict(), None, "bf16")
    wall = time.perf_counter() - t0
    peak = proc_status("VmHWM") / 1024
    res = dict(phase=phase, rank=d.rank, extra_gib=(peak - base) / 2**20, base_gib=base / 2**20, wall_s=wall,
               blocked_s=blocked, params=n_params, trained=n_trained)
    with open(os.path.join(ckdir, f"{phase}.{d.rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the driver


def dir_gib(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="")
    ap.add_argument("--phase", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results_checkpoint.md"))
    a = ap.parse_args()
    if a.phase:
        return worker(a.phase, a.dir)
    ckdir = a.dir or tempfile.mkdtemp(prefix="nanovt-ckpt-bench-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for i, phase in enumerate(PHASES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29700 + i}",
               os.path.abspath(__file__), "--phase", phase, "--dir", ckdir]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{phase} failed:\n{r.stderr[-4000:]}")
        rows[phase] = [json.load(open(os.path.join(ckdir, f"{phase}.{k}.json"))) for k in range(2)]
        print(phase, [(round(x["extra_gib"], 2), round(x["wall_s"], 1)) for x in rows[phase]], flush=True)
    p = rows["new_save"][0]
    fp32_gib = 4 * p["params"] / 2**30
    adam_gib = 8 * p["trained"] / 2**30
    sizes = {"new": dir_gib(os.path.join(ckdir, "new")),
             "final_bf16": dir_gib(os.path.join(ckdir, "final"))}
    lines = [
        "# Checkpoint save and resume: host memory and time (bench/checkpoint_memory.py)",
        "",
        f"2 gloo processes on the CPU ({os.cpu_count()} cores, shared), FSDP2, fp32; a model of "
        f"{p['params'] / 1e6:.0f}M parameters (fp32 weights {fp32_gib:.2f} GiB) in stage IV: "
        f"{p['trained'] / 1e6:.0f}M trained, AdamW moments {adam_gib:.2f} GiB. Extra = the rank's peak resident "
        f"set during the phase above its resident set before it (the training state, about "
        f"{rows['new_save'][0]['base_gib']:.2f} GiB per rank, is not counted). Each phase in fresh processes.",
        "",
        "| phase | rank 0 extra GiB | rank 1 extra GiB | extra / fp32 model (worst rank) | wall s (slowest rank) |",
        "|---|---|---|---|---|",
    ]
    names = {"new_save": "save, after (DCP: each rank its shard)",
             "new_async_save": "save, after, asynchronous (blocks training for {b:.1f} s)",
             "new_resume": "resume, after (DCP: each rank its shard)",
             "new_final_bf16": "final/ in bf16, after (gathered per tensor, rank 0 streams)"}
    for phase in ["new_save", "new_async_save", "new_resume", "new_final_bf16"]:
        r0, r1 = rows[phase]
        label = names[phase].format(b=max(r0["blocked_s"] or 0, r1["blocked_s"] or 0))
        worst = max(r0["extra_gib"], r1["extra_gib"])
        lines.append(f"| {label} | {r0['extra_gib']:.2f} | {r1['extra_gib']:.2f} | {worst / fp32_gib:.2f} | "
                     f"{max(r0['wall_s'], r1['wall_s']):.1f} |")
    lines += ["", f"On disk: {sizes['new']:.2f} GiB per step checkpoint (2 shards + metadata); final/ in bf16 "
                  f"{sizes['final_bf16']:.2f} GiB (model only).", ""]
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if not a.dir:
        shutil.rmtree(ckdir, ignore_errors=True)


if __name__ == "__main__":
    main()
