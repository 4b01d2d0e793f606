"""Careless and hostile input (issue 32), each case written as the attack or the accident it is: a thin
PNG whose padded square would take gigabytes, a FIFO given as an image, image paths that leave the image
folder, an image folder not mounted, images restored after a run, a JSON edited in place, a swapped
checkpoint, a resume with another process count, a million-layer config, a disk that fills up or is
read-only, and the user errors that must be one line. Each test checks the outcome: the message, the
exit status, the files on disk."""

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file
from tiny_ckpt import make_checkpoint, tiny_args

import data
import errors
import eval as evaluate
import sample
import train
import weights
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    return make_checkpoint(str(world), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(str(world / "tokenizer.model"))


def one_line_exit(fn, argv):
    """fn(argv) must exit with a one-line message (sys.exit(str): printed to stderr, status 1)."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg, msg
    return msg


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() (of a FIFO, say)."""
    def fire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def thin_png(path, w=20000, h=1):
    """A real, valid w x h PNG of a few hundred bytes: 20000 pixels decoded, 400 million once padded."""
    Image.new("L", (w, h), 255).save(path)
    return path


def png_header(w, h):
    """A PNG that declares w x h and holds no pixel data (read from its header alone)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def never_decode(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("pixels were decoded before the image was refused")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def conv(q="<image>\nWhat is it?", a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# ----------------------------------------------------------------------------------------------
# 1. the image gate


def test_thin_png_is_refused_from_its_header_by_every_reader(tmp_path, monkeypatch, world, ckpt, tok, capsys):
    png = thin_png(tmp_path / "thin.png")
    assert png.stat().st_size < 1000  # the attack costs nothing to send
    square = "20000x1 pads to a 20000x20000 square, over 89478485 pixels"
    never_decode(monkeypatch)
    with pytest.raises(data.ImageRefused, match=square):
        data.open_image(png)
    with pytest.raises(data.ImageRefused, match=square):  # the same bytes, as a server or MMBench hands them
        data.open_image(png.read_bytes())
    monkeypatch.undo()
    # training: the sample is skipped and counted, the next one served
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "thin", "image": "thin.png", "conversations": conv()},
                                                 {"id": "good", "image": "good.png", "conversations": conv()}]))
    ds = data.LlavaDataset(tmp_path / "d.json", None, tok, "vicuna_v1", 32, 16, max_len=200)
    assert ds[0]["id"] == "good" and ds.skipped == {"decompression bomb": 1}
    # sample.py: one line
    msg = one_line_exit(sample.main, ["--ckpt", ckpt, "--image", str(png), "--prompt", "hi", "--device", "cpu"])
    assert msg == f"sample.py: cannot read image {png}: decompression bomb: {square}"
    # eval.py: the question is reported, its answer left empty, the rest answered; a 100-Mpixel base64
    # image is refused as a file would be
    shutil.copy(world / "images" / "000003.png", tmp_path / "ok.png")
    qs = [{"question_id": 1, "image": "thin.png", "text": "What?"},
          {"question_id": 2, "image_b64": base64.b64encode(png_header(10_000, 10_000)).decode(), "text": "What?"},
          {"question_id": 3, "image": "ok.png", "text": "What?"}]
    model, tk = evaluate.load_model(ckpt)
    failed = []
    got = evaluate.answer_file(model, tk, qs, str(tmp_path), str(tmp_path / "a.jsonl"), max_new_tokens=2,
                               progress=False, failed=failed)
    assert [r["question_id"] for r in got] == [3]
    assert [(i, f) for i, f, _ in failed] == [(1, "thin.png"), (2, "its base64 image")]
    assert failed[0][2] == f"decompression bomb: {square}"
    assert failed[1][2].startswith("decompression bomb: ") and "100000000 pixels" in failed[1][2]  # PIL's words
    err = capsys.readouterr().err
    assert "question 1: cannot read image thin.png (decompression bomb:" in err and "answer left empty" in err


def test_process_image_bounds_what_it_allocates():
    """An image that reached process_image by another road is refused there too, before padding or resizing."""
    with pytest.raises(data.ImageRefused, match="pads to a 20000x20000 square"):
        data.process_image(Image.new("L", (20000, 1)), 32)
    with pytest.raises(data.ImageRefused, match="resized to a short side of 336"):  # 336 x 6.7 million
        data.process_image(Image.new("L", (20000, 1)), 336, pad_to_square=False)


def test_fifo_and_device_are_refused_without_blocking(tmp_path, world, ckpt, tok):
    fifo = tmp_path / "cat.png"
    os.mkfifo(fifo)  # nobody writes: opening it for reading would wait forever
    with deadline(20):
        with pytest.raises(data.ImageRefused, match=r"not a regular file: .*cat\.png is a FIFO"):
            data.open_image(fifo)
        with pytest.raises(data.ImageRefused, match="is a character device"):
            data.open_image("/dev/zero")  # would never end
        msg = one_line_exit(sample.main, ["--ckpt", ckpt, "--image", str(fifo), "--prompt", "hi", "--device", "cpu"])
        assert msg == f"sample.py: cannot read image {fifo}: not a regular file: {fifo} is a FIFO (named pipe)"
        model, tk = evaluate.load_model(ckpt)
        failed = []
        got = evaluate.answer_file(model, tk, [{"question_id": 7, "image": "cat.png", "text": "What?"}],
                                   str(tmp_path), str(tmp_path / "a.jsonl"), max_new_tokens=2, progress=False,
                                   failed=failed)
        assert got == [] and failed == [(7, "cat.png", f"not a regular file: {fifo} is a FIFO (named pipe)")]
        (tmp_path / "d.json").write_text(json.dumps([{"id": "fifo", "image": "cat.png", "conversations": conv()},
                                                     {"id": "text", "conversations": conv("Hi?", "Hello.")}]))
        ds = data.LlavaDataset(tmp_path / "d.json", None, tok, "vicuna_v1", 32, 16, max_len=200)
        assert ds[0]["id"] == "text" and ds.skipped == {"not a regular file": 1}


# ----------------------------------------------------------------------------------------------
# 5. image paths stay inside image_folder


def test_image_paths_leaving_the_folder_are_refused(tmp_path, tok):
    folder, outside = tmp_path / "images", tmp_path / "secret"
    folder.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folder / "inside.png")
    Image.new("RGB", (8, 8), (0, 0, 200)).save(outside / "other.png")
    os.symlink(outside / "other.png", folder / "link_out.png")  # a symlink that leads out
    os.symlink(folder / "inside.png", folder / "link_in.png")   # one that stays inside
    rows = [{"id": "dotdot", "image": "../secret/other.png", "conversations": conv()},
            {"id": "absolute", "image": str(outside / "other.png"), "conversations": conv()},
            {"id": "link-out", "image": "link_out.png", "conversations": conv()},
            {"id": "link-in", "image": "link_in.png", "conversations": conv()},
            {"id": "inside", "image": "inside.png", "conversations": conv()}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16, max_len=200)
    # .. and absolute paths are refused by their text when the file is read, before step 1
    assert [s["id"] for s in ds.samples] == ["link-out", "link-in", "inside"]
    assert ds.skipped == {"image outside image_folder": 2}
    # the symlink is resolved when it is opened: refused; the one inside is followed
    assert [ds[k]["id"] for k in range(3)] == ["link-in", "link-in", "inside"]
    assert ds.skipped == {"image outside image_folder": 3}
    with pytest.raises(data.ImageRefused, match=r"link_out\.png resolves to .*secret/other\.png, not under"):
        data.image_path(folder, "link_out.png")
    # a dataset that relies on outside paths says so
    ok = data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16, max_len=200, allow_outside=True)
    assert [ok[k]["id"] for k in range(5)] == ["dotdot", "absolute", "link-out", "link-in", "inside"]
    assert not ok.skipped


# ----------------------------------------------------------------------------------------------
# 2. the read cache never hides a change


def _samples_with_images(tmp_path, n=4):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    rows = [{"id": f"s{k}", "image": f"{k}.png", "conversations": conv()} for k in range(n)]
    rows.append({"id": "text", "conversations": conv("Hi?", "Hello.")})
    (tmp_path / "d.json").write_text(json.dumps(rows))
    return folder


def test_restored_images_are_seen_through_the_cache(tmp_path, tok, caplog):
    folder = _samples_with_images(tmp_path)
    Image.new("RGB", (8, 8)).save(folder / "0.png")  # 3 of 4 missing (a copy not finished yet)
    cache = tmp_path / "cache"
    make = lambda: data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16,  # noqa: E731
                                     max_len=200, cache_dir=cache)
    first = make()
    assert len(first) == 2 and first.missing.startswith("3 of 4 images missing")
    with caplog.at_level(logging.WARNING, logger="nanovt.data"):
        again = make()  # still missing: the list comes from the cache, and the log says so where it shows
    assert again.from_cache and len(again) == 2
    assert any(r.levelno == logging.WARNING and "as recorded in the read cache" in r.getMessage()
               and "3 of 4 images missing" in r.getMessage() for r in caplog.records)
    for k in range(1, 4):  # the copy finishes
        Image.new("RGB", (8, 8)).save(folder / f"{k}.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanovt.data"):
        restored = make()
    assert len(restored) == 5 and not restored.missing and restored.skipped == {}
    assert "3 of the 3 images the read cache" in caplog.text and "are there now" in caplog.text


def test_an_edit_that_keeps_size_and_mtime_is_seen(tmp_path, tok):
    folder = _samples_with_images(tmp_path)
    for k in range(4):
        Image.new("RGB", (8, 8)).save(folder / f"{k}.png")
    cache = tmp_path / "cache"
    make = lambda: data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16,  # noqa: E731
                                     max_len=200, cache_dir=cache)
    assert make().samples[0]["conversations"][1]["value"] == "A red circle."
    st = os.stat(tmp_path / "d.json")
    text = (tmp_path / "d.json").read_text().replace("A red circle.", "A big square.", 1)  # same length
    (tmp_path / "d.json").write_text(text)
    os.utime(tmp_path / "d.json", ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `rsync -t` keep it
    assert os.stat(tmp_path / "d.json").st_size == st.st_size
    assert make().samples[0]["conversations"][1]["value"] == "A big square."


def test_mostly_missing_images_stop_the_dataset(tmp_path, tok):
    folder = _samples_with_images(tmp_path)
    Image.new("RGB", (8, 8)).save(folder / "0.png")  # 3 of 4 missing
    with pytest.raises(errors.InputError, match=rf"3 of 4 image samples have no image file under {folder} "
                                                r"\(more than 50%\).*max_missing_images=1\.0"):
        data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16, max_len=200, max_missing=0.5)
    Image.new("RGB", (8, 8)).save(folder / "1.png")  # 2 of 4: not more than half
    assert len(data.LlavaDataset(tmp_path / "d.json", folder, tok, "vicuna_v1", 32, 16, max_len=200,
                                 max_missing=0.5)) == 3


def test_unmounted_image_folder_stops_training_and_overwrite_reads_afresh(world, tmp_path, capsys):
    mnt, out = tmp_path / "mnt", tmp_path / "run"
    mnt.mkdir()  # the disk that holds the images is not mounted: an empty mount point
    rows = json.loads((world / "instruct.json").read_text())
    with_image = sum(1 for r in rows if r.get("image"))
    argv = tiny_args(str(world), str(out), f"--image_folder={mnt}", "--max_steps=1", "--save_every=0")
    msg = one_line_exit(train.main, argv)
    assert msg == (f"train.py: {with_image} of {with_image} image samples have no image file under {mnt} (more "
                   f"than 50%): is image_folder right, is its disk mounted? To train on the rest anyway, set "
                   f"max_missing_images=1.0")
    assert not any(n.startswith(("step-", "final", "metrics")) for n in os.listdir(out))  # stopped before step 1
    shutil.copytree(world / "images", mnt / "images")  # mounted
    capsys.readouterr()
    train.main(argv + ["--overwrite"])  # --overwrite starts from a clean data cache: every sample is back
    assert f"stage 2 (lm): {len(rows)} samples" in capsys.readouterr().out
    assert os.path.isdir(out / "final")


# ----------------------------------------------------------------------------------------------
# 3. eval.py's answer file: which run wrote it; resumes in question order


@pytest.fixture(scope="module")
def qfile(world, tmp_path_factory):
    qs = [json.loads(line) for line in open(world / "eval_pope.jsonl")][:6]
    path = tmp_path_factory.mktemp("q") / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return str(path)


def eval_args(ckpt, qfile, world, answers, *extra):
    return ["--ckpt", ckpt, "--questions", qfile, "--image-folder", str(world), "--answers", str(answers),
            "--batch-size", "3", "--max-new-tokens", "3", "--device", "cpu", *extra]


def test_swapped_checkpoint_is_refused_not_scored(ckpt, qfile, world, tmp_path):
    answers = tmp_path / "a.jsonl"
    evaluate.main(eval_args(ckpt, qfile, world, answers))
    head, rows = evaluate.read_jsonl(str(answers), header=True)
    assert head["checkpoint"] == os.path.abspath(ckpt) and len(rows) == 6
    assert head["settings"]["max_new_tokens"] == 3 and head["questions"]["n"] == 6
    before = answers.read_bytes()
    # another checkpoint of the same shapes (one tensor retrained) written over the same answer file
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    sd = load_file(str(other / "model.safetensors"))
    sd["mm_head.weight"] = sd["mm_head.weight"] + 1
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    msg = one_line_exit(evaluate.main, eval_args(str(other), qfile, world, answers))
    assert msg.startswith(f"eval.py: {answers} holds answers of another run: weights {os.path.abspath(ckpt)} (")
    assert f"then, {other} (" in msg and msg.endswith("Pass --overwrite to answer again, or choose another answer file")
    assert answers.read_bytes() == before  # nothing touched
    # other settings or other questions: refused, saying which
    msg = one_line_exit(evaluate.main, eval_args(ckpt, qfile, world, answers)[:-3] + ["5", "--device", "cpu"])
    assert "max_new_tokens 3 then, 5 now" in msg and "weights" not in msg
    msg = one_line_exit(evaluate.main, eval_args(ckpt, qfile, world, answers, "--limit", "4"))
    assert "questions " in msg and "(6 questions," in msg and "(4 questions," in msg
    # --overwrite answers again with the new model
    evaluate.main(eval_args(str(other), qfile, world, answers, "--overwrite"))
    head2, rows2 = evaluate.read_jsonl(str(answers), header=True)
    assert head2["checkpoint"] == str(other) and head2["weights"] != head["weights"] and len(rows2) == 6
    # the same run again: reused, nothing asked
    evaluate.main(eval_args(str(other), qfile, world, answers))
    assert evaluate.read_jsonl(str(answers), header=True) == (head2, rows2)


def test_resume_with_another_process_count_writes_question_order(ckpt, qfile, world, tmp_path):
    """Two processes, one killed mid-run, then a rerun with one: the file is the one an uninterrupted run writes."""
    ref = tmp_path / "ref.jsonl"
    evaluate.main(eval_args(ckpt, qfile, world, ref))
    lines = ref.read_text().splitlines(keepends=True)
    header, answers = lines[0], lines[1:]
    out = tmp_path / "r.jsonl"
    # what the killed 2-process run left: each process's part file, with its header, rank 1's last line torn
    (tmp_path / "r.jsonl.part0").write_text(header + answers[0] + answers[2])
    (tmp_path / "r.jsonl.part1").write_text(header + answers[1] + answers[3][:20])
    evaluate.main(eval_args(ckpt, qfile, world, out))
    assert out.read_text() == ref.read_text()
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "ref.jsonl"]


def test_malformed_questions_are_one_line(ckpt, world, tmp_path):
    q = tmp_path / "q.jsonl"
    for bad, want in [({"question_id": 1, "image": "images/000001.png"}, "question 2 has no 'text'"),
                      ({"text": "Hi?"}, "question 2 has no 'question_id'"),
                      ({"question_id": 1, "text": ["Hi?"]}, "question 2: 'text' is a list"),
                      ([1, 2], "question 2 is a JSON list, not an object")]:
        q.write_text(json.dumps({"question_id": 0, "text": "Fine?"}) + "\n" + json.dumps(bad) + "\n")
        msg = one_line_exit(evaluate.main, ["--ckpt", ckpt, "--questions", str(q), "--answers",
                                            str(tmp_path / "a.jsonl"), "--device", "cpu"])
        assert msg == f"eval.py: {q}: {want}"
    assert not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# 4. configs out of bounds, before anything is built


def _bad_checkpoint(ckpt, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad, dirs_exist_ok=True)
    c = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(edit(c)))
    return bad


@pytest.mark.parametrize("edit,want", [
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "layers": 1_000_000}}),
     "nanovt: decoder.layers = 1,000,000 is outside the sane range 1 to 1,024 (the config describes "),
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "layers": 1_000_000}}),
     " bytes)"),  # the parameter count beside the weight files' size
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "layers": 1e6}}),
     "nanovt: decoder.layers = 1000000.0: a whole number is expected"),
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "heads": 0}}),
     "nanovt: decoder.heads = 0 is outside the sane range 1 to 1,024"),
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "heads": 3}}),
     "nanovt: decoder.heads = 3 does not divide decoder.dim = 64"),
    (lambda c: dict(c, nanovt={**c["nanovt"], "vision": {**c["nanovt"]["vision"], "bogus": 1}}),
     "nanovt: unknown key vision.bogus"),
    (lambda c: [c], "expected a JSON object of settings, got a JSON list"),
    (lambda c: dict(c, nanovt={**c["nanovt"], "decoder": {**c["nanovt"]["decoder"], "vocab_size": 2_000_000}}),
     "does not describe these weights (the config describes "),
])
def test_malformed_config_is_one_line_naming_file_and_key(ckpt, tmp_path, edit, want):
    bad = _bad_checkpoint(ckpt, tmp_path, edit)
    t = time.perf_counter()
    for name, main in (("weights.py", weights.main), ("eval.py", evaluate.main), ("sample.py", sample.main)):
        argv = {"weights.py": [str(bad)],
                "eval.py": ["--ckpt", str(bad), "--questions", str(tmp_path / "q.jsonl"), "--answers",
                            str(tmp_path / "a.jsonl"), "--device", "cpu"],
                "sample.py": ["--ckpt", str(bad), "--image", "x.png", "--prompt", "hi", "--device", "cpu"]}[name]
        msg = one_line_exit(main, argv)
        assert msg.startswith(f"{name}: {bad / 'config.json'}") and want in msg, msg
    assert time.perf_counter() - t < 30  # not minutes of building a meta model


def test_million_layer_training_config_is_one_line(world, tmp_path):
    t = time.perf_counter()
    msg = one_line_exit(train.main, tiny_args(str(world), str(tmp_path / "run"), "--model.decoder.layers=1000000"))
    assert msg.startswith("train.py: the config's model: decoder.layers = 1,000,000 is outside the sane range "
                          "1 to 1,024 (the config describes ") and "parameters)" in msg
    assert time.perf_counter() - t < 30


# ----------------------------------------------------------------------------------------------
# 6. one line for every user error of train.py; a programming error keeps its traceback


def test_train_user_errors_are_one_line(world, tmp_path):
    out = str(tmp_path / "run")
    cfg = tmp_path / "c.py"
    cfg.write_text("stage = 2\nmax_steps = 8 +\n")
    assert one_line_exit(train.main, [str(cfg)]) == f"train.py: {cfg}, line 2: invalid syntax"
    cfg.write_text("stage = 2\nmax_steps = undefined_name\n")
    assert one_line_exit(train.main, [str(cfg)]) == \
        f"train.py: {cfg}, line 2: NameError: name 'undefined_name' is not defined"
    assert one_line_exit(train.main, [str(tmp_path / "none.py")]) == \
        f"train.py: cannot read config {tmp_path / 'none.py'}: No such file or directory"
    not_tok = tmp_path / "tokenizer.model"
    not_tok.write_bytes(b"\x00garbage\xff" * 10)
    msg = one_line_exit(train.main, tiny_args(str(world), out) + [f"--tokenizer={not_tok}"])
    assert msg.startswith(f"train.py: cannot read tokenizer {not_tok}: ")
    msg = one_line_exit(train.main, tiny_args(str(world), out) + [f"--data_path={tmp_path / 'none.json'}"])
    assert msg == f"train.py: data_path={tmp_path / 'none.json'}: no such file or directory"
    (tmp_path / "broken.json").write_text('[{"id": 1,}]')
    msg = one_line_exit(train.main, tiny_args(str(world), out) + [f"--data_path={tmp_path / 'broken.json'}"])
    assert msg == f"train.py: {tmp_path / 'broken.json'}: malformed JSON at line 1, column 11: " \
                  f"Expecting property name enclosed in double quotes"


def test_refused_resume_is_one_line(world, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(tiny_args(str(world), out, "--stop_at=4"))
    msg = one_line_exit(train.main, tiny_args(str(world), out, "--resume", "--seed=1"))
    assert msg.startswith(f"train.py: --resume: {os.path.join(out, 'step-4')} was written by a run with other "
                          f"settings: seed (checkpoint 0, now 1)")
    msg = one_line_exit(train.main, tiny_args(str(world), out))
    assert msg.startswith(f"train.py: {out} is not empty (")


def test_programming_errors_keep_their_traceback(monkeypatch, world, tmp_path):
    def broken(cfg):
        return {}[cfg.stage]  # a bug, not the user's doing
    monkeypatch.setattr(train, "run", broken)
    with pytest.raises(KeyError):
        train.main(tiny_args(str(world), str(tmp_path / "run")))
    assert errors.one_line(KeyError("x")) is None and errors.one_line(ZeroDivisionError()) is None


def test_command_line_is_one_line_and_status_1(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("stage = 7\n")
    r = subprocess.run([sys.executable, "train.py", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["train.py: stage must be one of [0, 1, 2, 3, 4], got 7"]


# ----------------------------------------------------------------------------------------------
# a disk that fills up, or is read-only (a tmpfs of our own; skipped where it cannot be mounted)


@contextlib.contextmanager
def tmpfs(path, options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_during_a_save(world, tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as disk:
        out = disk / "run"
        msg = one_line_exit(train.main, tiny_args(str(world), str(out), "--save_every=4"))
        assert msg.startswith(f"train.py: no space left on {out}"), msg
        left = [os.path.join(d, n) for d, dirs, files in os.walk(disk) for n in dirs + files]
        assert not [p for p in left if ".tmp" in os.path.basename(p) or os.path.basename(p).startswith("step-")], left


def test_read_only_out_dir(world, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        out = disk / "run"
        msg = one_line_exit(train.main, tiny_args(str(world), str(out)))
        assert msg == f"train.py: {out}: read-only file system"
