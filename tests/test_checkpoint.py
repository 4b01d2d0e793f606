"""checkpoint.py through train.py on the tiny config: exact resume under FSDP2, checkpoints that move
between process counts, crashes and kills at any moment, torn checkpoints, out_dir ownership,
resume checks, non-finite updates, and checkpoint files that try to run code."""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoint
import train
import weights as weights_lib
from tokenizer import load_tokenizer
from tiny_ckpt import run_py, tiny_args, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def args(world, out, *extra):
    return tiny_args(world, out, "--log_every=1", *extra)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def losses_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


RUN = ["--max_steps=4", "--save_every=2"]


@pytest.fixture(scope="module")
def ref(world, tmp_path_factory):
    """The uninterrupted single-process run every crash test must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    return weights(run_py(args(world, out, *RUN))), losses_of(out)


# ----------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("mode", ["fp32", "bf16_ac_async"])
def test_fsdp_two_processes_resume_exactly(world, tmp_path, mode):
    """2-process FSDP2: stopping after step 2 and resuming gives bit-equal weights and losses."""
    extra = ["--dtype=fp32"] if mode == "fp32" else ["--dtype=bf16", "--activation_checkpointing=true",
                                                      "--async_save=true"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torchrun("train.py", *args(world, a, *RUN, "--micro_batch=2", *extra))
    torchrun("train.py", *args(world, b, *RUN, "--micro_batch=2", "--stop_at=2", *extra))
    assert not os.path.exists(os.path.join(b, "final"))
    assert sorted(f for f in os.listdir(os.path.join(b, "step-2")) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    torchrun("train.py", *args(world, b, *RUN, "--micro_batch=2", "--resume", *extra))
    assert same(weights(os.path.join(a, "final")), weights(os.path.join(b, "final")))
    assert losses_of(a) == losses_of(b)


def test_checkpoint_moves_between_one_and_two_processes(tmp_path):
    """Written by 1 process, read by 2 (FSDP2) and written again by them, read by 1: the same model
    weights, AdamW moments and RNG state, bit for bit; final/ written from the 2 shards equals them."""
    sys.path.insert(0, TESTS)
    import ckpt_worker
    model, opt, _ = ckpt_worker.tiny(seed=7, fsdp="off")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two AdamW steps on random gradients: moments that are not all alike
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    rng = torch.get_rng_state()
    checkpoint.Checkpointer(src, "one").save(1, model, opt, {"fingerprint": ckpt_worker.FINGERPRINT, "data": {}})
    want_model = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = {id_: {k: v.clone() for k, v in st.items()} for id_, st in enumerate(opt.state.values())}
    torchrun("tests/ckpt_worker.py", src, dst)
    assert same(weights(os.path.join(dst, "final")), want_model)
    torch.manual_seed(99)  # another RNG state: resume must restore the saved one
    model2, opt2, _ = ckpt_worker.tiny(seed=123, fsdp="off")
    path, meta = checkpoint.resume(dst, model2, opt2, ckpt_worker.FINGERPRINT)
    assert meta["world"] == 2 and path.endswith("step-1")
    assert same(model2.state_dict(), want_model)
    got_opt = {id_: dict(st) for id_, st in enumerate(opt2.state.values())}
    assert set(got_opt) == set(want_opt)
    for i in want_opt:
        assert same(got_opt[i], want_opt[i])
    assert torch.equal(torch.get_rng_state(), rng)


def test_final_is_model_only_in_its_dtype(world, tmp_path):
    fp32 = run_py(args(world, str(tmp_path / "a"), "--max_steps=1", "--save_every=0"))
    bf16 = run_py(args(world, str(tmp_path / "b"), "--max_steps=1", "--save_every=0", "--final_dtype=bf16"))
    assert sorted(os.listdir(bf16)) == ["config.json", "model.safetensors", "tokenizer.model", "train_meta.json"]
    w32, w16 = weights(fp32), weights(bf16)
    assert {v.dtype for v in w16.values()} == {torch.bfloat16}
    assert all(torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w32)
    with safe_open(os.path.join(bf16, "model.safetensors"), "pt") as f:  # the streamed file reads as safetensors
        assert f.metadata() == {"format": "pt"}
    m = weights_lib.from_pretrained(bf16)  # what the next stage, sample.py and eval.py read
    assert all(torch.equal(v, w16[k].float()) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------------------------
# crashes, kills and torn checkpoints


def crash(world, out, phase, step, *extra):
    cmd = [sys.executable, os.path.join(TESTS, "crash_train.py"), phase, str(step), *args(world, out, *RUN, *extra)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 3, r.stderr[-3000:]


@pytest.mark.parametrize("phase, survivor", [("write", "step-2"), ("prune", "step-3")])
def test_crash_during_async_save_resumes_from_a_complete_checkpoint(world, ref, tmp_path, phase, survivor):
    out = str(tmp_path / "run")
    crash(world, out, phase, 3, "--save_every=1", "--async_save=true")
    assert checkpoint.latest(out) == os.path.join(out, survivor)
    final = run_py(args(world, out, *RUN, "--save_every=1", "--async_save=true", "--resume"))
    assert same(weights(final), ref[0])


def test_kills_at_random_moments_always_resume(world, ref, tmp_path):
    """SIGKILL at random moments around asynchronous saves (every step); each restart resumes from
    a checkpoint that reads back completely, and the run ends with the uninterrupted run's weights."""
    out = str(tmp_path / "run")
    rnd = random.Random(11)
    kills = 0
    for attempt in range(3):
        cmd = [sys.executable, os.path.join(TESTS, "crash_train.py"), "slow", "0",
               *args(world, out, *RUN, "--save_every=1", "--async_save=true", "--resume")]
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        for line in p.stdout:  # die during this attempt's first save, or while training goes on after it
            if line.startswith("writing step-"):
                time.sleep(rnd.uniform(0.0, 0.5))
                p.kill()
                kills += 1
                break
        p.wait()
        newest = checkpoint.latest(out)
        if newest:  # the newest published checkpoint is always whole
            checkpoint.check_files(newest, checkpoint.read_metadata(newest))
    assert kills >= 2  # (an attempt that starts at the last step checkpoint has no save left to die in)
    final = run_py(args(world, out, *RUN, "--save_every=1", "--async_save=true", "--resume"))
    assert same(weights(final), ref[0])


def test_torn_newest_checkpoint_falls_back(world, ref, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=3"))
    assert checkpoint.latest(out).endswith("step-3")
    shard = os.path.join(out, "step-3", "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 100)
    capsys.readouterr()
    final = run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume"))
    printed = capsys.readouterr().out
    assert f"{shard} is truncated" in printed and "resumed from " + os.path.join(out, "step-2") in printed
    assert same(weights(final), ref[0])


# ----------------------------------------------------------------------------------------------
# who owns an out_dir


def snapshot(out):
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, out)] = (f.read(), os.path.getmtime(p))
    return files


def test_out_dir_reuse_needs_resume_or_overwrite(world, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=2"))
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="not empty.*--resume.*--overwrite"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1"))
    assert snapshot(out) == before  # nothing of the earlier run touched
    old_run = json.load(open(os.path.join(out, "step-2", "meta.json")))["run_id"]
    run_py(args(world, out, "--max_steps=2", "--save_every=1", "--overwrite"))
    runs = {os.path.basename(p): m["run_id"] for p, m in checkpoint.complete_checkpoints(out)}
    assert list(runs) == ["step-1"] and runs["step-1"] != old_run  # the old run's step-1 and step-2 are gone
    assert checkpoint.is_final(os.path.join(out, "final"))


def test_live_lock_refuses_a_second_run_stale_lock_is_taken_over(world, tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(out, checkpoint.LOCK), "w") as f:
            json.dump({"pid": other.pid, "host": __import__("socket").gethostname(), "started": "then"}, f)
        with pytest.raises(RuntimeError, match=f"in use by another run .*pid {other.pid}"):
            run_py(args(world, out, "--max_steps=1", "--save_every=0", "--resume"))
    finally:
        other.kill()
        other.wait()
    run_py(args(world, out, "--max_steps=1", "--save_every=0", "--resume"))  # the pid is gone: stale
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, checkpoint.LOCK))  # released at the end


def test_pruning_keeps_other_runs_checkpoints(world, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=1"))
    foreign = os.path.join(out, "step-0")  # a checkpoint of another run, older than all of ours
    shutil.copytree(os.path.join(out, "step-1"), foreign)
    meta = json.load(open(os.path.join(foreign, "meta.json")))
    json.dump({**meta, "run_id": "someone-else", "step": 0}, open(os.path.join(foreign, "meta.json"), "w"))
    run_id = meta["run_id"]
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume"))
    kept = {os.path.basename(p): m["run_id"] for p, m in checkpoint.complete_checkpoints(out)}
    assert kept == {"step-3": run_id, "step-2": run_id, "step-0": "someone-else"}  # keep_checkpoints=2 of ours


# ----------------------------------------------------------------------------------------------
# resume checks


def test_resume_refuses_other_settings_and_names_them(world, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=1"))
    with pytest.raises(ValueError, match=r"global_batch \(checkpoint 16, now 8\).*total_steps"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume", "--global_batch=8", "--max_steps=5"))
    with pytest.raises(ValueError, match=r"data_path .*stage1_captions.json"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume",
                    f"--data_path={world}/stage1_captions.json"))
    grown = ("--model={'vision': {'image_size': 32, 'patch_size': 8, 'width': 32, 'layers': 3, 'heads': 2, "
             "'mlp': 64}, 'decoder': {'dim': 64, 'layers': 2, 'heads': 4, 'kv_heads': 2, 'hidden': 128, "
             "'max_seq_len': 256}, 'template': 'vicuna_v1'}")
    with pytest.raises(ValueError, match=r"model\.vision\.layers \(checkpoint 2, now 3\)"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume", grown))
    # a deliberate change is allowed; the shapes are still checked strictly
    with pytest.raises(KeyError, match=r"missing .*vision\.blocks\.2"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume", grown, "--allow_resume_changes"))
    final = run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume", "--global_batch=8",
                        "--allow_resume_changes"))
    assert final and os.path.exists(os.path.join(final, "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# non-finite updates


class _NanGradAt:
    """Wraps clip_grad_norm_: at its n-th call (step n) one gradient turns NaN first; the loss stays finite."""

    def __init__(self, n):
        self.n, self.calls, self.orig = n, 0, torch.nn.utils.clip_grad_norm_

    def __call__(self, params, *a, **k):
        params = list(params)
        self.calls += 1
        if self.calls == self.n:
            params[0].grad.view(-1)[0] = float("nan")
        return self.orig(params, *a, **k)


def test_nonfinite_gradient_is_skipped_never_saved(world, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _NanGradAt(2))
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--keep_checkpoints=5", "--stop_at=3"))
    assert all(os.path.isdir(os.path.join(out, f"step-{s}")) for s in (1, 2, 3))
    m = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
    assert m[2]["grad_norm"] != m[2]["grad_norm"] and m[2]["skipped"] == 1 and m[3]["skipped"] == 1
    # step 2 made no update: its checkpoint holds step 1's weights, all finite
    w = {}
    for s in (1, 2):
        model = train.build_model(train.load_config(args(world, out, "--max_steps=4")),
                                  load_tokenizer(f"{world}/tokenizer.model"))
        train.set_trainable(model, 2)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
        shutil.rmtree(str(tmp_path / "only"), ignore_errors=True)
        shutil.copytree(os.path.join(out, f"step-{s}"), str(tmp_path / "only" / f"step-{s}"))
        fp = json.load(open(os.path.join(out, f"step-{s}", "meta.json")))["fingerprint"]
        checkpoint.resume(str(tmp_path / "only"), model, opt, fp)
        w[s] = {k: v.clone() for k, v in model.state_dict().items()}
    assert same(w[1], w[2]) and all(torch.isfinite(v).all() for v in w[2].values())


def test_nonfinite_gradient_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", _NanGradAt(2))
    with pytest.raises(FloatingPointError, match=r"at step 2.*last good checkpoint is .*step-1"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--keep_checkpoints=1", "--max_skipped_steps=0"))
    assert [os.path.basename(p) for p, _ in checkpoint.complete_checkpoints(out)] == ["step-1"]


def test_nonfinite_state_is_never_saved(world, tmp_path, monkeypatch):
    """A non-finite weight (after a finite-looking update) is caught before the save; the last good
    checkpoint is neither replaced nor pruned."""
    out = str(tmp_path / "run")
    step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *a, **k):
        r = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return r

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(FloatingPointError, match=r"not finite at step 2; not saved.*step-1"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--keep_checkpoints=1"))
    assert [os.path.basename(p) for p, _ in checkpoint.complete_checkpoints(out)] == ["step-1"]
    assert not os.path.exists(os.path.join(out, "step-2.tmp", "meta.json"))


# ----------------------------------------------------------------------------------------------
# checkpoint files that try to run code


class _Payload:
    """Unpickling this creates the marker file: a stand-in for running any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_metadata_cannot_run_code(world, tmp_path):
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=1"))
    marker = str(tmp_path / "pwned")
    with open(os.path.join(out, "step-1", ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(RuntimeError, match="none of the 1 checkpoint"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume"))
    assert not os.path.exists(marker)


def test_crafted_object_entry_cannot_run_code(world, tmp_path):
    """Stock DCP reads an entry the metadata declares as bytes with torch.load(weights_only=False):
    shown here to run the payload. checkpoint.resume refuses the same checkpoint without running it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
    out = str(tmp_path / "run")
    run_py(args(world, out, "--max_steps=4", "--save_every=1", "--stop_at=1"))
    ck = os.path.join(out, "step-1")
    with open(os.path.join(ck, ".metadata"), "rb") as f:
        md = pickle.load(f)  # our own file: trusted here, to build the crafted one
    key = "model/decoder.norm.weight"
    marker = str(tmp_path / "pwned")
    torch.save(_Payload(marker), os.path.join(ck, "__evil.distcp"))
    size = os.path.getsize(os.path.join(ck, "__evil.distcp"))
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__evil.distcp", 0, size)
    with open(os.path.join(ck, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    dcp.load({key: torch.zeros(64)}, checkpoint_id=ck, no_dist=True)  # stock DCP: the payload runs
    assert os.path.exists(marker)
    os.remove(marker)
    with pytest.raises(RuntimeError, match="none of the 1 checkpoint"):
        run_py(args(world, out, "--max_steps=4", "--save_every=1", "--resume"))
    assert not os.path.exists(marker)
    with pytest.raises(ValueError, match="BytesStorageMetadata is not allowed"):
        checkpoint.read_metadata(ck)
    _, planner = checkpoint._safe_reader_and_planner(ck)  # and were it let through: never torch.load'ed
    item = type("Item", (), {"dest_index": MetadataIndex(key)})()
    with pytest.raises(ValueError, match="pickled object; refused"):
        planner.load_bytes(item, open(os.path.join(ck, "__evil.distcp"), "rb"))
    assert not os.path.exists(marker)

