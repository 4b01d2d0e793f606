"""Run by tests/test_train.py in its own process (FSDP2 on a gloo group of one, the bf16 policy):
losses.Objective as FSDP2's root, the way train.parallelize wraps a stage, and what reaches the loss.

    python tests/objective_worker.py OUT.json
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

import losses  # noqa: E402
import train  # noqa: E402
from model import VTLMM  # noqa: E402

MODEL = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp=64),
             decoder=dict(vocab_size=256, dim=32, layers=2, heads=4, kv_heads=2, hidden=64, max_seq_len=64),
             image_token_id=250)


def main(out_path):
    cfg = train.TrainConfig(model=MODEL, stage=4, fsdp="on", dtype="bf16", activation_checkpointing=False)
    d = train.setup_distributed(cfg)
    model = train.build_model(cfg)
    keys = sorted(model.state_dict())
    train.set_trainable(model, 4)
    objective = losses.Objective(model, "mm")
    model, _ = train.parallelize(model, cfg, d, root=objective)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 40), generator=g)
    ids[:, 1:17] = 250
    labels = ids.masked_fill(ids == 250, -100)
    px = torch.randn(2, 3, 32, 32, generator=g)
    rows = losses.batch_rows(labels, ids == 250)
    # the trainer's counts on several processes: float32 tensors (sums over ranks / world)
    big, one = torch.tensor(12345.0), torch.tensor(1.0)
    _, lm_big, vm_big = objective(ids, px, labels, rows, big, big)
    loss, lm_one, vm_one = objective(ids, px, labels, rows, one, one)
    loss.backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    res = dict(lm_ratio=(lm_one / lm_big).item(), vm_ratio=(vm_one / vm_big).item(),
               model_class=type(model).__name__, model_is_fsdp=isinstance(model, FSDPModule),
               root_is_fsdp=isinstance(objective, FSDPModule), same_keys=sorted(model.state_dict()) == keys,
               mm_head_sharded=hasattr(model.mm_head.weight, "full_tensor"),
               with_grad=sorted(n for n, has in grads.items() if has), plain=isinstance(model, VTLMM))
    with open(out_path, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
