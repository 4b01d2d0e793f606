"""
What a training step of the shapes demo costs under each speed lever, side by side in one run.

    python bench/demo_speed.py                       # the demo's config (configs/shapes.py), stage IV and II
    python bench/demo_speed.py --variants 'fp32;bf16' --stages 4 --rounds 3
    python bench/demo_speed.py --config configs/shapes_smollm2.py --stages 2,1,3 --batches 1 --rounds 3 \
        --variants 'fp32;bf16;fp32+compile;bf16+compile;bf16+compile, activation checkpointing;bf16+compile, max_len 128;bf16+compile, max_len 256'
    python bench/demo_speed.py --config configs/shapes_smollm2.py --stages 1 --batches 1 --rounds 3 \
        --variants 'fp32;bf16;bf16+compile;bf16+compile, decoder trained'

Each variant is train.py's own stage setup (train.setup_stage) with one setting changed: dtype (fp32 or
bf16 autocast on the CPU), compile (torch.compile of the decoder blocks), intra-op threads, and whether
training attention runs in float32 under bf16 (model.attend; "bf16 attention" variants switch it off). Every variant
takes the same real micro-batches of the demo's data (length-grouped, as training draws them), is warmed
up on all of them first (so compiling stays out of the times), and then the variants are timed in turn,
round after round; the median round gives tokens/s (non-padding tokens, as train.py counts them) and
samples/s (what a recipe's minutes depend on when max_len changes the tokens per sample).
Weights are fresh (speed does not depend on them). Also prints how long the loader takes per batch,
and the share of padding. Writes a Markdown table to stdout.
"""

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import common  # noqa: E402,F401 (bench/common.py: the repository on sys.path)

import torch  # noqa: E402

import configurator  # noqa: E402
import train  # noqa: E402

VARIANTS = {  # name: (TrainConfig overrides, intra-op threads (None: the default), loader)
    # loader None: the micro-batches are read once beforehand and every variant gets the same ones ("own":
    # read once beforehand, from this variant's own dataset);
    # 0 or 1: this variant reads them itself while it trains, in the main process or in 1 worker process
    "fp32": ({"dtype": "fp32"}, None, None),
    "bf16": ({"dtype": "bf16"}, None, None),
    "fp32+compile": ({"dtype": "fp32", "compile": "on"}, None, None),
    "bf16+compile": ({"dtype": "bf16", "compile": "on"}, None, None),
    # attention in bf16 as PyTorch's autocast would run it (model.attend's float32 path switched off)
    "bf16, bf16 attention": ({"dtype": "bf16"}, None, None),
    "bf16+compile, bf16 attention": ({"dtype": "bf16", "compile": "on"}, None, None),
    "fp32, 1 thread": ({"dtype": "fp32"}, 1, None),
    "bf16, 1 thread": ({"dtype": "bf16"}, 1, None),
    # activation checkpointing (keep each block's input, recompute it in backward): memory for time
    "bf16+compile, activation checkpointing": ({"dtype": "bf16", "compile": "on", "activation_checkpointing": True},
                                               None, None),
    # stage I's decoder not frozen (stage II's trainable set, same loss and data): what freezing saves
    "bf16+compile, decoder trained": ({"dtype": "bf16", "compile": "on", "stage": 2}, None, None),
    # sequence length: max_len truncates the conversations' tails, so the same samples make other batches,
    # which this variant reads once beforehand from its own dataset ("own")
    "bf16+compile, max_len 128": ({"dtype": "bf16", "compile": "on", "max_len": 128}, None, "own"),
    "bf16+compile, max_len 256": ({"dtype": "bf16", "compile": "on", "max_len": 256}, None, "own"),
    "bf16, loading in the main process": ({"dtype": "bf16", "num_workers": 0}, None, 0),
    "bf16, 1 loader worker": ({"dtype": "bf16", "num_workers": 1}, None, 1),
}


def stage_cfg(config, stage, out_dir, over):
    cfg = configurator.parse(train.TrainConfig, [config])
    base = next(s for s in cfg.stages if s["stage"] == stage)
    keep = {k: v for k, v in base.items() if k not in ("out_dir", "init_from", "reinit")}
    import dataclasses
    return dataclasses.replace(cfg, stages=[], **{**keep, **over}, out_dir=out_dir, init_from="",
                               save_every=0, overwrite=True)


def setup(cfg):
    os.makedirs(cfg.out_dir, exist_ok=True)
    d = train.setup_distributed(cfg)
    return train.setup_stage(cfg, d, None, "bench")


def step(s, micro):
    progress = _Null()
    train.optimizer_step(s, micro, s.cfg.lr, progress)


class _Null:
    def count(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--stages", default="4,2")
    ap.add_argument("--variants", default="fp32;bf16;fp32+compile;bf16+compile;bf16, 1 thread",
                    help="names of VARIANTS, separated by semicolons")
    ap.add_argument("--batches", type=int, default=8, help="micro-batches per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(";")]
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; known: {'; '.join(VARIANTS)}")
    threads = torch.get_num_threads()
    print(f"# demo step speed: {args.config}, torch {torch.__version__}, {threads} intra-op threads by default, "
          f"{os.cpu_count()} CPUs\n")
    for stage in (int(x) for x in args.stages.split(",")):  # noqa: C901
        tmp = tempfile.mkdtemp(prefix="demo_speed_")
        stages = {}
        for name in names:
            over = VARIANTS[name][0]
            torch.manual_seed(0)
            stages[name] = setup(stage_cfg(args.config, stage, os.path.join(tmp, name.replace(" ", "_")), over))
        first = stages[names[0]]
        it = train.batches(first.dataset, first.cfg, first.d, first.tok, 0, 0, first.plain.cfg.image_token_id)
        t0 = time.perf_counter()
        micro = [next(it) for _ in range(args.batches)]
        load_s = (time.perf_counter() - t0) / args.batches
        real = sum(int(b["attention_mask"].sum()) for b in micro)
        padded = sum(b["attention_mask"].numel() for b in micro)
        live = {}  # variants that read their own batches: a loader each, the same sampler, so the same batches
        own = {}
        for name in names:
            if VARIANTS[name][2] == "own":
                st = stages[name]
                it = train.batches(st.dataset, st.cfg, st.d, st.tok, 0, 0, st.plain.cfg.image_token_id)
                own[name] = [next(it) for _ in range(args.batches)]

        def feed(name):
            if VARIANTS[name][2] is None:
                return iter(micro)
            if name in own:
                return iter(own[name])
            if name not in live:
                st = stages[name]
                live[name] = train.batches(st.dataset, st.cfg, st.d, st.tok, 0, 0, st.plain.cfg.image_token_id)
            return (next(live[name]) for _ in range(args.batches))

        for name in names:  # warm-up: every shape once (compiles happen here)
            with threads_ctx(VARIANTS[name][1]), attention_ctx(stages[name], name):
                t0 = time.perf_counter()
                for b in feed(name):
                    step(stages[name], [b])
                print(f"stage {stage} {name}: warm-up {time.perf_counter() - t0:.1f} s")
        times = {n: [] for n in names}
        counted = {n: [] for n in names}
        rows = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                with threads_ctx(VARIANTS[name][1]), attention_ctx(stages[name], name):
                    t0, n_real, n_rows = time.perf_counter(), 0, 0
                    for b in feed(name):
                        step(stages[name], [b])
                        n_real += int(b["attention_mask"].sum())
                        n_rows += b["attention_mask"].shape[0]
                    times[name].append(time.perf_counter() - t0)
                    counted[name].append(n_real)
                    rows[name].append(n_rows)
        tps = {n: statistics.median(c / t for c, t in zip(counted[n], times[n])) for n in names}
        sps = {n: statistics.median(r / t for r, t in zip(rows[n], times[n])) for n in names}
        base = tps[names[0]]
        print(f"\n## stage {stage} ({first.objective.name}), micro-batch {first.cfg.micro_batch}, {args.batches} "
              f"batches x {args.rounds} rounds; {real / args.batches:.0f} real tokens per batch, "
              f"{1 - real / padded:.1%} padding; loader (no workers) {1000 * load_s:.0f} ms per batch\n")
        print("| variant | tokens/s (median round) | vs " + names[0] + " | samples/s | vs " + names[0] + " | rounds (s) |")
        print("|---|---|---|---|---|---|")
        for name in names:
            print(f"| {name} | {tps[name]:,.0f} | {tps[name] / base:.2f}x | {sps[name]:.2f} | "
                  f"{sps[name] / sps[names[0]]:.2f}x | {', '.join(f'{t:.2f}' for t in times[name])} |")
        print()


@contextlib.contextmanager
def attention_ctx(st, name):
    """The variants named "... bf16 attention" run with model.attend's float32 path switched off."""
    st.plain.set_cpu_attention_fp32(not name.endswith("bf16 attention"))
    try:
        yield
    finally:
        st.plain.set_cpu_attention_fp32(True)


@contextlib.contextmanager
def threads_ctx(n):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


if __name__ == "__main__":
    main()
