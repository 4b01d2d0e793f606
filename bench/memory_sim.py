"""
The 7B stages on 8 GPUs, simulated on the CPU: train.py's own parallelize (FSDP2, bf16 policy, activation
checkpointing) over a fake 8-rank process group, then two optimizer steps (forward through the stage's
losses.Objective, backward, gradient clip, AdamW) with every tensor a FakeTensor, so nothing is computed
and no memory is taken. LocalBytes counts each storage rank 0 would allocate at its local (sharded) size,
from the op that makes it to its release, and reports the peak and the phase it falls in, beside
bench/memory_budget.py's arithmetic (README §7B).

    python bench/memory_sim.py                          # Vicuna-7B and Mistral-7B, stages I-IV, the configs' micro-batches
    python bench/memory_sim.py --decoders vicuna-7b-v1.5 --stages 4 --micro 8
    python bench/memory_sim.py --stages 3 --explain 10  # what is alive at the peak, by the op that made it
    python bench/memory_sim.py --counter tracker        # the same steps under FSDPMemTracker (see LocalBytes)

The simulated device is "cpu" (no GPU here), with FSDP2's GPU behaviour in forward restored (one unit's
all-gather buffer kept until the next's): the counts are the tensors a GPU would hold, without the CUDA
caching allocator's rounding and fragmentation, NCCL's buffers or the CUDA context (a few GiB on a real
GPU, measured by bench/gpu.sh).
"""

import argparse
import os
import weakref
import sys
import time

import common  # noqa: E402,F401 (bench/common.py: the repository on sys.path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import losses  # noqa: E402
import train  # noqa: E402
from memory_budget import memory_budget  # noqa: E402  (bench/ is the script's folder)
from model import PRESETS, VTLMM, DecoderConfig, VisionConfig, VTLMMConfig  # noqa: E402

MICRO = {1: 32, 2: 16, 3: 32, 4: 16}  # configs/stage{1..4}_*.py
GIB = 2 ** 30


class LocalBytes:
    """Bytes that rank 0 holds, counted under the DTensor layer: a FakeTensorMode whose dispatch sees the
    plain (local) tensors DTensor computes with, never a DTensor's global shape. Each storage an op makes is
    counted once (views share it) from its creation until it dies; FSDP2's frees and re-allocations by
    UntypedStorage.resize_ are followed too. DTensor's sharding propagation runs each op it has not seen yet
    on global-shape fake tensors to learn the output's shape (under the active fake mode, which here is this
    one; in a real run a fresh one): metadata only, so nothing made inside it is counted; nor are the
    intermediates of an op's fake implementation (only each op's outputs are). That shadow work is
    what made FSDPMemTracker report full-size AdamW and gradient-clip transients on the first step only.
    `peak` is the largest sum seen, `phase_peaks` the largest in each phase named by mark(), `now` the
    bytes alive now."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode
        tracker = self
        self.live, self.now, self.peak, self.phase_peak, self.phase_peaks = {}, 0, 0, 0, []
        self.paused = self.depth = 0
        self.what, self.func = {}, None  # storage -> the op and shape that made it (for snapshot)
        self.snapshot_at, self.snapshot = None, None  # a byte count: the live storages when it is first reached

        class Mode(FakeTensorMode):
            def dispatch(self, func, types, args=(), kwargs=None):
                # only the outermost op: an op the fake mode has not cached yet runs through its Python
                # reference (prims), whose intermediate tensors come back here too; a real kernel makes
                # only the output
                tracker.depth += 1
                try:
                    out = super().dispatch(func, types, args, kwargs)
                finally:
                    tracker.depth -= 1
                if not tracker.depth:
                    tracker._count(out, func)
                return out

        self.mode = Mode(allow_non_fake_inputs=True)

    def _add(self, storage, what=""):
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = n
        self.what[key] = what
        weakref.finalize(storage, self._gone, key)
        self._move(n)

    def _gone(self, key):
        self.what.pop(key, None)
        self._move(-self.live.pop(key, 0))

    def _move(self, delta):
        self.now += delta
        if self.snapshot_at is not None and self.snapshot is None and self.now >= self.snapshot_at:
            self.snapshot = [(self.live[k], self.what.get(k, "")) for k in self.live]
        if self.now > self.peak:
            self.peak = self.now
        if self.now > self.phase_peak:
            self.phase_peak = self.now

    def _count(self, out, func=None):
        if self.paused:
            return
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and not hasattr(t, "_local_tensor"):
                self._add(t.untyped_storage(), f"{func} {str(t.dtype)[6:]}")

    def _resized(self, storage, old, new):
        key = storage._cdata
        if key in self.live:
            self.live[key] = new
            self._move(new - old)
        elif new:
            self._add(storage, "resize_ (FSDP2 all-gather output)")

    def mark(self, phase):
        self.phase_peaks.append((phase, self.phase_peak))
        self.phase_peak = self.now

    def __enter__(self):
        orig = self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            old = storage.nbytes()
            out = orig(storage, size)
            tracker._resized(storage, old, storage.nbytes())
            return out

        from torch.distributed.tensor._sharding_prop import ShardingPropagator
        meta = self._orig_meta = ShardingPropagator._propagate_tensor_meta_non_cached

        def shape_only(prop, *a, **k):
            tracker.paused += 1
            try:
                return meta(prop, *a, **k)
            finally:
                tracker.paused -= 1

        torch.UntypedStorage.resize_ = resize_
        ShardingPropagator._propagate_tensor_meta_non_cached = shape_only
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
        self.mode.__exit__(*exc)
        torch.UntypedStorage.resize_ = self._orig_resize
        ShardingPropagator._propagate_tensor_meta_non_cached = self._orig_meta


def init_fake_group(world):
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def fake_batch(mcfg, B, T, stage):
    """Real CPU ids/labels/rows (small) as the loader makes them: one image at position 1, text after it;
    stage III: BOS + the patches only. The pixels are a FakeTensor (made inside the mode)."""
    P = mcfg.vision.num_patches
    ids = torch.randint(3, mcfg.decoder.vocab_size - 1, (B, T))
    ids[:, 0] = 1
    ids[:, 1:1 + P] = mcfg.image_token_id
    labels = ids.clone()
    labels[:, :1 + P + (0 if stage == 3 else 20)] = -100
    if stage == 3:
        labels[:] = -100
    rows = losses.batch_rows(labels, ids == mcfg.image_token_id)
    return ids, labels, rows


def simulate(mcfg, stage, micro, world=8, seq=2048, steps=2):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    init_fake_group(world)
    cfg = train.TrainConfig(stage=stage, fsdp="on", dtype="bf16", activation_checkpointing=True, micro_batch=micro)
    d = train.Dist(rank=0, world=world, local_rank=0, device=torch.device("cpu"))
    ids, labels, rows = fake_batch(mcfg, micro, seq, stage)
    n_lm, n_vm = rows.lm.numel() * world, rows.vm.numel() * world
    with torch.device("meta"):  # sharded on meta (the device mesh is made outside the fake mode) ...
        model = VTLMM(mcfg)
    name = train.STAGES[stage]["objective"]
    objective = losses.Objective(model, name)
    train.set_trainable(model, stage)
    model, _ = train.parallelize(model, cfg, d, root=objective)
    with FakeTensorMode(allow_non_fake_inputs=True):  # ... then given fake memory, as load_sharded does
        model.to_empty(device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = train.make_optimizer(params, cfg, torch.device("cuda"))  # the GPUs' fused AdamW (it runs on CPUs too)
        px = torch.empty(micro, 3, mcfg.vision.image_size, mcfg.vision.image_size)
        tracker = FSDPMemTracker(objective, opt)
        tracker.track_inputs((ids, px, labels))
        with tracker:
            for i in range(steps):
                if i:
                    tracker.reset_mod_stats()  # per-module stats are per iteration; the peak is kept
                loss, lm, vm = objective(ids, px, labels, rows, n_lm / world, n_vm / world)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        peak = tracker.get_tracker_snapshot("peak")
        local = lambda v: v._local_tensor if hasattr(v, "_local_tensor") else v  # noqa: E731
        state_bytes = sum(local(v).numel() * v.element_size() for st in opt.state.values() for v in st.values()
                          if torch.is_tensor(v))
        print(f"<!-- AdamW state held on rank 0 after the steps (local shards): {state_bytes / GIB:.2f} GiB; "
              f"a state tensor: {[(type(v).__name__, tuple(local(v).shape)) for v in next(iter(opt.state.values())).values()]} -->",
              file=sys.stderr)
    dev = next(k for k in peak if isinstance(k, torch.device))
    by_kind = {str(k): v for k, v in peak[dev].items()}
    return by_kind


def simulate_local(mcfg, stage, micro, world=8, seq=2048, steps=2, snapshot_at=None, dtype="bf16"):
    """As `simulate`, counted by LocalBytes (local shards only) instead of FSDPMemTracker. Returns the peak,
    the phase it fell in, each phase's peak, and what rank 0 holds: the parameter shards, the gradient
    shards (after the backward of the last step) and the AdamW state (after its update), in bytes."""
    init_fake_group(world)
    cfg = train.TrainConfig(stage=stage, fsdp="on", dtype=dtype, activation_checkpointing=True, micro_batch=micro)
    d = train.Dist(rank=0, world=world, local_rank=0, device=torch.device("cpu"))
    ids, labels, rows = fake_batch(mcfg, micro, seq, stage)
    n_lm, n_vm = rows.lm.numel() * world, rows.vm.numel() * world
    with torch.device("meta"):
        model = VTLMM(mcfg)
    objective = losses.Objective(model, train.STAGES[stage]["objective"])
    train.set_trainable(model, stage)
    model, _ = train.parallelize(model, cfg, d, root=objective)
    # parallelize frees each forward all-gather buffer early on CPUs (train.py); GPUs keep FSDP2's default,
    # one unit's buffer held until the next all-gather, and the simulation stands for the GPUs
    objective._set_unshard_async_op(False)
    local = lambda v: v._local_tensor if hasattr(v, "_local_tensor") else v  # noqa: E731
    def nbytes(ts):  # each storage once: FSDP2's gradient shards are views of one reduce-scatter output
        seen = {}
        for t in ts:
            st = local(t).untyped_storage()
            seen[st._cdata] = st.nbytes()
        return sum(seen.values())
    counter = LocalBytes()
    counter.snapshot_at = snapshot_at
    with counter:
        model.to_empty(device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = train.make_optimizer(params, cfg, torch.device("cuda"))  # the GPUs' fused AdamW (it runs on CPUs too)
        px = torch.empty(micro, 3, mcfg.vision.image_size, mcfg.vision.image_size)
        counter.mark("setup")
        grads = 0
        for i in range(steps):
            loss, lm, vm = objective(ids, px, labels, rows, n_lm / world, n_vm / world)
            counter.mark(f"forward {i + 1}")
            loss.backward()
            counter.mark(f"backward {i + 1}")
            grads = nbytes(p.grad for p in params if p.grad is not None)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            counter.mark(f"clip {i + 1}")
            opt.step()
            counter.mark(f"optimizer step {i + 1}")
            opt.zero_grad(set_to_none=True)
            del loss, lm, vm
        state = nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
        weights = nbytes(model.parameters())
    phase = max(counter.phase_peaks[1:], key=lambda x: x[1])[0]
    return dict(peak=counter.peak, phase=phase, phases=counter.phase_peaks, weights=weights, grads=grads,
                state=state, end=counter.now, snapshot=counter.snapshot)


# a model small enough to train for real on a CPU in seconds, large enough that tensors dominate its memory
SMALL = VTLMMConfig(vision=VisionConfig(image_size=224, patch_size=16, width=512, layers=4, heads=8, mlp=2048),
                    decoder=DecoderConfig(vocab_size=8192, dim=1024, layers=4, heads=8, kv_heads=8, hidden=2816,
                                          max_seq_len=1024))


def measure_real(mcfg, stage, micro, seq, steps=2, dtype="fp32"):
    """The same steps for real on this CPU (the check of the simulation): FSDP2 over a gloo group of one
    process, glibc told to return large frees (train.return_large_frees_to_os, so RSS follows the tensors).
    Each phase's VmHWM (reset through /proc/self/clear_refs) minus the RSS with the model still on meta."""
    import gc
    train.return_large_frees_to_os()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = train.TrainConfig(stage=stage, fsdp="on", dtype=dtype, activation_checkpointing=True, micro_batch=micro)
    d = train.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    ids, labels, rows = fake_batch(mcfg, micro, seq, stage)
    with torch.device("meta"):
        model = VTLMM(mcfg)
    objective = losses.Objective(model, train.STAGES[stage]["objective"])
    train.set_trainable(model, stage)
    model, _ = train.parallelize(model, cfg, d, root=objective)
    px = torch.randn(micro, 3, mcfg.vision.image_size, mcfg.vision.image_size)

    status = common.proc_status

    def mark(name):
        phases.append((name, status("VmHWM") - start))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    gc.collect()
    start, phases = status("VmRSS"), []
    mark("start")
    model.to_empty(device="cpu")
    model.init_weights()  # writes every shard: untouched pages would not count
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(params, cfg, torch.device("cuda"))  # fused AdamW, as simulated
    mark("setup")
    for i in range(steps):
        loss, lm, vm = objective(ids, px, labels, rows, float(rows.lm.numel()), float(rows.vm.numel()))
        mark(f"forward {i + 1}")
        loss.backward()
        mark(f"backward {i + 1}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        mark(f"clip {i + 1}")
        opt.step()
        mark(f"optimizer step {i + 1}")
        opt.zero_grad(set_to_none=True)
        del loss, lm, vm
    dist.destroy_process_group()
    return phases[1:]


def validate(args):
    """SMALL at world 1 simulated here and trained for real in a subprocess; each phase's peak side by side."""
    import json
    import subprocess
    stage, micro, seq = int(args.stages.split(",")[0]), args.micro or 2, args.seq
    if args.real:
        print(json.dumps(measure_real(SMALL, stage, micro, seq)))
        return
    r = simulate_local(SMALL, stage, micro, 1, seq, dtype="fp32")
    dist.destroy_process_group()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--validate", "--real", "--stages", str(stage),
                          "--micro", str(micro), "--seq", str(seq)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    real = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    with torch.device("meta"):
        n = sum(p.numel() for p in VTLMM(SMALL).parameters())
    print(f"SMALL ({n / 1e6:.0f}M parameters: decoder dim 1024 x 4 blocks, vision 512 x 4, vocabulary 8192), "
          f"stage {stage}, micro-batch {micro} x {seq}, float32, FSDP2 world 1\n")
    print("| phase | simulated MiB | measured MiB (VmHWM above the start) | measured / simulated |")
    print("|---|---|---|---|")
    rows = [(phase, sim, real[phase]) for phase, sim in r["phases"] if phase in real]
    for phase, sim, got in rows:
        print(f"| {phase} | {sim / mib:.0f} | {got / mib:.0f} | {got / sim:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


def explain(mcfg, stage, micro, world, seq, peak):
    """What is alive at the peak (a second run, stopped at the first moment the peak is reached): bytes by the
    op that made each storage, largest first."""
    r = simulate_local(mcfg, stage, micro, world, seq, snapshot_at=peak)
    by = {}
    for n, what in r["snapshot"] or []:
        by[what] = by.get(what, 0) + n
    return sorted(by.items(), key=lambda kv: -kv[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoders", default="vicuna-7b-v1.5,mistral-7b-instruct-v0.2")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--micro", type=int, default=0, help="micro-batch for every stage (0: the configs')")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--layers", type=int, default=0, help="cut the decoder to this many blocks (a quick dry run)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", default="", help="also write the results (bytes) to this file")
    ap.add_argument("--explain", type=int, default=0, help="list the N largest kinds of storage alive at the peak")
    ap.add_argument("--counter", default="local", choices=["local", "tracker"],
                    help="local: LocalBytes (local shards under the DTensor layer); tracker: FSDPMemTracker")
    ap.add_argument("--validate", action="store_true",
                    help="check the count: a small model at world 1, simulated and trained for real, phase by phase")
    ap.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.validate:
        return validate(args)
    if args.counter == "local":
        return main_local(args)
    print("| decoder | stage | micro-batch | simulated peak GiB/GPU | of which: params / grads / optimizer / "
          "activations + temporaries | arithmetic (memory_budget.py) | simulated / arithmetic |")
    print("|---|---|---|---|---|---|---|")
    for name, mcfg, stage, micro, seq in cases(args):
        t0 = time.perf_counter()
        kinds = simulate(mcfg, stage, micro, args.world, seq)
        arith = memory_budget(mcfg, stage, args.world, micro, seq)["total"]
        groups = (("SHARDED_PARAM", "UNSHARDED_PARAM", "BUFFER"), ("SHARDED_GRAD", "UNSHARDED_GRAD"), ("OPT",),
                  ("ACT", "TEMP", "ALL_GATHER", "REDUCE_SCATTER", "INP"))
        kinds = {k.split(".")[-1]: v for k, v in kinds.items()}
        total = kinds["Total"]
        parts = " / ".join(f"{sum(kinds.get(k, 0) for k in ks) / GIB:.1f}" for ks in groups)
        print(f"| {name} | {'I II III IV'.split()[stage - 1]} | {micro} | {total / GIB:.1f} | {parts} | "
              f"{arith:.1f} | {total / GIB / arith:.2f} |", flush=True)
        print(f"<!-- {name} stage {stage}: {time.perf_counter() - t0:.0f} s; {kinds} -->", file=sys.stderr)
    dist.destroy_process_group()


def cases(args):
    """(decoder name, model config, stage, micro-batch, sequence length) for every row of the table."""
    import dataclasses
    for name in args.decoders.split(","):
        dec = PRESETS[name]
        if args.layers:
            dec = dataclasses.replace(dec, layers=args.layers)
        mcfg = VTLMMConfig(vision=PRESETS["clip-vit-l14-336"], decoder=dec)
        for stage in (int(s) for s in args.stages.split(",")):
            seq = 1 + mcfg.vision.num_patches if stage == 3 else args.seq
            yield name, mcfg, stage, args.micro or MICRO[stage], seq


def main_local(args):
    """The table with LocalBytes: the simulated peak beside memory_budget.py's parts and total."""
    print("| decoder | stage | micro-batch | simulated peak GiB/GPU | peak in | weights / gradients / AdamW (shards) | "
          "the rest at the peak | arithmetic total (memory_budget.py) | simulated / arithmetic |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, mcfg, stage, micro, seq in cases(args):
        t0 = time.perf_counter()
        r = simulate_local(mcfg, stage, micro, args.world, seq)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in VTLMM(mcfg).parameters())
        results.append({k: v for k, v in r.items() if k != "snapshot"} | {"decoder": name, "stage": stage,
                                                                           "micro": micro, "params": n_params})
        b = memory_budget(mcfg, stage, args.world, micro, seq)
        # what else is alive at the peak: the gradient shards made so far, gathered weights, activations,
        # the loss's buffers, temporaries (AdamW's state exists from the first update on)
        held = r["weights"] + (r["state"] if not r["phase"].endswith(" 1") else 0)
        print(f"| {name} | {'I II III IV'.split()[stage - 1]} | {micro} | {r['peak'] / GIB:.1f} | {r['phase']} | "
              f"{r['weights'] / GIB:.1f} / {r['grads'] / GIB:.1f} / {r['state'] / GIB:.1f} | "
              f"{(r['peak'] - held) / GIB:.1f} | {b['total']:.1f} | {r['peak'] / GIB / b['total']:.2f} |", flush=True)
        print(f"<!-- {name} stage {stage}: {time.perf_counter() - t0:.0f} s; arithmetic parts "
              f"{ {k: round(v, 2) for k, v in b.items()} }; phase peaks GiB "
              f"{[(ph, round(v / GIB, 2)) for ph, v in r['phases']]}; alive after the steps "
              f"{r['end'] / GIB:.2f} GiB -->", file=sys.stderr)
        if args.explain:
            top = explain(mcfg, stage, micro, args.world, seq, r["peak"])[:args.explain]
            print(f"<!-- {name} stage {stage}, alive at the peak, by the op that made it (GiB): "
                  + "; ".join(f"{w} {n / GIB:.2f}" for w, n in top) + " -->", file=sys.stderr)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
