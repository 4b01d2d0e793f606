"""Run by tests/test_throughput.py under torchrun (2 gloo processes): load a checkpoint shard by shard
(train.py's sharded path) and fully (every rank the whole model), and write what each rank saw."""

import json
import os
import sys

import torch

import train
import weights


def main(path, out_dir):
    cfg = train.TrainConfig(init_from=path, fsdp="on", reinit=("adapter",), seed=3, activation_checkpointing=False,
                            dtype="fp32")
    d = train.setup_distributed(cfg)
    torch.manual_seed(5)
    full = train.build_model(cfg)  # the reference: every rank reads everything
    torch.manual_seed(5)
    sources = weights.ShardSources()
    sharded = train.build_model(cfg, sources=sources)
    on_meta = all(p.is_meta for p in sharded.parameters())
    sharded, _ = train.parallelize(sharded, cfg, d)
    train.load_sharded(sharded, sources, cfg, d)
    local_rows = {n: p.to_local().shape[0] for n, p in sharded.named_parameters() if p.dim()}
    vm_head_std = sharded.vm_head.weight.full_tensor().std().item()
    unequal = [n for n, p in sharded.named_parameters() if not torch.equal(p.full_tensor(), full.get_parameter(n))]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 24), generator=g)
    ids[:, 2:18] = full.cfg.image_token_id
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        a, b = sharded(ids, px).logits, full(ids, px).logits
    res = dict(on_meta=on_meta, unequal=unequal, n_params=len(local_rows), logits_equal=torch.equal(a, b),
               max_diff=(a - b).abs().max().item(), embed_rows=local_rows["decoder.embed.weight"],
               vm_head_std=vm_head_std)
    with open(os.path.join(out_dir, f"rank{d.rank}.json"), "w") as f:
        json.dump(res, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
