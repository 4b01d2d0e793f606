"""
Memory per GPU of the 7B stages (README §Training), estimated from parameter counts: FSDP2 full
sharding over 8 GPUs with bf16 compute. Prints the README's memory table (tests/test_readme.py checks
that they agree; tests/test_throughput.py checks the loss column against the measured peak).

    python bench/memory_budget.py
    python bench/memory_budget.py --simulate   # the simulated peak beside it (bench/memory_sim.py, README §7B)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
import train  # noqa: E402
from model import PRESETS, VTLMM, VTLMMConfig  # noqa: E402


def memory_budget(mcfg: VTLMMConfig, stage, world=8, micro_batch=16, seq_len=2048):
    """Estimated GiB per GPU of one stage under FSDP2 full sharding with bf16 compute:
    fp32 sharded weights, fp32 gradients and AdamW moments of the trained modules (sharded),
    bf16 copies of two gathered blocks (one in use, one prefetched), and activations with
    per-block checkpointing (every block's bf16 input, plus one block recomputed at a time)."""
    with torch.device("meta"):
        m = VTLMM(mcfg)
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in m.named_children()}
    trained = sum(counts[n] for n in train.STAGES[stage]["train"])
    d, dec = mcfg.decoder.dim, mcfg.decoder
    block = counts["decoder"] // max(dec.layers, 1)
    gib = 2 ** 30
    tokens = micro_batch * seq_len
    parts = {
        "weights": 4 * sum(counts.values()) / world,
        "grads+adam": (4 + 8) * trained / world,
        "gathered": 2 * 2 * max(block, counts["mm_head"]),
        # checkpointed block inputs (bf16) and one block's recompute: q,k,v,o, norms, MLP (3 x hidden)
        "activations": 0 if stage == 3 else 2 * tokens * (dec.layers * d + 8 * d + 3 * dec.hidden),
        "loss": loss_buffers(mcfg, stage, tokens),
    }
    if stage == 3:  # no backward through the decoder: activations of one block, no grads kept
        parts["activations"] = 2 * tokens * (8 * d + 3 * dec.hidden)
    return {k: v / gib for k, v in parts.items()} | {"total": sum(parts.values()) / gib}


def loss_buffers(mcfg: VTLMMConfig, stage, tokens):
    """Bytes the chunked loss holds at its peak under the bf16 policy (losses.py), for `tokens` positions:
    per chunk of rows, the bf16 logits of a matmul, their float32 copy and the bf16 gradient (plus the
    target's P' / Q and its logits for Eqs. 6 and 9); the trained head's float32 gradient, a bf16 share of
    one chunk and its bf16 copy; and the gathered rows (bf16) with their gradients (float32 + bf16 copy)."""
    C, d = mcfg.decoder.vocab_size, mcfg.decoder.dim
    chunk = losses._default_chunk(C) * C
    head = C * d
    if stage == 3:  # Eq. 9: both heads' logits per chunk; W_VM trains; rows of the decoder and X_image, no grads
        return 18 * chunk + 8 * head + 2 * 2 * tokens * d
    per_chunk = 8 * chunk + (10 * chunk if stage == 4 else 0)  # Eq. 4 (+ Eq. 6 in stage IV)
    head_grad = 8 * head if "mm_head" in train.STAGES[stage]["train"] else 0
    return per_chunk + head_grad + 8 * tokens * d


def print_memory_budgets():
    """The README's memory table."""
    print("| decoder | stage | trains | micro-batch (x 2048 tokens; III: x 577) | weights | grads+Adam | gathered | "
          "activations | loss | total GiB/GPU (8 GPUs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("vicuna-7b-v1.5", "mistral-7b-instruct-v0.2"):
        mcfg = VTLMMConfig(vision=PRESETS["clip-vit-l14-336"], decoder=PRESETS[name])
        for stage, micro in ((1, 32), (2, 16), (3, 32), (4, 16)):
            seq = 1 + mcfg.vision.num_patches if stage == 3 else 2048  # stage III: BOS + 576 patches
            b = memory_budget(mcfg, stage, 8, micro, seq)
            print(f"| {name} | {'I II III IV'.split()[stage - 1]} | {', '.join(train.STAGES[stage]['train'])} | {micro} | "
                  f"{b['weights']:.1f} | {b['grads+adam']:.1f} | {b['gathered']:.1f} | {b['activations']:.1f} | "
                  f"{b['loss']:.1f} | {b['total']:.1f} |")


if __name__ == "__main__":
    if "--simulate" in sys.argv[1:]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import memory_sim
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--simulate"]
        memory_sim.main()
    else:
        print_memory_budgets()
