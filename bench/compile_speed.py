"""
Compiled training (TrainConfig.compile: every decoder and vision block through torch.compile) against eager,
side by side in one run, on the CPU: the demo's model (configs/shapes.py) and a larger one, on the demo's data.

    python bench/compile_speed.py                        # stage IV and II, demo model and the larger one
    python bench/compile_speed.py --models demo --stages 4 --rounds 3

For each model and stage, both variants are train.py's own stage setup (train.setup_stage) and step
(train.optimizer_step) on the same real micro-batches (length-grouped, as training draws them). The first
pass over the batches is timed on its own: it holds the compiles (every new length shape; Dynamo's dynamic
shapes keep that to a few). Then the variants are timed in turn, round after round; the median round gives
tokens/s (non-padding tokens). From the warm-up overhead and the per-step gain follows how many steps a
stage needs before compiling pays, beside how many the demo's stage takes. Writes Markdown to stdout.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402
from demo_speed import setup, stage_cfg, step  # noqa: E402  (bench/ is on sys.path as the script's folder)

# a model about 8x the demo's decoder (and a wider vision tower), on the same 48-pixel world
LARGER = dict(vision=dict(image_size=48, patch_size=8, width=256, layers=4, heads=4, mlp=1024),
              decoder=dict(dim=512, layers=8, heads=8, kv_heads=8, hidden=1408, max_seq_len=512),
              template="vicuna_v1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--models", default="demo,larger")
    ap.add_argument("--stages", default="4,2")
    ap.add_argument("--dtype", default="", help="override the config's dtype (the demo: bf16 autocast)")
    ap.add_argument("--batches", type=int, default=6, help="micro-batches per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=600, help="images of the world the batches come from")
    ap.add_argument("--world", default="", help="a shapes world to reuse (default: built in a temporary folder)")
    args = ap.parse_args()
    world = args.world or os.path.join(tempfile.mkdtemp(prefix="compile_speed_"), "world")
    print(f"# compiled vs eager training steps: {args.config}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs\n")
    for model_name in args.models.split(","):
        for stage in (int(x) for x in args.stages.split(",")):
            run(args, world, model_name, stage)


def run(args, world, model_name, stage):
    tmp = tempfile.mkdtemp(prefix="compile_speed_run_")
    stages, warm = {}, {}
    for name, compile_on in (("eager", False), ("compiled", True)):
        over = {"compile": compile_on}
        if args.dtype:
            over["dtype"] = args.dtype
        cfg = stage_cfg(args.config, stage, os.path.join(tmp, name), over)
        data_file = os.path.basename(cfg.data_path)
        cfg = dataclasses.replace(cfg, hook={**cfg.hook, "dir": world, "images": args.images, "report": False},
                                  tokenizer=os.path.join(world, "tokenizer.model"),
                                  data_path=os.path.join(world, data_file),
                                  model=LARGER if model_name == "larger" else cfg.model)
        torch.manual_seed(0)
        torch._dynamo.reset()
        stages[name] = setup(cfg)
    first = stages["eager"]
    it = train.batches(first.dataset, first.cfg, first.d, first.tok, 0, 0, first.plain.cfg.image_token_id)
    micro = [next(it) for _ in range(args.batches)]
    real = sum(int(b["attention_mask"].sum()) for b in micro)
    lengths = sorted({b["attention_mask"].shape[1] for b in micro})
    for name in stages:  # the first pass: compiles happen here
        t0 = time.perf_counter()
        for b in micro:
            step(stages[name], [b])
        warm[name] = time.perf_counter() - t0
    times = {n: [] for n in stages}
    for _ in range(args.rounds):
        for name in stages:
            t0 = time.perf_counter()
            for b in micro:
                step(stages[name], [b])
            times[name].append(time.perf_counter() - t0)
    tps = {n: statistics.median(real / t for t in times[n]) for n in stages}
    per_step = {n: statistics.median(times[n]) / args.batches for n in stages}
    # the first pass beyond the steady steps it holds, compiled less eager: what compiling costs
    extra = {n: warm[n] - args.batches * per_step[n] for n in stages}
    overhead = extra["compiled"] - extra["eager"]
    gain = per_step["eager"] - per_step["compiled"]
    steps_demo = demo_steps(first)
    n_dec = first.plain.num_params("decoder", non_embedding=True)
    print(f"## {model_name} model (decoder {n_dec / 1e6:.1f}M non-embedding, dim {first.plain.cfg.decoder.dim}, "
          f"{first.plain.cfg.decoder.layers} layers), stage {stage} ({first.objective.name}), "
          f"{resolve(first)}, micro-batch {first.cfg.micro_batch}\n")
    print(f"{args.batches} micro-batches x {args.rounds} rounds, {real / args.batches:.0f} real tokens per batch, "
          f"padded lengths {lengths}\n")
    print("| variant | tokens/s (median round) | vs eager | first pass (s, compiles) | rounds (s) |")
    print("|---|---|---|---|---|")
    for name in stages:
        print(f"| {name} | {tps[name]:,.0f} | {tps[name] / tps['eager']:.2f}x | {warm[name]:.1f} | "
              f"{', '.join(f'{t:.2f}' for t in times[name])} |")
    total_e = steps_demo * per_step["eager"] + extra["eager"]
    total_c = steps_demo * per_step["compiled"] + extra["compiled"]
    be = f"{overhead / gain:,.0f}" if gain > 0 else "never"
    print(f"\ncompile overhead {overhead:.1f} s; break-even after {be} steps; this stage of the demo takes "
          f"{steps_demo} steps of one micro-batch: {total_e:,.0f} s eager against {total_c:,.0f} s compiled "
          f"including the compiles ({total_e / total_c:.2f}x)\n")


def resolve(s):
    return train.resolve_dtype(s.cfg, s.d)


def demo_steps(s):
    """Micro-batch steps of this stage in the demo: its data (the full world's size, scaled from this one's
    sample count to the demo's images) times its epochs, over its global batch."""
    import configurator
    demo = configurator.parse(train.TrainConfig, [os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs/shapes.py")])
    images = demo.hook.get("images", 10000)
    scale = images / s.cfg.hook.get("images", images)
    n = len(s.dataset) * scale
    return int(n * s.cfg.epochs / s.cfg.global_batch) * (s.cfg.global_batch // s.cfg.micro_batch)


if __name__ == "__main__":
    main()
