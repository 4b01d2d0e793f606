"""sample.py and eval.py on bad input (issue 19, item 7): a missing, unreadable or non-image file, a
checkpoint without a tokenizer, a prompt over the context length. Each gets one line that names the
file or the limit and exit status 1, no traceback; the rest of an eval run goes on."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_ckpt import make_checkpoint, make_world

import eval as evaluate
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    ckpt = make_checkpoint(world, tmp_path_factory.mktemp("ckpt") / "tiny")
    bad = tmp_path_factory.mktemp("bad")
    (bad / "notes.png").write_text("this is text, not a PNG\n")
    no_tok = bad / "no_tokenizer"
    shutil.copytree(ckpt, no_tok)
    os.remove(no_tok / "tokenizer.model")
    qs = [json.loads(line) for line in open(os.path.join(world, "eval_pope.jsonl"))][:3]
    return world, ckpt, bad, str(no_tok), qs


def one_line_exit(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg  # sys.exit(str): printed to stderr, exit status 1
    return msg


def test_sample_bad_image_files(env):
    world, ckpt, bad, _, _ = env
    base = ["--ckpt", ckpt, "--prompt", "hi", "--device", "cpu"]
    msg = one_line_exit(sample.main, base + ["--image", str(bad / "missing.png")])
    assert msg == f"sample.py: cannot read image {bad / 'missing.png'}: no such file or directory"
    msg = one_line_exit(sample.main, base + ["--image", str(bad / "notes.png")])
    assert msg == f"sample.py: cannot read image {bad / 'notes.png'}: not an image PIL can read"
    msg = one_line_exit(sample.main, base + ["--image", str(bad)])
    assert msg.startswith(f"sample.py: cannot read image {bad}: is a directory")


def test_sample_checkpoint_without_tokenizer(env):
    world, _, _, no_tok, _ = env
    image = os.path.join(world, "images", "000003.png")
    msg = one_line_exit(sample.main, ["--ckpt", no_tok, "--image", image, "--prompt", "hi", "--device", "cpu"])
    assert msg == f"sample.py: no tokenizer at {os.path.join(no_tok, 'tokenizer.model')}: pass --tokenizer FILE " \
                  f"(a tokenizer.model)"
    msg = one_line_exit(sample.main, ["--ckpt", no_tok, "--tokenizer", os.path.join(world, "images", "000003.png"),
                                      "--image", image, "--prompt", "hi", "--device", "cpu"])
    assert msg.startswith(f"sample.py: cannot read tokenizer {os.path.join(world, 'images', '000003.png')}: ")


def test_sample_prompt_over_the_context_length(env):
    world, ckpt, _, _, _ = env
    model, tok = sample.load(ckpt)
    limit = model.cfg.decoder.max_seq_len
    image = os.path.join(world, "images", "000003.png")
    msg = one_line_exit(sample.main, ["--ckpt", ckpt, "--image", image, "--prompt", "circle " * limit,
                                      "--device", "cpu"])
    assert msg.startswith("sample.py: the prompt is ") and msg.endswith(
        f"tokens (image patches included), over the model's context length of {limit} tokens")


def test_eval_bad_files(env, tmp_path):
    world, ckpt, bad, no_tok, qs = env
    base = ["--answers", str(tmp_path / "a.jsonl"), "--device", "cpu"]
    msg = one_line_exit(evaluate.main, ["--ckpt", ckpt, "--questions", str(bad / "none.jsonl")] + base)
    assert msg == f"eval.py: cannot read {bad / 'none.jsonl'}: no such file or directory"
    (tmp_path / "q.jsonl").write_text(json.dumps(qs[0]) + "\n{not json\n")
    msg = one_line_exit(evaluate.main, ["--ckpt", ckpt, "--questions", str(tmp_path / "q.jsonl")] + base)
    assert msg == f"eval.py: {tmp_path / 'q.jsonl'}: malformed JSON at line 2, column 2: " \
                  f"Expecting property name enclosed in double quotes"
    (tmp_path / "q.jsonl").write_text(json.dumps(qs[0]) + "\n")
    msg = one_line_exit(evaluate.main, ["--ckpt", no_tok, "--questions", str(tmp_path / "q.jsonl")] + base)
    assert msg.startswith(f"eval.py: no tokenizer at {os.path.join(no_tok, 'tokenizer.model')}")
    msg = one_line_exit(evaluate.main, ["--ckpt", str(bad / "nothing"), "--questions", str(tmp_path / "q.jsonl")]
                        + base)
    assert msg.startswith(f"eval.py: no model at {bad / 'nothing'}")
    msg = one_line_exit(evaluate.main, ["--ckpt", ckpt, "--benchmark", "pope", "--data", str(bad), "--device", "cpu",
                                        "--out", str(tmp_path / "out")])
    assert msg.startswith(f"eval.py: pope: no question file {bad}")


def test_eval_long_prompt_is_reported_and_the_rest_answered(env, tmp_path, capsys):
    world, ckpt, _, _, qs = env
    model, tok = evaluate.load_model(ckpt)
    limit = model.cfg.decoder.max_seq_len
    long_q = dict(qs[1], question_id=77, text="circle " * limit)
    failed = []
    got = evaluate.answer_file(model, tok, [qs[0], long_q, qs[2]], world, str(tmp_path / "a.jsonl"), batch_size=3,
                               max_new_tokens=4, progress=False, failed=failed)
    assert [r["question_id"] for r in got] == [qs[0]["question_id"], qs[2]["question_id"]]
    assert [f[:2] for f in failed] == [(77, "its prompt")] and f"context length of {limit} tokens" in failed[0][2]
    assert f"question 77: its prompt is " in capsys.readouterr().err


def test_command_line_prints_one_line_and_exits_1(env):
    world, ckpt, bad, _, _ = env
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--image", str(bad / "missing.png"),
                        "--prompt", "hi", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"sample.py: cannot read image {bad / 'missing.png'}: "
                                             f"no such file or directory"]
