"""GPU checks that bench/gpu.sh runs after its training runs (one GPU, a few minutes):

    python bench/gpu.py layers   # 7B widths cut to 2 and 4 blocks: per-block step time and memory, 16 x 2048, eager and compiled
    python bench/gpu.py full     # all 32 blocks, world 1: stage IV steps (largest micro-batch that fits) and stage III
    python bench/gpu.py decode   # batch-1 greedy decoding at full 7B depth: eager and compiled vs the roofline
    python bench/gpu.py answer   # eval-style batched answering at full 7B depth: questions/s, eager and compiled
    python bench/gpu.py parity   # model vs transformers on CUDA; chunked losses vs full; no host sync per step

Each prints Markdown lines; gpu.sh collects them. Needs CUDA (GPU_PY_DEVICE=cpu DRY=1: a dry run of the
code paths on a small model).
"""

import json
import os
import sys
import time

import common  # bench/common.py: the repository on sys.path, timing
sys.path.insert(0, os.path.join(common.ROOT, "tests"))

import torch

import inference
import losses
from model import PRESETS, VTLMM, VTLMMConfig
import weights

DEV = torch.device(os.environ.get("GPU_PY_DEVICE", "cuda"))  # cpu only for a dry run of the code paths
CUDA = DEV.type == "cuda"


def sync():
    common.sync("cuda" if CUDA else "cpu")


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else float("nan")
# HBM bandwidth by device name, GB/s, from NVIDIA's datasheets (H100 SXM 3.35 TB/s, PCIe 2.0, NVL 3.9;
# H200 4.8; A100 80GB SXM 2.039, 40GB 1.555); anything else: pass BANDWIDTH_GBS.
BANDWIDTH = [("H100.*NVL", 3900), ("H100.*PCIe", 2000), ("H100", 3350), ("H200", 4800),
             ("A100.*80GB", 2039), ("A100", 1555)]


def bandwidth():
    import re
    if os.environ.get("BANDWIDTH_GBS"):
        return float(os.environ["BANDWIDTH_GBS"]) * 1e9
    name = torch.cuda.get_device_name()
    for pat, gbs in BANDWIDTH:
        if re.search(pat, name):
            return gbs * 1e9
    return None


def fsdp_world1(model, root):
    """FSDP2 on one process (NCCL), bf16 params, float32 reductions: train.parallelize's policy, with
    `root` (a losses.Objective holding the model) as the root unit, which keeps its inputs' dtypes."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29591")
        dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.decoder.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model.vision, mp_policy=mp)
    fully_shard(root, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                     cast_forward_inputs=False))
    return model


def batch_7b(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = cfg.vision.num_patches
    ids = torch.randint(3, cfg.decoder.vocab_size - 1, (B, T), generator=g)
    ids[:, 0] = 1
    ids[:, 35:35 + P] = cfg.image_token_id
    labels = ids.clone()
    labels[:, :35 + P + 20] = -100
    px = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, px, labels


def layers():
    """Stage IV step (forward + backward, activation checkpointing, chunked loss) of a model with Vicuna-7B
    widths and 2, then 4 decoder blocks, at micro-batch 16 x 2048: the difference is two blocks' cost."""
    B, T = int(os.environ.get("LAYERS_B", 16)), int(os.environ.get("LAYERS_T", 2048))
    variants = os.environ.get("LAYERS_VARIANTS", "eager,compiled").split(",")
    block = {}
    for variant in variants:
        block[variant] = layers_variant(B, T, variant == "compiled")
    if "eager" in block and "compiled" in block:
        print(f"- compiled block / eager block: {block['eager'] / block['compiled']:.2f}x faster")


def layers_variant(B, T, compiled):
    """One variant of layers(): eager, or every block compiled (train.compile_blocks, before sharding as in
    train.parallelize). Returns the per-block time."""
    import train
    tag = "compiled" if compiled else "eager"
    res = {}
    for n in (2, 4):
        dec = PRESETS[os.environ.get("LAYERS_PRESET", "vicuna-7b-v1.5")]
        dec = type(dec)(**{**dec.__dict__, **json.loads(os.environ.get("LAYERS_DECODER", "{}")), "layers": n})
        vis = PRESETS["clip-vit-l14-336"]  # dry runs on a CPU: LAYERS_DECODER / LAYERS_VISION, JSON as FULL_*
        vis = type(vis)(**{**vis.__dict__, **json.loads(os.environ.get("LAYERS_VISION", "{}"))})
        cfg = VTLMMConfig(vision=vis, decoder=dec, image_token_id=dec.vocab_size - 1)
        with torch.device("meta"):
            model = VTLMM(cfg)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "mm_head.")))
        model.set_checkpointing(True)
        if compiled:
            if n == 2:  # the 4-block model reuses the 2-block model's graphs (same widths): compiled once
                torch._dynamo.reset()
            train.compile_blocks(model)
        objective = losses.Objective(model, "mm")
        model = fsdp_world1(model, objective)
        model.to_empty(device=DEV)
        model.init_weights()
        ids, px, labels = batch_7b(cfg, B, T)
        rows = losses.batch_rows(labels, ids == cfg.image_token_id)
        ids, px, labels = ids.to(DEV), px.to(DEV), labels.to(DEV)
        counts = (float(rows.lm.numel()), float(rows.vm.numel()))
        times = []
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        for i in range(int(os.environ.get("LAYERS_STEPS", 4))):
            sync()
            t = time.perf_counter()
            loss, _, _ = objective(ids, px, labels, rows.to(DEV), counts[0], counts[1])
            loss.backward()
            sync()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        res[n] = (min(times[1:]), peak_gib())
        print(f"- {tag}, {n} blocks: step {res[n][0] * 1e3:.0f} ms (first, with compiles: {times[0]:.1f} s), "
              f"peak {res[n][1]:.1f} GiB (B={B}, T={T}, stage IV)")
        del model, objective, loss
        if CUDA:
            torch.cuda.empty_cache()
    dt, dm = (res[4][0] - res[2][0]) / 2, (res[4][1] - res[2][1]) / 2
    c = dec
    block_params = 4 * c.dim * c.dim + 3 * c.dim * c.hidden  # q, k, v, o and the SwiGLU MLP (norms aside)
    flops = (6 * block_params + 12 * c.heads * c.hd * T) * B * T  # model FLOPs (recompute not counted)
    peak = float(os.environ.get("PEAK_FLOPS", 0)) or None
    if not peak:
        import metrics
        peak = metrics.gpu_peak_flops(torch.cuda.get_device_name(), "bf16") if CUDA else None
    mfu = f", block MFU {flops / dt / peak:.1%}" if peak else ""
    print(f"- {tag}: per decoder block (Vicuna-7B widths, {B} x {T}, fwd + bwd with recompute): {dt * 1e3:.1f} ms, "
          f"{dm:.2f} GiB{mfu}; x 32 blocks = {32 * dt:.2f} s per micro-batch")
    return dt


def full_step():
    """Full depth: every block of Vicuna-7B (FULL_LAYERS to cut it for a dry run), FSDP2 world 1, bf16 policy,
    activation checkpointing, fused AdamW: stage IV optimizer steps at the largest micro-batch of FULL_B
    (tried largest first) that fits, then stage III (the VM head alone trains, BOS + 576 patches) at
    micro-batch 32. Prints step time, tokens/s, MFU (model FLOPs as train.py counts them) and peak memory."""
    import train
    T = int(os.environ.get("FULL_T", 2048))
    n_layers = int(os.environ.get("FULL_LAYERS", 0))
    steps = int(os.environ.get("FULL_STEPS", 3))
    compiled = os.environ.get("FULL_COMPILE", "0") == "1"
    for stage, sizes in ((4, os.environ.get("FULL_B", "8,6,4,2,1")), (3, os.environ.get("FULL_B3", "32,16"))):
        for B in (int(b) for b in sizes.split(",")):
            try:
                line = full_step_one(stage, B, T, n_layers, steps, compiled, train)
                print(line)
                break
            except torch.OutOfMemoryError:
                print(f"- stage {'III' if stage == 3 else 'IV'}, micro-batch {B}: out of memory, trying smaller")
            finally:
                import gc
                gc.collect()
                if CUDA:
                    torch.cuda.empty_cache()


def full_step_one(stage, B, T, n_layers, steps, compiled, train):
    dec = PRESETS[os.environ.get("FULL_PRESET", "vicuna-7b-v1.5")]
    if n_layers:
        dec = type(dec)(**{**dec.__dict__, "layers": n_layers})
    vis = PRESETS["clip-vit-l14-336"]
    # dry runs on a CPU: FULL_DECODER / FULL_VISION = JSON of fields to change, e.g. '{"dim": 256, "hidden": 512}'
    dec = type(dec)(**{**dec.__dict__, **json.loads(os.environ.get("FULL_DECODER", "{}"))})
    vis = type(vis)(**{**vis.__dict__, **json.loads(os.environ.get("FULL_VISION", "{}"))})
    cfg = VTLMMConfig(vision=vis, decoder=dec, image_token_id=dec.vocab_size - 1)
    if stage == 3:
        T = 1 + cfg.vision.num_patches
    with torch.device("meta"):
        model = VTLMM(cfg)
    train.set_trainable(model, stage)
    model.set_checkpointing(True)
    if compiled:
        torch._dynamo.reset()
        train.compile_blocks(model)
    objective = losses.Objective(model, train.STAGES[stage]["objective"])
    model = fsdp_world1(model, objective)
    model.to_empty(device=DEV)
    model.init_weights()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(params, train.TrainConfig(lr=1e-5), DEV)
    ids, px, labels = batch_7b(cfg, B, T) if stage == 4 else stage3_batch(cfg, B)
    rows = losses.batch_rows(labels, ids == cfg.image_token_id)
    ids, px, labels = ids.to(DEV), px.to(DEV), labels.to(DEV)
    counts = (float(max(rows.lm.numel(), 1)), float(rows.vm.numel()))
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first step allocates AdamW's state (and compiles): not timed
        sync()
        t = time.perf_counter()
        loss, _, _ = objective(ids, px, labels, rows.to(DEV), counts[0], counts[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    dt = min(times[1:])
    fpt = {3: 2 / 6}.get(stage, 1.0) * model.flops_per_token(T)  # train.Stage.flops_per_token
    import metrics
    peak = float(os.environ.get("PEAK_FLOPS", 0)) or (metrics.gpu_peak_flops(torch.cuda.get_device_name(), "bf16")
                                                       if CUDA else None)
    mfu = f", MFU {fpt * B * T / dt / peak:.1%}" if peak else ""
    n = model.num_params()
    del model, objective, opt, params, loss
    return (f"- stage {'III' if stage == 3 else 'IV'}, {dec.layers} blocks ({n / 1e9:.2f}B parameters), "
            f"{'compiled' if compiled else 'eager'}, micro-batch {B} x {T}: step {dt:.2f} s "
            f"(first {times[0]:.1f} s), {B * T / dt:,.0f} tokens/s{mfu}, peak {peak_gib():.1f} GiB")


def stage3_batch(cfg, B):
    """Stage III's samples: BOS + the image's patches, no text (Eq. 9 on every image position)."""
    P = cfg.vision.num_patches
    ids = torch.full((B, 1 + P), cfg.image_token_id)
    ids[:, 0] = 1
    labels = torch.full_like(ids, -100)
    px = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size)
    return ids, px, labels


def decode_cfg():
    """Vicuna-7B shapes at DECODE_LAYERS blocks (default 32, the full depth) with the CLIP ViT-L/14-336
    tower; DRY=1: a small model of the same kind, for a dry run of the code paths on the CPU."""
    dec, vis = PRESETS["vicuna-7b-v1.5"], PRESETS["clip-vit-l14-336"]
    n = int(os.environ.get("DECODE_LAYERS", 32))
    if os.environ.get("DRY"):
        dec = type(dec)(**{**dec.__dict__, "dim": 256, "heads": 4, "kv_heads": 4, "hidden": 512, "vocab_size": 2000})
        vis = type(vis)(**{**vis.__dict__, "width": 64, "layers": 2, "heads": 2, "mlp": 128})
    return VTLMMConfig(vision=vis, decoder=type(dec)(**{**dec.__dict__, "layers": n}),
                       image_token_id=dec.vocab_size - 1)


_DECODE_MODEL = []


def decode_model():
    """The decode_cfg model, built once per process: bf16 from the start, random weights drawn on the
    device (a normal of std 0.02; norms 1, biases 0), warmed up on a 64-token prompt: (model, prompt
    ids, blocks)."""
    if _DECODE_MODEL:
        return _DECODE_MODEL[0]
    cfg = decode_cfg()
    with torch.device("meta"):
        model = VTLMM(cfg).to(torch.bfloat16)
    model = model.to_empty(device=DEV).eval()
    g = torch.Generator(DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    ids = torch.randint(3, cfg.decoder.vocab_size - 1, (1, 64), device=DEV)
    inference.generate(model, ids, max_new_tokens=8)
    _DECODE_MODEL.append((model, ids, cfg.decoder.layers))
    return _DECODE_MODEL[0]


def timed(fn):
    return common.timed(fn, "cuda" if CUDA else "cpu")


PATHS = [("growing cache, eager", dict(static=False)),  # the path before the static cache
         ("static cache, eager", dict(compile=False)),
         ("static cache, compiled" + (" (CUDA graphs)" if CUDA else ""), dict(compile=True))]


def decode():
    """Greedy batch-1 decoding at full 7B depth, bf16, three ways: new tokens/s after the prefill
    (generate(n) - generate(1), best of 2) against the roofline bandwidth / (bytes of weights read per
    token); the compiled path's first call (compilation) is timed apart."""
    model, ids, n = decode_model()
    new = int(os.environ.get("DECODE_NEW", 128))
    weight_bytes = 2 * (model.num_params("decoder") - model.decoder.embed.weight.numel() + model.mm_head.weight.numel())
    bw = bandwidth() if CUDA else None
    roof = bw / weight_bytes if bw else None
    ref = None
    rows = []
    for name, kw in PATHS:
        t_first, out = timed(lambda: inference.generate(model, ids, max_new_tokens=new, **kw))
        ref = out if ref is None else ref
        same = int((out[0, ids.shape[1]:] == ref[0, ids.shape[1]:]).sum())
        t1 = min(timed(lambda: inference.generate(model, ids, max_new_tokens=1, **kw))[0] for _ in range(2))
        tn = min(timed(lambda: inference.generate(model, ids, max_new_tokens=new, **kw))[0] for _ in range(2))
        tok_s = (new - 1) / (tn - t1)
        line = f"- batch-1 greedy decoding, {name}, Vicuna-7B widths x {n} blocks, bf16: **{tok_s:.0f} tokens/s**"
        if roof:
            line += f" = {tok_s / roof:.0%} of the roofline"
        line += f"; {same}/{new} tokens as the first path; first call {t_first:.1f} s"
        rows.append(line)
    if roof:
        rows.append(f"- roofline: {roof:.0f} tokens/s ({bw / 1e12:.2f} TB/s / {weight_bytes / 1e9:.2f} GB of weights "
                    f"per token)")
    print("\n".join(rows), flush=True)


def answer():
    """eval.py's batched answering at full 7B depth, bf16: ANSWER_Q questions (default 64) in batches of
    ANSWER_B (16), each one image (576 patches) and a question of 8 to 40 tokens, left-padded, up to
    ANSWER_NEW (16) new tokens (no stop: random weights), static cache eager vs compiled: questions/s,
    the compiled path's first batch (compilation) timed apart."""
    model, _, n = decode_model()
    cfg = model.cfg
    B, Q, new = (int(os.environ.get(k, d)) for k, d in (("ANSWER_B", 16), ("ANSWER_Q", 64), ("ANSWER_NEW", 16)))
    g = torch.Generator().manual_seed(3)
    P = cfg.vision.num_patches
    batches = []
    for i in range(0, Q, B):
        rows = [[1] + torch.randint(3, cfg.decoder.vocab_size - 1, (34,), generator=g).tolist() +
                [cfg.image_token_id] * P +
                torch.randint(3, cfg.decoder.vocab_size - 1, (int(torch.randint(8, 41, (1,), generator=g)),),
                              generator=g).tolist() for _ in range(min(B, Q - i))]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = True
        px = torch.randn(len(rows), 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        batches.append((ids.to(DEV), px.to(DEV, torch.bfloat16), mask.to(DEV)))

    def run(kw):
        return [inference.generate(model, ids, px, attention_mask=mask, max_new_tokens=new, **kw) for ids, px, mask in batches]

    outs = {}
    for name, kw in PATHS[1:]:
        t_first, _ = timed(lambda: inference.generate(model, *batches[0][:2], attention_mask=batches[0][2], max_new_tokens=new,
                                                  **kw))
        t, outs[name] = min((timed(lambda: run(kw)) for _ in range(2)), key=lambda r: r[0])
        print(f"- eval-style answering, {name}, Vicuna-7B widths x {n} blocks, bf16, {Q} questions in batches of "
              f"{B} (one image each, up to {new} new tokens): **{Q / t:.2f} questions/s**; first batch "
              f"{t_first:.1f} s", flush=True)
    a, b = outs.values()
    same = sum(int((x[:, -new:] == y[:, -new:]).sum()) for x, y in zip(a, b))  # the new tokens only
    print(f"- the two paths' new tokens: {same}/{sum(x[:, -new:].numel() for x in a)} equal")


def decode_profile():
    """Where batch-1 decoding spends its time: torch.profiler over 16 new tokens of the decode_model
    (top ops by CPU and by device time), and the wall time per step, synchronised after each."""
    from torch.profiler import ProfilerActivity, profile
    model, ids, _ = decode_model()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        inference.generate(model, ids, max_new_tokens=17)
        sync()
    print("```")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=50))
    if CUDA:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50))
    print("```")
    steps = []
    for tok in inference.generate_stream(model, ids, max_new_tokens=33):
        sync()
        steps.append(time.perf_counter())
    dts = sorted(b - a for a, b in zip(steps[1:], steps[2:]))
    print(f"- per decode step (synced): median {dts[len(dts) // 2] * 1e3:.2f} ms, min {dts[0] * 1e3:.2f} ms")


def parity():
    """On CUDA: logits vs transformers (float32, TF32 off), the chunked losses vs full logits in float32
    and bf16, and a training micro-step with torch.cuda.set_sync_debug_mode('error')."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from hf_tiny import save_new_layout, tiny_llava
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_llava().to(DEV)
        path = save_new_layout(hf.cpu(), tmp + "/m")
        hf = hf.to(DEV)
        nano = weights.from_pretrained(path, device=DEV).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 30), generator=g)
    ids[:, 3:19] = 250
    px = torch.randn(2, 3, 32, 32, generator=g)
    ids, px = ids.to(DEV), px.to(DEV)
    with torch.no_grad():
        a = nano(ids, px).logits
        b = hf(input_ids=ids, pixel_values=px).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"- logits vs transformers on CUDA, float32: max rel err {err:.1e} ({'ok' if err < 1e-4 else 'FAIL'})")

    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(2)
        B, T, C, d = 2, 1024, 32000, 256
        hidden = torch.randn(B, T, d, generator=g).to(DEV, dtype).requires_grad_()
        w = (torch.randn(C, d, generator=g) * 0.05).to(DEV, dtype).requires_grad_()
        wv = (torch.randn(C, d, generator=g) * 0.05).to(DEV, dtype)
        im = torch.zeros(B, T, dtype=torch.bool, device=DEV)
        im[:, 1:577] = True
        labels = torch.randint(0, C, (B, T), generator=g).to(DEV)
        labels[im] = -100
        x = torch.randn(int(im.sum()), d, generator=g).to(DEV, dtype)
        lm, vm = losses.chunked_mm_loss(hidden, w, labels, im, x, wv)
        h32 = hidden.detach().float()
        ref = losses.mm_loss(h32 @ w.detach().float().T, labels, x.float() @ wv.float().T, im)
        rel = max(abs(lm.item() - ref[1].item()) / ref[1].item(), abs(vm.item() - ref[2].item()) / ref[2].item())
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        print(f"- chunked LM + VM vs full float32 logits on CUDA, {str(dtype)[6:]} inputs: rel diff {rel:.1e} "
              f"({'ok' if rel <= tol else 'FAIL'}, tolerance {tol})")
        keep = losses.batch_rows(None, im)
        hq, xv = h32.reshape(-1, d)[keep.vm.to(DEV)], x.detach()[keep.vm_keep.to(DEV)]
        fit = losses.chunked_vm_fit_loss(hq.to(dtype), w.detach(), xv, wv)
        fref = losses.vm_fit_rows(hq @ w.detach().float().T, xv.float() @ wv.float().T)
        rel = abs(fit.item() - fref.item()) / fref.item()
        print(f"- chunked Eq. 9 vs full logits on CUDA, {str(dtype)[6:]}: rel diff {rel:.1e} "
              f"({'ok' if rel <= tol else 'FAIL'})")

    model = nano.train()
    ids2, px2 = ids.cpu(), px
    labels = ids2.clone()
    labels[ids2 == 250] = -100
    rows = losses.batch_rows(labels, ids2 == 250)
    counts = (float(rows.lm.numel()), float(rows.vm.numel()))
    rows_d = rows.to(DEV)
    labels_d = labels.to(DEV, non_blocking=True)
    ids_d = ids2.to(DEV)
    if DEV.type != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = losses.Objective(model, "mm")(ids_d, px2, labels_d, rows_d, counts[0], counts[1])
        loss.backward()
        ok = "ok: no host sync"
    except RuntimeError as e:
        ok = f"FAIL: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"- training micro-step (stage IV, rows from the CPU) under set_sync_debug_mode('error'): {ok}")


if __name__ == "__main__":
    for mode in sys.argv[1:]:  # several modes share one process (decode answer: one 7B model built once)
        {"layers": layers, "full": full_step, "decode": decode, "answer": answer, "decode-profile": decode_profile,
         "parity": parity}[mode]()
