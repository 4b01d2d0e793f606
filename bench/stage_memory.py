"""
What one rank holds across the first optimizer steps of a stage under FSDP2 (2 gloo processes on the CPU):
live tensor bytes (every storage reachable from Python, counted once) and the process's VmRSS / VmHWM, before
the first step and after each step, against the float32 model's size; then the largest storages alive after
the steps, with their shapes, so that whatever is held can be named.

    python bench/stage_memory.py --stage 3                 # builds a small world and checkpoint, runs 2 ranks
    python bench/stage_memory.py --stage 2 --dim 512 --layers 8

Runs train.py's own setup (train.setup_stage: sharded loading, parallelize, the optimizer) and step
(train.optimizer_step). Prints Markdown from rank 1 (rank 0 does the same work).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def live_storages():
    """{storage data_ptr: (nbytes, a tensor's description)} of every tensor Python can reach (DTensors
    through their local shards)."""
    seen = {}
    for o in gc.get_objects():
        try:
            if not isinstance(o, torch.Tensor):
                continue
        except ReferenceError:
            continue
        t = o._local_tensor if hasattr(o, "_local_tensor") else o
        if t.is_meta or t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0:
            continue
        seen.setdefault(s.data_ptr(), (s.nbytes(), f"{tuple(t.shape)} {t.dtype}"))
    return seen


def proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def worker(args):
    import train
    cfg = train.TrainConfig(stage=args.stage, init_from=args.ckpt, tokenizer=os.path.join(args.world, "tokenizer.model"),
                            data_path=os.path.join(args.world, "instruct.json" if args.stage in (2, 4) else
                                                   "stage1_captions.json"),
                            template="" if args.stage in (2, 4) else "plain", out_dir=args.out,
                            fsdp="on", dtype="fp32", micro_batch=args.micro_batch, global_batch=2 * args.micro_batch,
                            max_steps=args.steps, save_every=0, overwrite=True, num_workers=0,
                            activation_checkpointing=True)
    d = train.setup_distributed(cfg)
    os.makedirs(args.out, exist_ok=True)
    lock, run_id = (None, "bench")
    s = train.setup_stage(cfg, d, lock, run_id)
    model_bytes = 4 * sum(p.numel() for p in s.plain.parameters())

    class Null:
        def count(self, *a):
            pass

    it = train.batches(s.dataset, cfg, d, s.tok, 0, 0, s.plain.cfg.image_token_id)
    gc.collect()
    rows = [("before the first step", sum(n for n, _ in live_storages().values()), proc_status())]
    for i in range(args.steps):
        train.optimizer_step(s, [next(it) for _ in range(s.accum)], cfg.lr, Null())
        gc.collect()
        if args.trim:  # hand freed heap pages back to the OS: tells allocator retention from tensors held
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        rows.append((f"after step {i + 1}", sum(n for n, _ in live_storages().values()), proc_status()))
    top = sorted(live_storages().values(), reverse=True)[:args.top]
    opt_bytes = sum((v._local_tensor if hasattr(v, "_local_tensor") else v).untyped_storage().nbytes()
                    for st in s.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    if d.rank == 1:
        print(f"# stage {args.stage} on rank 1 of 2 (FSDP2, gloo, float32): model {model_bytes / 2**20:.0f} MiB in float32, "
              f"micro-batch {args.micro_batch}\n")
        print("| when | live tensors MiB | x model | VmRSS MiB | VmHWM MiB | VmHWM x model |")
        print("|---|---|---|---|---|---|")
        for when, live, st in rows:
            print(f"| {when} | {live / 2**20:.0f} | {live / model_bytes:.2f} | {st['VmRSS'] / 2**20:.0f} | "
                  f"{st['VmHWM'] / 2**20:.0f} | {st['VmHWM'] / model_bytes:.2f} |")
        print(f"\noptimizer state on this rank: {opt_bytes / 2**20:.1f} MiB; trained tensors: {len(s.params)}\n")
        print("largest storages alive after the steps:\n")
        for n, desc in top:
            print(f"- {n / 2**20:.1f} MiB {desc}")
        print(json.dumps({"model_bytes": model_bytes, "rows": [(w, live, st) for w, live, st in rows]}), file=sys.stderr)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def prepare(args):
    """A shapes world and a fresh checkpoint of the asked size (the tokenizer's vocabulary inside it)."""
    import shapes
    import train
    from tokenizer import load_tokenizer
    world = os.path.join(args.tmp, "world")
    shapes.make_shapes_world(world, n_images=64, image_size=32, vocab_size=600, workers=1)
    cfg = train.TrainConfig(tokenizer=os.path.join(world, "tokenizer.model"), model=dict(
        vision=dict(image_size=32, patch_size=8, width=128, layers=2, heads=4, mlp=256),
        decoder=dict(dim=args.dim, layers=args.layers, heads=8, kv_heads=8, hidden=args.hidden,
                     vocab_size=args.vocab, max_seq_len=512), template="vicuna_v1"))
    model = train.build_model(cfg, load_tokenizer(cfg.tokenizer))
    ckpt = os.path.join(args.tmp, "ckpt")
    model.save_pretrained(ckpt)
    import shutil
    shutil.copyfile(cfg.tokenizer, os.path.join(ckpt, "tokenizer.model"))
    return world, ckpt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each step")
    ap.add_argument("--world", default="")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--tmp", default="")
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:
        return worker(args)
    args.tmp = args.tmp or tempfile.mkdtemp(prefix="stage_memory_")
    if not args.ckpt:
        args.world, args.ckpt = prepare(args)
    argv = [a for a in sys.argv[1:]] + ["--world", args.world, "--ckpt", args.ckpt, "--out", os.path.join(args.tmp, "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.abspath(__file__), *argv], env=env, cwd=ROOT)
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
