"""
Memory per GPU of the 7B stages (README §Training), estimated from parameter counts: FSDP2 full
sharding over 8 GPUs with bf16 compute. Prints the README's memory table (tests/test_readme.py checks
that they agree; tests/test_throughput.py checks the loss column against the measured peak).

    python bench/memory_budget.py

bench/memory_sim.py simulates the same stages and prints its peak beside this arithmetic (it imports
this file; this file imports nothing of it).
"""

import torch

import common  # noqa: E402,F401 (bench/common.py: the repository on sys.path)
import fused_losses  # noqa: E402
import train  # noqa: E402
from model import PRESETS, VTLMM, VTLMMConfig  # noqa: E402


def memory_budget(mcfg: VTLMMConfig, stage, world=8, micro_batch=16, seq_len=2048):
    """Estimated GiB per GPU at the peak of one stage's step under FSDP2 full sharding with bf16 compute, each
    term as bench/memory_sim.py finds it alive at the peak (`--explain`):
    fp32 sharded weights; the AdamW moments of the trained modules (sharded) and, of the gradients, only one
    block's unsharded float32 gradient before its reduce-scatter (the peak is at the start of the backward,
    when few gradient shards exist yet; on few GPUs, where the shards outweigh the activations, at its end,
    with every shard and no checkpoint); bf16 gathered weights: the root's (embedding, adapter, both heads,
    held through the step) and two blocks (one in use, one kept by FSDP2 until the next all-gather);
    activations with per-block checkpointing: every block's bf16 input, plus the one block whose recompute its
    backward holds; the chunked loss's buffers. Stage III runs the model without gradients: its peak is one
    block's forward or the loss, whichever is larger, never both."""
    with torch.device("meta"):
        m = VTLMM(mcfg)
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in m.named_children()}
    trained = sum(counts[n] for n in train.STAGES[stage]["train"])
    d, dec = mcfg.decoder.dim, mcfg.decoder
    kv = dec.kv_heads * dec.hd
    block = sum(p.numel() for p in m.decoder.blocks[0].parameters()) if dec.layers else 0
    root = counts["decoder"] - block * dec.layers + sum(counts[n] for n in ("adapter", "mm_head", "vm_head"))
    gib = 2 ** 30
    tokens = micro_batch * seq_len
    decoder_trains = "decoder" in train.STAGES[stage]["train"]
    # one block's recompute as its backward holds it, bytes per token: the two RMSNorms' float32 copies of
    # the input (2 x 4d), q and k after the rotation, v, the attention output and the normed input (bf16),
    # and the MLP's gate, up, SiLU and product tensors with their gradients (6 hidden-sized, bf16)
    held_by_backward = 8 * d + 2 * d + 2 * kv + 2 * kv + 2 * d + 2 * d + 12 * dec.hidden
    activations = 2 * tokens * dec.layers * d + tokens * held_by_backward
    # the backward's peak is at its start (every checkpoint, one block's gradient) or, when the gradient
    # shards outweigh the activations (few GPUs), at its end (every gradient shard, the checkpoints freed)
    at_start, at_end = (4 * block if decoder_trains else 0) + activations, 4 * trained / world
    grads, activations = (at_start - activations, activations) if at_start >= at_end else (at_end, 0)
    parts = {
        "weights": 4 * sum(counts.values()) / world,
        "grads+adam": 8 * trained / world + grads,
        "gathered": 2 * root + 2 * 2 * block,
        "activations": activations,
        "loss": loss_buffers(mcfg, stage, tokens),
    }
    if stage == 3:  # no backward through the decoder: one block's forward (its input, the residual, the MLP's
        # gate, up, SiLU and product) or the loss, whichever is larger
        parts["activations"] = tokens * (2 * 2 * d + 2 * 4 * dec.hidden)
        parts["activations"], parts["loss"] = (parts["activations"], 0) if parts["activations"] >= parts["loss"] \
            else (0, parts["loss"])
    return {k: v / gib for k, v in parts.items()} | {"total": sum(parts.values()) / gib}


def loss_buffers(mcfg: VTLMMConfig, stage, tokens):
    """Bytes the chunked loss holds at its peak under the bf16 policy (fused_losses.py), for `tokens` positions:
    per chunk of rows, the bf16 logits of a matmul, their float32 copy and the bf16 gradient (plus the
    target's P' / Q and its logits for Eqs. 6 and 9); the trained head's float32 gradient, a bf16 share of
    one chunk and its bf16 copy; and the gathered rows (bf16) with their gradients (float32 + bf16 copy)."""
    C, d = mcfg.decoder.vocab_size, mcfg.decoder.dim
    chunk = fused_losses.default_chunk(C) * C
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
    print_memory_budgets()
