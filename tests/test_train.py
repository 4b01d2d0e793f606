"""train.py on the tiny config: stage semantics, exact resume, accumulation and FSDP2 equivalence."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from tiny_ckpt import run_py, tiny_args, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


args = tiny_args


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def test_tiny_loss_falls(world, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=12", "--log_every=1", "--save_every=0"))
    m = metrics(out)
    assert len(m) == 12
    assert sum(r["loss"] for r in m[-3:]) / 3 < 0.8 * sum(r["loss"] for r in m[:3]) / 3
    assert all(k in m[0] for k in ("lm", "vm", "lr", "grad_norm", "tokens_per_s", "mfu"))
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in m)  # a CPU run: no peak, no MFU


@pytest.fixture(scope="module")
def start(world, tmp_path_factory):
    """A tiny stage-0 checkpoint every stage test starts from."""
    out = str(tmp_path_factory.mktemp("s0") / "run")
    return run_py(args(world, out, "--stage=0", "--template=plain", f"--data_path={world}/stage1_captions.json",
                       "--max_steps=2", "--save_every=0"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_each_stage_trains_exactly_its_modules(world, start, tmp_path, stage):
    extra = [f"--stage={stage}", f"--init_from={start}", "--max_steps=1", "--save_every=0", "--global_batch=8",
             "--micro_batch=4"]
    if stage in (0, 1, 3):
        extra += ["--template=plain", f"--data_path={world}/stage1_captions.json"]
    final = run_py(args(world, str(tmp_path / "run"), *extra))
    before, after = weights(start), weights(final)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(train.STAGES[stage]["train"])
    cfg = json.load(open(os.path.join(final, "config.json")))["nanovt"]["vision"]
    n_run = cfg["select_layer"] % (cfg["layers"] + 1)
    unused = ("vision.post_norm",) + tuple(f"vision.blocks.{i}." for i in range(n_run, cfg["layers"]))
    for k in before:  # every tensor of a trained module moved; every other one is bit-for-bit equal
        if k.split(".")[0] in changed and not k.startswith(unused) and not k.endswith("attn.k.bias"):
            assert not torch.equal(before[k], after[k]), k  # (a key bias never gets a gradient: softmax)


def test_resume_equals_uninterrupted(world, tmp_path):
    a = run_py(args(world, str(tmp_path / "a"), "--max_steps=6", "--save_every=0"))
    b_out = str(tmp_path / "b")
    assert run_py(args(world, b_out, "--max_steps=6", "--save_every=0", "--stop_at=3")) is None
    assert os.path.exists(os.path.join(b_out, "step-3", "meta.json")) and not os.path.exists(os.path.join(b_out, "final"))
    b = run_py(args(world, b_out, "--max_steps=6", "--save_every=0", "--resume"))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in metrics(str(tmp_path / "a"))] == [r["loss"] for r in metrics(b_out)]


def test_crash_while_saving_resumes_from_last_complete(world, tmp_path):
    a = run_py(args(world, str(tmp_path / "a"), "--max_steps=6", "--save_every=2"))
    out = str(tmp_path / "b")
    # dies while step-4's marker is half written (tests/crash_train.py injects it)
    cmd = [sys.executable, os.path.join(ROOT, "tests", "crash_train.py"), "publish", "4",
           *args(world, out, "--max_steps=6", "--save_every=2")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True)
    assert r.returncode == 3
    assert os.path.exists(os.path.join(out, "step-4.tmp")) and os.path.exists(os.path.join(out, "step-2"))
    assert checkpoint.latest(out).endswith("step-2")
    b = run_py(args(world, out, "--max_steps=6", "--save_every=2", "--resume"))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_accumulation_1x8_equals_8x1(world, start, tmp_path):
    common = ["--stage=4", f"--init_from={start}", "--max_steps=1", "--save_every=0", "--global_batch=8",
              "--lr=1e-3"]
    a = run_py(args(world, str(tmp_path / "a"), *common, "--micro_batch=8"))
    b = run_py(args(world, str(tmp_path / "b"), *common, "--micro_batch=1"))
    wa, wb, w0 = weights(a), weights(b), weights(start)
    ma, mb = metrics(str(tmp_path / "a"))[0], metrics(str(tmp_path / "b"))[0]
    scale = ma["lm"] + ma["vm"]  # float32 sums in another order: compare on the scale of the loss
    assert abs(ma["lm"] - mb["lm"]) <= 1e-5 * scale and abs(ma["vm"] - mb["vm"]) <= 1e-5 * scale
    assert abs(ma["grad_norm"] - mb["grad_norm"]) <= 1e-5 * ma["grad_norm"]  # the same gradient
    for k in wa:  # the same update (Adam's first step is ~lr * sign(g): compare in norm)
        da, db = wa[k] - w0[k], wb[k] - w0[k]
        assert (da - db).norm() <= 1e-3 * db.norm() + 1e-9, k


@pytest.mark.parametrize("stage", [1, 3, 4])
def test_fsdp_two_processes_match_one(world, start, tmp_path, stage):
    common = [f"--stage={stage}", f"--init_from={start}", "--max_steps=2", "--save_every=0", "--global_batch=8",
              "--micro_batch=2", "--lr=1e-3", "--log_every=1", "--dtype=fp32"]
    if stage in (1, 3):
        common += ["--template=plain", f"--data_path={world}/stage1_captions.json"]
    one = run_py(args(world, str(tmp_path / "one"), *common))
    torchrun("train.py", *args(world, str(tmp_path / "two"), *common))
    m1, m2 = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        scale = a["lm"] + a["vm"]
        assert abs(a["lm"] - b["lm"]) <= 1e-5 * scale and abs(a["vm"] - b["vm"]) <= 1e-5 * scale
    w1, w2, w0 = weights(one), weights(os.path.join(str(tmp_path / "two"), "final")), weights(start)
    assert set(w1) == set(w2)  # the saved model is the plain one, no FSDP prefixes
    changed = {k.split(".")[0] for k in w0 if not torch.equal(w0[k], w2[k])}
    assert changed == set(train.STAGES[stage]["train"])  # under FSDP too, a stage trains its modules only
    # Two AdamW steps at lr 1e-3 move a weight by up to 2e-3, about 4e-2 of the largest weight: a missing or
    # doubled gradient reduction shows at that size. Summing in another order moves them by ~1e-5 (CI's CPUs
    # measured 1.1e-5 on one matrix), so the bound sits between the two.
    for k in w1:
        assert rel(w1[k], w2[k]) <= 1e-4, k


def test_objective_is_the_fsdp_root_and_keeps_the_counts(tmp_path):
    """Under FSDP2's bf16 policy (one gloo process, tests/objective_worker.py): the stage's losses.Objective
    is the root unit, the model stays a plain VTLMM with its own state-dict keys, the stage's modules get
    gradients through the fused heads, and the step's counts reach the loss unrounded (a bf16 cast of
    12345 would give 12352)."""
    out = tmp_path / "res.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}  # a group of one needs no port
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "objective_worker.py"), str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["root_is_fsdp"] and not res["model_is_fsdp"] and res["model_class"] == "VTLMM"
    assert res["same_keys"] and res["mm_head_sharded"]
    assert {n.split(".")[0] for n in res["with_grad"]} == set(train.STAGES[4]["train"])
    assert "mm_head.weight" in res["with_grad"] and "decoder.embed.weight" in res["with_grad"]
    assert abs(res["lm_ratio"] - 12345) <= 1e-5 * 12345 and abs(res["vm_ratio"] - 12345) <= 1e-5 * 12345


def test_bf16_autocast_trains(world, start, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--stage=4", f"--init_from={start}", "--max_steps=2", "--save_every=0", "--dtype=bf16",
                "--log_every=1"))
    m = metrics(out)
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in m)  # finite and sane under bf16 autocast


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        train.load_config([os.path.join(ROOT, "configs/tiny.py"), "--bogus=1"])
    with pytest.raises(ValueError, match="--max_steps: expected int"):
        train.load_config([os.path.join(ROOT, "configs/tiny.py"), "--max_steps=abc"])
    f = tmp_path / "c.py"
    f.write_text("stage = 2\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match="c.py: unknown config key 'learning_rate'"):
        train.load_config([str(f)])
    cfg = train.load_config([os.path.join(ROOT, "configs/tiny.py"), "--activation_checkpointing", "--lr=0.5"])
    assert cfg.activation_checkpointing is True and cfg.lr == 0.5


def test_every_config_file_loads():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            cfg = train.load_config([os.path.join(ROOT, "configs", name)])
            assert cfg.global_batch % cfg.micro_batch == 0, name


def test_nan_loss_stops_with_the_step(world, tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        run_py(args(world, str(tmp_path / "run"), "--max_steps=8", "--save_every=0", "--lr=1e12",
                    "--grad_clip=0", "--warmup_ratio=0"))
