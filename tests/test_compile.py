"""Compiled training (TrainConfig.compile, train.compile_blocks): torch.compile of every decoder and vision
block gives eager's losses and gradients, with and without activation checkpointing, over several sequence
lengths without recompiling per length, and a short compiled training run follows the eager one.
Inductor on the CPU needs a C++ compiler; without one these tests are skipped."""

import copy
import os
import shutil

import pytest
import torch

import losses
import train
from model import DecoderConfig, VisionConfig, VTLMM, VTLMMConfig
from test_train import metrics, weights
from tiny_ckpt import run_py, tiny_args

pytestmark = pytest.mark.skipif(
    not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")),
    reason="torch.compile (inductor) needs a C++ compiler on the CPU")

CFG = VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),
                  decoder=DecoderConfig(dim=64, layers=3, heads=4, kv_heads=2, hidden=128, max_seq_len=256,
                                        vocab_size=300))


def batch(T, B=2, seed=0, pad=0):
    """Token ids with one image (16 placeholders), labels on the text after it; `pad` right-padded positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.decoder.vocab_size, (B, T), generator=g)
    ids[:, 0] = 1
    ids[:, 3:3 + CFG.vision.num_patches] = CFG.image_token_id
    labels = ids.clone()
    labels[:, :3 + CFG.vision.num_patches + 1] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[-1, T - pad:] = 0
        labels[-1, T - pad:] = -100
    px = torch.randn(B, 3, CFG.vision.image_size, CFG.vision.image_size, generator=g)
    return ids, px, labels, mask


def loss_and_grads(model, objective, b):
    ids, px, labels, mask = b
    loss, lm, vm = losses.Objective(model, objective)(ids, px, labels, attention_mask=mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("stage,checkpointing", [(4, False), (4, True), (0, False)])
def test_compiled_blocks_give_eager_loss_and_gradients(stage, checkpointing):
    """Stage IV (MM loss; the vision tower frozen, run without gradients) and stage 0 (everything trains,
    the vision blocks' backward compiled too); the reference is the same model run eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VTLMM(CFG)
    train.set_trainable(eager, stage)
    eager.set_checkpointing(checkpointing)
    compiled = train.compile_blocks(copy.deepcopy(eager))
    blocks = list(compiled.decoder.blocks) + list(compiled.vision.blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)  # nn.Module.compile: each block, in place
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: the same names
    objective = train.STAGES[stage]["objective"]
    from torch._dynamo.utils import counters
    counters.clear()
    for T, pad in ((40, 0), (48, 5), (56, 0), (64, 9)):  # lengths vary between batches, as in training
        b = batch(T, seed=T, pad=pad)
        le, ge = loss_and_grads(eager, objective, b)
        lc, gc = loss_and_grads(compiled, objective, b)
        assert set(ge) == set(gc) and ge
        assert abs(le.item() - lc.item()) <= 1e-5 * abs(le.item()), (T, le.item(), lc.item())
        for n in ge:
            scale = ge[n].abs().max().clamp(min=1e-12)
            assert (ge[n] - gc[n]).abs().max().item() <= 1e-4 * scale.item() + 1e-9, (T, n)  # (a key bias: ~0)
    # one graph per kind of block and mask (none / padding), not one per length or per layer
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])


def test_compiled_training_run_follows_eager(world, tmp_path):
    """Three optimizer steps of configs/tiny.py (stage II, 4 micro-batches each) with and without --compile:
    the same losses and gradient norms step by step, and about the same weights at the end."""
    torch._dynamo.reset()
    common = ["--max_steps=3", "--log_every=1", "--save_every=0", "--dtype=fp32", "--activation_checkpointing"]
    a = run_py(tiny_args(world, str(tmp_path / "eager"), *common))
    b = run_py(tiny_args(world, str(tmp_path / "compiled"), *common, "--compile"))
    ma, mb = metrics(str(tmp_path / "eager")), metrics(str(tmp_path / "compiled"))
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * ra["loss"], (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-3 * ra["grad_norm"], (ra, rb)
    wa, wb = weights(a), weights(b)
    for k in wa:
        scale = wa[k].abs().max().clamp(min=1e-12)
        assert ((wa[k] - wb[k]).abs().max() / scale).item() <= 1e-3, k


def test_no_cpp_compiler_trains_eagerly(monkeypatch, capsys):
    """compile=True on a CPU without a C++ compiler (inductor needs one): the blocks stay eager and the
    run says why, instead of failing at its first step."""
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    model = VTLMM(CFG)
    cfg = train.TrainConfig(compile=True, activation_checkpointing=False, fsdp="off")
    train.parallelize(model, cfg, train.Dist())
    assert all(b._compiled_call_impl is None for b in model.decoder.blocks)
    assert "no C++ compiler" in capsys.readouterr().out
    monkeypatch.undo()
    train.parallelize(model, cfg, train.Dist())  # with the compiler this machine has: compiled
    assert all(b._compiled_call_impl is not None for b in model.decoder.blocks)
