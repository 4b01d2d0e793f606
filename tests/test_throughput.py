"""Issue 15's throughput work, checked on CPU: no host sync in a training micro-step, AdamW's fast
paths give the plain update, MFU counts real tokens, peak FLOP/s by exact device name."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import losses
from model import VTLMM, DecoderConfig, VisionConfig, VTLMMConfig

IMG = 250


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),
                      decoder=DecoderConfig(vocab_size=256, dim=32, layers=2, heads=4, kv_heads=2, hidden=64,
                                            max_seq_len=128), image_token_id=IMG)
    return VTLMM(cfg)


def tiny_batch(seed=1):
    """Row 0: BOS, image, text; row 1: text only, padded; row 2: image at t = 0."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 40
    ids = torch.randint(3, 200, (B, T), generator=g)
    ids[0, 1:17] = IMG
    ids[2, 0:16] = IMG
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[:, :1] = -100
    labels[1, 30:] = -100  # padding
    return ids, torch.randn(2, 3, 32, 32, generator=g), labels


class HostSyncs(TorchDispatchMode):
    """Records the ops that make a CUDA host wait for the device: reading a value (.item(), int(),
    bool()), and ops whose output shape depends on the data (nonzero, masked_select, boolean indexing)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select",
               "aten::masked_scatter", "aten::is_nonzero", "aten::unique", "aten::_unique2", "aten::item"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name.startswith("aten::index") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in tree_flatten((args, kwargs))[0][1:])
        if name in self.SYNCING or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["lm", "mm", "vm_fit"])
def test_training_micro_step_never_waits_for_the_device(objective):
    """Forward + backward of a micro-batch, with the positions found on the CPU beforehand (as the
    trainer does), runs no op that needs a value from the device. The same step without them does."""
    model = tiny_model()
    model.set_checkpointing(True)
    ids, px, labels = tiny_batch()
    rows = losses.batch_rows(labels, ids == IMG)  # on the CPU, from the CPU batch
    n_lm, n_vm = float(rows.lm.numel()), float(rows.vm.numel())
    with HostSyncs() as mode:
        out = model(ids, px, labels=labels, objective=objective, lm_count=n_lm, vm_count=n_vm, rows=rows)
        out.loss.backward()
    assert mode.seen == [], mode.seen
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with HostSyncs() as mode:  # the detector is not blind: the mask-driven path does sync
        ref = model(ids, px, labels=labels, objective=objective, lm_count=n_lm, vm_count=n_vm)
        ref.loss.backward()
    assert mode.seen
    assert torch.equal(out.loss, ref.loss)  # and the two paths compute the same thing
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-8), n
