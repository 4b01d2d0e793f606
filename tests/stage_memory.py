"""
What one rank holds across the first optimizer steps of a stage under FSDP2 (2 gloo processes on the CPU):
live tensor bytes (every storage reachable from Python, counted once) and the process's VmRSS / VmHWM, before
the first step and after each step, against the float32 model's size; then the largest storages alive after
the steps, with their shapes, so that whatever is held can be named.

    python tests/stage_memory.py --stage 3                 # builds a small world and checkpoint, runs 2 ranks
    python tests/stage_memory.py --stage 2 --dim 512 --layers 8
    python tests/stage_memory.py --preset 160m --phases    # the issue's setup; each phase's own peak

Sizes are given above "the start": the process's RSS before any weight (after building the model once on
the meta device, which loads torch's meta kernels). VmHWM is reset (/proc/self/clear_refs) before the
first step, so the rows after it show the steps' own peak. --json writes rank 1's numbers
(tests/test_stage_memory.py reads them).

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
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak():
    """Start VmHWM over from the current RSS (Linux: writing 5 to clear_refs), so that each phase's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhasePeaks:
    """VmHWM of each phase of train.optimizer_step (forward, backward, clip, optimizer step, zero_grad), by
    wrapping what the step calls from outside; the step itself runs unchanged."""

    def __init__(self, s):
        self.rows, self.s = [], s
        objective, clip, step = s.objective, torch.nn.utils.clip_grad_norm_, s.optimizer.step

        def fwd(*a, **k):
            out = objective(*a, **k)
            self.mark("forward")
            return out

        def clip_(*a, **k):
            self.mark("backward")
            out = clip(*a, **k)
            self.mark("clip")
            return out

        def step_(*a, **k):
            out = step(*a, **k)
            self.mark("optimizer step")
            return out

        s.objective = fwd
        torch.nn.utils.clip_grad_norm_ = clip_
        s.optimizer.step = step_

    def mark(self, phase):
        st = proc_status()
        self.rows.append((phase, st["VmHWM"], st["VmRSS"]))
        reset_peak()


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
    # the start: the process with everything but the weights. Building the model once on the meta device
    # (as sharded loading does, reading no tensor) pays the costs that do not scale with the weights:
    # torch's meta kernels are loaded on the first meta op (about 75 MiB here), the tokenizer, the files'
    # headers. That model is dropped; setup_stage builds its own.
    if args.stage in (1, 2, 3, 4):
        import weights
        train.build_model(cfg, train.find_tokenizer(cfg)[0], sources=weights.ShardSources())
    gc.collect()
    base = proc_status()["VmRSS"]
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
    reset_peak()  # from here VmHWM is the steps' own peak (the row above holds the loading's)
    phases = PhasePeaks(s) if args.phases else None
    for i in range(args.steps):
        if phases:
            phases.rows.append((f"step {i + 1}", None, None))
            reset_peak()
        train.optimizer_step(s, [next(it) for _ in range(s.accum)], cfg.lr, Null())
        if phases:
            phases.mark("zero_grad")
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
        print(f"the start (the process before any weight: Python, torch, gloo, the model on meta once): VmRSS "
              f"{base / 2**20:.0f} MiB; 'above start' columns subtract it\n")
        print("| when | live tensors MiB | x model | VmRSS MiB | VmHWM MiB | VmHWM above start x model |")
        print("|---|---|---|---|---|---|")
        for when, live, st in rows:
            print(f"| {when} | {live / 2**20:.0f} | {live / model_bytes:.2f} | {st['VmRSS'] / 2**20:.0f} | "
                  f"{st['VmHWM'] / 2**20:.0f} | {(st['VmHWM'] - base) / model_bytes:.2f} |")
        if phases:
            print("\n| phase | its peak VmHWM MiB | above start x model | VmRSS after MiB |\n|---|---|---|---|")
            for ph, hwm, rss in phases.rows:
                print(f"| {ph} | | | |" if hwm is None else
                      f"| {ph} | {hwm / 2**20:.0f} | {(hwm - base) / model_bytes:.2f} | {rss / 2**20:.0f} |")
        print(f"\noptimizer state on this rank: {opt_bytes / 2**20:.1f} MiB; trained tensors: {len(s.params)}\n")
        print("largest storages alive after the steps:\n")
        for n, desc in top:
            print(f"- {n / 2**20:.1f} MiB {desc}")
        peak = max(st["VmHWM"] for _, _, st in rows[1:])
        print(f"\npeak of the steps: {peak / 2**20:.0f} MiB, {(peak - base) / model_bytes:.2f} x the float32 model "
              f"above the start; loading's peak {(rows[0][2]['VmHWM'] - base) / model_bytes:.2f} x")
        result = {"model_bytes": model_bytes, "base_rss": base, "rows": rows, "step_peak": peak,
                  "step_peak_x": (peak - base) / model_bytes,
                  "load_peak_x": (rows[0][2]["VmHWM"] - base) / model_bytes, "phases": phases.rows if phases else []}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
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
        vision=dict(image_size=32, patch_size=8, width=args.vision_width, layers=args.vision_layers, heads=4,
                    mlp=4 * args.vision_width),
        decoder=dict(dim=args.dim, layers=args.layers, heads=8, kv_heads=8, hidden=args.hidden,
                     vocab_size=args.vocab, max_seq_len=512), template="vicuna_v1"))
    model = train.build_model(cfg, load_tokenizer(cfg.tokenizer))
    ckpt = os.path.join(args.tmp, "ckpt")
    n = sum(p.numel() for p in model.parameters())
    vocab = sum(p.numel() for m in (model.decoder.embed, model.mm_head, model.vm_head) for p in m.parameters())
    print(f"model: {n / 1e6:.1f}M parameters ({4 * n / 2**20:.0f} MiB in float32), vocabulary matrices "
          f"{vocab / n:.1%} of it; written as {args.layout}")
    if args.layout == "llava-hf":  # what a released checkpoint looks like (model.safetensors + vm_head.safetensors)
        import weights
        weights.export_llava_hf(model, ckpt, cfg.tokenizer)
    else:
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
    ap.add_argument("--vision_width", type=int, default=128)
    ap.add_argument("--vision_layers", type=int, default=2)
    ap.add_argument("--layout", default="nanovt", choices=["nanovt", "llava-hf"], help="the checkpoint's files")
    ap.add_argument("--preset", default="", choices=["", "160m"],
                    help="160m: the issue's setup, a 160M model (vocabulary matrices ~8%%) in the llava-hf layout")
    ap.add_argument("--phases", action="store_true", help="each phase's own peak (forward, backward, clip, step)")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after each step")
    ap.add_argument("--json", default="", help="write rank 1's numbers to this file")
    ap.add_argument("--world", default="")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--tmp", default="")
    args = ap.parse_args()
    if args.preset == "160m":
        args.dim, args.layers, args.hidden, args.vocab, args.layout = 1024, 11, 2816, 4096, "llava-hf"
        args.vision_width, args.vision_layers = 256, 4
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
