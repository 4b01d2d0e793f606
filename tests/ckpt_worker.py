"""Under torchrun (tests only): load a step checkpoint into a freshly initialised FSDP2 model and
AdamW, then write it again as a step checkpoint and as final/ (model-only), from every rank's shard.

    torchrun --nproc_per_node=2 tests/ckpt_worker.py SRC_OUT_DIR DST_OUT_DIR
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint  # noqa: E402
import train  # noqa: E402


def tiny(seed, fsdp="auto"):
    """configs/tiny.py's model (vocabulary 600), stage II's trainable modules, AdamW."""
    cfg = train.load_config([os.path.join(ROOT, "configs/tiny.py"), f"--seed={seed}", f"--fsdp={fsdp}", "--dtype=fp32"])
    cfg.model = {**cfg.model, "decoder": {**cfg.model["decoder"], "vocab_size": 600}}
    d = train.setup_distributed(cfg)
    model = train.build_model(cfg)
    train.set_trainable(model, 2)
    model, _ = train.parallelize(model, cfg, d)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    return model, opt, d


FINGERPRINT = {"test": "cross-world"}

if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    model, opt, d = tiny(seed=123)  # other weights than the checkpoint's: loading must replace them all
    assert checkpoint.resume(src, model, opt, FINGERPRINT) is not None
    checkpoint.save_final(os.path.join(dst, "final"), model, model.cfg.to_dict(), None, "fp32")
    checkpoint.Checkpointer(dst, "worker").save(1, model, opt, {"fingerprint": FINGERPRINT, "data": {}})
    dist.destroy_process_group()
