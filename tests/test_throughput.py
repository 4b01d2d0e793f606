"""Issue 15's throughput work, checked on CPU: no host sync in a training micro-step, AdamW's fast
paths give the plain update, MFU counts real tokens, peak FLOP/s by exact device name."""

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import losses
from model import VTLMM, DecoderConfig, VisionConfig, VTLMMConfig
from tiny_ckpt import torchrun

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
    loss_fn = losses.Objective(model, objective)
    with HostSyncs() as mode:
        out = loss_fn(ids, px, labels, rows, n_lm, n_vm)
        out[0].backward()
    assert mode.seen == [], mode.seen
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with HostSyncs() as mode:  # the detector is not blind: the mask-driven path does sync
        ref = loss_fn(ids, px, labels, lm_count=n_lm, vm_count=n_vm)
        ref[0].backward()
    assert mode.seen
    assert torch.equal(out[0], ref[0])  # and the two paths compute the same thing
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-8), n


def test_adamw_fast_path_gives_the_plain_update():
    """train.make_optimizer's AdamW (foreach on CPUs, fused on GPUs) against the per-tensor loop,
    on the same gradients for a few steps, with the stage's hyperparameters."""
    import train
    cfg = train.TrainConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref_model, fast_model = tiny_model(), tiny_model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            foreach=False)
    fast = train.make_optimizer(list(fast_model.parameters()), cfg, torch.device("cpu"))
    assert fast.defaults["foreach"] is True
    ids, px, labels = tiny_batch()
    for _ in range(3):
        for model, opt in ((ref_model, ref), (fast_model, fast)):
            model.zero_grad(set_to_none=True)
            losses.Objective(model, "mm")(ids, px, labels)[0].backward()
            opt.step()
    moved = 0
    for (name, a), b in zip(ref_model.named_parameters(), fast_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
        moved += not torch.equal(a, tiny_model().get_parameter(name))
    assert moved > 10  # the steps did move the weights


def test_mfu_counts_real_tokens_only():
    """Tokens and FLOPs of a right-padded batch: each sample at its own length, padding not counted."""
    import data
    import train
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n), "id": str(n)} for n in (10, 3, 7)]
    b = data.collate(samples, pad_id=0)
    assert b["input_ids"].numel() == 30  # 3 x 10 with padding

    def fpt(T):  # a made-up cost per token that depends on the length, as the attention term does
        return 100 + T

    tokens, flops = train.real_tokens_and_flops(b["attention_mask"], fpt)
    assert tokens == 10 + 3 + 7
    assert flops == 10 * 110 + 3 * 103 + 7 * 107


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989), ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100-PCIE-40GB", "bf16", 312),
    ("NVIDIA L40S", "bf16", 362), ("NVIDIA L40", "bf16", 181), ("NVIDIA L4", "bf16", 121), ("NVIDIA A10", "bf16", 125),
    ("NVIDIA GeForce RTX 4090", "bf16", 165), ("NVIDIA H100 80GB HBM3", "fp32", 495), ("NVIDIA A100 80GB PCIe", "fp32", 156),
    ("Tesla T4", "bf16", None)])
def test_peak_flops_by_exact_device_name(name, dtype, tflops):
    import metrics
    peak = metrics.gpu_peak_flops(name, dtype)
    assert peak == (tflops * 1e12 if tflops else None)


def test_cpu_logs_tokens_per_s_and_no_mfu(tmp_path):
    """On a CPU no peak is guessed (a matmul timed at start-up gave "mfu 104%"): the record has tokens/s
    and mfu None; a peak given with --peak_flops is used as it is (FLOPs per second over it)."""
    import types

    import metrics
    import train
    assert metrics.peak_flops(torch.device("cpu"), "fp32") is None and metrics.peak_flops(torch.device("cpu")) is None
    records = {}
    for peak in (0.0, 1e9):
        cfg = train.TrainConfig(out_dir=str(tmp_path / f"p{peak:g}"), log_every=1, peak_flops=peak)
        os.makedirs(cfg.out_dir)
        s = types.SimpleNamespace(cfg=cfg, d=train.Dist(), total=1, step=0, skipped=0, model=torch.nn.Linear(1, 1))
        p = metrics.Progress(s, "fp32")
        p.count(1000, 5e9)
        s.step = 1
        p.log_step(s, 1e-3, 1.0, 0.5, 2.0)
        with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
            records[peak] = json.loads(f.readline())
    assert records[0.0]["mfu"] is None and records[0.0]["tokens_per_s"] > 0
    r = records[1e9]  # 5e9 FLOPs in dt seconds, over 1e9 FLOP/s: 5 / dt, with dt = 1000 tokens / tokens_per_s
    assert r["mfu"] == pytest.approx(5 * r["tokens_per_s"] / 1000, rel=1e-2)


@pytest.mark.parametrize("stage", [3, 4])
def test_memory_table_loss_column_covers_the_measured_loss(stage):
    """bench/memory_budget.py's loss_buffers (the README memory table's loss column) against the peak
    the chunked loss really holds (bench.LiveBytes), bf16 as under FSDP, at the 7B vocabulary: at
    least the measured peak, and not far above it."""
    import importlib.util
    import os

    from vs_transformers import LiveBytes  # bench/vs_transformers.py
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "memory_budget.py")
    spec = importlib.util.spec_from_file_location("memory_budget", path)
    memory_budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_budget)
    C, d, T = 32000, 32, 600
    mcfg = VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp=64),
                       decoder=DecoderConfig(vocab_size=C, dim=d, layers=1, heads=2, kv_heads=2, hidden=64))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, T, d, generator=g).bfloat16().requires_grad_()
    w_mm = (torch.randn(C, d, generator=g) * .05).bfloat16().requires_grad_(stage == 4)
    w_vm = (torch.randn(C, d, generator=g) * .05).bfloat16().requires_grad_(stage == 3)
    image = torch.zeros(1, T, dtype=torch.bool)
    image[:, 1:577] = True
    labels = torch.randint(0, C, (1, T), generator=g)
    labels[image] = -100
    labels[:, 0] = -100
    x = torch.randn(576, d, generator=g).bfloat16()
    rows = losses.batch_rows(labels, image)
    with LiveBytes() as mode:
        if stage == 4:
            lm, vm = losses.chunked_mm_loss(hidden, w_mm, labels, image, x, w_vm, rows=rows)
            (lm + vm).backward()
        else:
            h_q = hidden.detach().reshape(T, d)[rows.vm]
            losses.chunked_vm_fit_loss(h_q, w_mm, x[rows.vm_keep], w_vm).backward()
    estimate = memory_budget.loss_buffers(mcfg, stage, T)
    assert mode.peak <= estimate <= 1.6 * mode.peak, (mode.peak, estimate)


def test_sharded_loading_is_bit_equal_to_full_loading(tmp_path):
    """A llava-hf checkpoint in bf16, split over two safetensors files with an index, a vocabulary of
    251 rows (uneven shards), no VM head (drawn fresh) and the adapter re-initialised: two gloo ranks
    that each read only their rows give bit-equal weights, and the same logits, as a full load."""
    import json
    import os

    from hf_tiny import save_new_layout, tiny_llava
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = save_new_layout(tiny_llava(vocab=251).to(torch.bfloat16), str(tmp_path / "ckpt"), max_shard_size="100KB")
    assert any(f.endswith(".index.json") for f in os.listdir(ckpt))
    torchrun("tests/sharded_load_worker.py", ckpt, str(tmp_path), env={"PYTHONPATH": root})
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    for res in ranks:
        assert res["on_meta"] and res["n_params"] > 50
        assert res["unequal"] == [], res["unequal"]
        assert res["logits_equal"] or res["max_diff"] < 1e-5
        assert 0.015 < res["vm_head_std"] < 0.025  # drawn fresh, N(0, 0.02)
    assert [res["embed_rows"] for res in ranks] == [126, 125]  # each rank holds only its rows


def test_ranks_get_even_total_lengths():
    """Each optimizer step's megabatch is dealt so the ranks' total lengths differ by at most one
    sample's length (contiguous slices of a longest-first megabatch gave rank 0 the longest samples),
    and which samples make a step does not change with the number of ranks."""
    import data
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(50, 2000, (256,), generator=g)]
    world, per_rank = 4, 8
    shards = [data.LengthGroupedSampler(lengths, per_rank, seed=1, rank=r, world_size=world).indices()
              for r in range(world)]
    one = data.LengthGroupedSampler(lengths, per_rank * world, seed=1).indices()
    for k in range(len(lengths) // (per_rank * world)):
        parts = [s[k * per_rank:(k + 1) * per_rank] for s in shards]
        assert sorted(sum(parts, [])) == sorted(one[k * per_rank * world:(k + 1) * per_rank * world])
        totals = [sum(lengths[i] for i in p) for p in parts]
        assert max(totals) - min(totals) <= max(lengths[i] for p in parts for i in p), totals
        for p in parts:  # still longest first within a rank: micro-batches hold similar lengths
            assert [lengths[i] for i in p] == sorted((lengths[i] for i in p), reverse=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    import shapes as world
    d = tmp_path_factory.mktemp("shapes")
    world.make_shapes_world(d, n_images=60, image_size=32, vocab_size=600, workers=1)
    return d


def test_loader_with_workers_gives_the_same_batches_and_resume_position(shapes):
    import data
    import train
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(shapes / "tokenizer.model"))
    ds = data.LlavaDataset(str(shapes / "instruct.json"), None, tok, "vicuna_v1", 32, 16, IMG, max_len=256)
    d = train.Dist()

    def run(workers, epoch=0, skip=0):
        cfg = train.TrainConfig(global_batch=8, micro_batch=2, num_workers=workers, prefetch_factor=2, seed=4)
        return list(train.batches(ds, cfg, d, tok, epoch, skip, IMG))

    plain, workers = run(0), run(2)
    assert len(plain) == len(workers) == -(-len(ds) // 2) and len(plain) > 10
    for a, b in zip(plain, workers):
        assert a["ids"] == b["ids"]
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(a[k], b[k])
        assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
        assert a["pixel_values"] is None or torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(b["rows"].lm, losses.batch_rows(b["labels"], b["input_ids"] == IMG).lm)
    # resume after 3 optimizer steps of 8 samples: the position is two plain ints, and the loader
    # (with workers or not) continues exactly where the uninterrupted one was
    cfg = train.TrainConfig(global_batch=8, micro_batch=2)
    pos = train.data_position(3, len(ds) // 8, cfg)
    assert pos == {"epoch": 0, "samples_in_epoch": 24, "samples_seen": 24}
    for w in (0, 2):
        resumed = run(w, pos["epoch"], pos["samples_in_epoch"] // d.world)
        assert [b["ids"] for b in resumed] == [b["ids"] for b in plain[12:]]
    steps = len(ds) // 8
    assert train.data_position(steps + 1, steps, cfg) == {"epoch": 1, "samples_in_epoch": 8,
                                                          "samples_seen": 8 * (steps + 1)}


def test_throughput_bench_quick_writes_its_table(tmp_path):
    """bench/vs_transformers.py --throughput --quick runs end to end (tiny sizes) and writes the four side-by-side rows."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tp.md"
    r = subprocess.run([sys.executable, "bench/vs_transformers.py", "--throughput", "--quick", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Command: `python bench/vs_transformers.py --throughput --quick`" in text
    for row in ("data wait per micro-batch", "AdamW host time per step", "peak memory of the Eq. 9 loss alone",
                "per-rank peak host memory loading released weights"):
        assert re.search(r"\| " + re.escape(row) + r".*\| [\d.,]+ \| [\d.,]+ \| [\d.]+× \|", text), row
    assert float(re.search(r"Eq. 9 alone .*value rel diff (\S+),", text).group(1)) <= 1e-5
