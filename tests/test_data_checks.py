"""Bad data is found before step 1 and counted exactly: read-time type and image checks, LLaVA's
repairs, clear file errors, and exact skip counts in a real run with DataLoader workers and with
two processes."""

import codecs
import json
import logging
import os

import pytest
from PIL import Image

import data
import shapes
import train
from conversation import IMAGE_TOKEN_ID, REPAIRS, tokenize_conversation
from tokenizer import train_sentencepiece
from tiny_ckpt import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv(q="<image>\nWhat is it?", a="A circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = ["What is it? A circle. How many? Two.", "USER: ASSISTANT:"] * 20
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


def dataset(path, tok, **kw):
    return data.LlavaDataset(path, None, tok, "vicuna_v1", 32, 4, max_len=200, **kw)


def test_types_and_missing_folder_found_when_read(tmp_path, tok, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    rows = [{"id": "ok", "image": "good.png", "conversations": conv()},
            {"id": "list", "image": ["good.png", "good.png"], "conversations": conv()},
            {"id": "int", "image": 7, "conversations": conv()},
            {"id": "convs", "conversations": "hello"}]
    # a missing sub-folder: far more than max_tries (64) consecutive samples
    rows += [{"id": f"ocr-{k}", "image": f"ocr_vqa/images/{k}.jpg", "conversations": conv()} for k in range(100)]
    rows += [{"id": "gone", "image": "coco/train2017/1.jpg", "conversations": conv()}]
    rows += [{"id": f"ok-{k}", "image": "good.png", "conversations": conv()} for k in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="nanovt.data"):
        ds = dataset(tmp_path / "d.json", tok)
    assert [s["id"] for s in ds.samples] == ["ok", "ok-0", "ok-1", "ok-2"]  # only usable samples are served
    assert ds.skipped == {"image field is not a string (list; one image path per sample)": 1,
                          "image field is not a string (int; one image path per sample)": 1,
                          "conversations is not a list (str)": 1, "missing image file": 101}
    summary = "101 of 105 images missing, by folder: ocr_vqa/images 100, coco/train2017 1"
    assert ds.missing == summary and summary in ds.report()
    assert sum(summary in r.getMessage() for r in caplog.records) == 1
    assert all(ds[i]["pixel_values"] is not None for i in range(len(ds)))  # an epoch never stops
    with pytest.raises(ValueError, match="sample list: image field is not a string"):
        dataset(tmp_path / "d.json", tok, strict=True)
    # stage III reads the same file: the same checks
    img = data.ImageOnlyDataset(tmp_path / "d.json", tok, 16, 4)
    assert len(img) == 4 and img.skipped["missing image file"] == 101 and sum(img.skipped.values()) == 103


def test_llava_repairs_are_made_and_counted(tmp_path, tok):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    rows = [{"id": "gpt-first", "image": "good.png",
             "conversations": [{"from": "gpt", "value": "Hello!"}] + conv()},
            {"id": "unanswered", "image": "good.png",
             "conversations": conv() + [{"from": "human", "value": "And then?"}]},
            {"id": "only-question", "conversations": [{"from": "human", "value": "Hi?"}]},
            {"id": "only-gpt", "conversations": [{"from": "gpt", "value": "Hi"}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = dataset(tmp_path / "d.json", tok)
    assert [s["id"] for s in ds.samples] == ["gpt-first", "unanswered"]
    assert ds.repaired == {REPAIRS["first"]: 1, REPAIRS["last"]: 1}
    assert ds.skipped == {"last turn has no answer": 1, "empty conversations": 1}
    assert "repaired 1 (dropped a first turn from gpt), 1 (dropped a last question without an answer)" in ds.report()
    for k in range(2):  # what is left is exactly the answered turn, rendered as LLaVA renders it
        assert ds.samples[k]["conversations"] == conv()
        want = tokenize_conversation(conv(), tok, "vicuna_v1", IMAGE_TOKEN_ID, 4, True)
        assert ds[k]["input_ids"].tolist() == want[0] and ds[k]["labels"].tolist() == want[1]
    assert rows[0]["conversations"][0]["from"] == "gpt"  # the input is not changed


def test_bad_samples_sharing_an_id_count_per_sample(tmp_path, tok):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg" * 20)
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    rows = [{"id": "same", "image": "bad.jpg", "conversations": conv()} for _ in range(3)]
    rows += [{"id": "same", "image": 5, "conversations": conv()} for _ in range(2)]
    rows += [{"id": "ok", "image": "good.png", "conversations": conv()}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = dataset(tmp_path / "d.json", tok)
    for _ in range(2):  # two epochs: each bad sample still counts once
        [ds[i] for i in range(len(ds))]
    assert ds.skipped["bad image"] == 3 and sum(ds.skipped.values()) == 5


def test_file_errors_are_clear(tmp_path, tok):
    lines = "".join(json.dumps({"id": k, "conversations": conv("Q?")}) + "\n" for k in range(3))
    (tmp_path / "lines.json").write_text(lines)
    with pytest.raises(ValueError, match=r"lines\.json: a second JSON value starts at line 2, column 1; "
                                         r"this looks like JSON Lines"):
        dataset(tmp_path / "lines.json", tok)
    (tmp_path / "lines.jsonl").write_text(lines)
    assert len(dataset(tmp_path / "lines.jsonl", tok)) == 3  # the same content named .jsonl is fine
    body = json.dumps([{"id": 1, "conversations": conv("Q?")}, {"id": 2, "conversations": conv("Q?", "é")}],
                      ensure_ascii=False)
    bad = body.encode("utf-8").replace("é".encode("utf-8"), b"\xe9")  # Latin-1 bytes
    (tmp_path / "latin1.json").write_bytes(bad)
    offset = bad.index(b"\xe9")
    msg = rf"latin1\.json: not UTF-8 text: byte 0xe9 at byte offset {offset} \(line 1\)"
    with pytest.raises(ValueError, match=msg):
        dataset(tmp_path / "latin1.json", tok)
    (tmp_path / "bom.json").write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + lines.encode("utf-8"))
    assert len(dataset(tmp_path / "bom.json", tok)) == 2 and len(dataset(tmp_path / "bom.jsonl", tok)) == 3
    with pytest.raises(ValueError, match=r"bom\.json\w*: not UTF-8 text: byte 0xff at byte offset 5 \(line 3\)"):
        (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + b"\n\n\xff")
        data.read_json(tmp_path / "bom.jsonl")


# ---------------------------------------------------------------------------- in a real run

@pytest.fixture(scope="module")
def bad_run_data(tmp_path_factory):
    """A shapes world and a JSON of 64 usable samples (4 steps of 16) plus every kind of bad one."""
    world = tmp_path_factory.mktemp("world")
    shapes.make_shapes_world(world, n_images=80, image_size=32, vocab_size=600, workers=1)
    good = [s for s in json.loads((world / "instruct.json").read_text()) if s.get("image")][:59]
    (world / "broken").mkdir()
    (world / "broken" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 10)
    corrupt = [{**good[k], "id": "dup", "image": "broken/a.jpg"} for k in range(3)]  # one id, three samples
    repaired = [{**good[5], "id": "gpt-first",
                 "conversations": [{"from": "gpt", "value": "Hi"}] + good[5]["conversations"]},
                {**good[6], "id": "unanswered", "conversations": good[6]["conversations"] + [
                    {"from": "human", "value": "And?"}]}]
    bad = [{**good[0], "id": "list", "image": [good[0]["image"]]}, {**good[0], "id": "int", "image": 3},
           {"id": "empty", "conversations": []}]
    missing = [{**good[k % 50], "id": f"ocr-{k}", "image": f"ocr_vqa/images/{k}.jpg"} for k in range(70)]
    rows = good[:20] + corrupt + missing + good[20:] + bad + repaired
    path = world / "bad.json"
    path.write_text(json.dumps(rows))
    want = {"skipped": {"missing image file": 70, "bad image": 3, "empty conversations": 1,
                        "image field is not a string (list; one image path per sample)": 1,
                        "image field is not a string (int; one image path per sample)": 1},
            "repaired": {REPAIRS["first"]: 1, REPAIRS["last"]: 1},
            "missing": "70 of 134 images missing, by folder: ocr_vqa/images 70"}
    return world, path, want


def run_args(world, path, out, *extra):
    # 70 of 134 images missing is over train.py's default max_missing_images (0.5): this data means it
    return [os.path.join(ROOT, "configs/tiny.py"), "--hook={}", f"--tokenizer={world}/tokenizer.model",
            f"--data_path={path}", f"--image_folder={world}", f"--out_dir={out}", "--max_steps=0", "--epochs=1",
            "--global_batch=16", "--micro_batch=4", "--save_every=0", "--log_every=1", "--max_missing_images=1.0",
            *extra]


def report(out):
    with open(os.path.join(out, "data_report.json")) as f:
        r = json.load(f)
    return {k: r[k] for k in ("skipped", "repaired", "missing")}


@pytest.mark.parametrize("workers", [2])
def test_exact_counts_in_a_run_with_workers(bad_run_data, tmp_path, workers):
    world, path, want = bad_run_data
    out = str(tmp_path / "run")
    train.run(train.load_config(run_args(world, path, out, f"--num_workers={workers}")))
    assert report(out) == want
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 4  # the whole epoch: 64 usable samples, 16 a step


def test_exact_counts_with_two_processes_and_resume(bad_run_data, tmp_path):
    world, path, want = bad_run_data
    out = str(tmp_path / "two")
    torchrun("train.py", *run_args(world, path, out, "--num_workers=2"))
    assert report(out) == want  # each rank loaded half the samples; the report holds both halves
    # a run stopped mid-epoch resumes past the missing folder to the end
    out = str(tmp_path / "resumed")
    assert train.run(train.load_config(run_args(world, path, out, "--stop_at=2"))) is None
    train.run(train.load_config(run_args(world, path, out, "--resume")))
    assert report(out)["skipped"]["missing image file"] == 70


def test_samples_are_kept_compactly(tmp_path, tok):
    rows = [{"id": k, "conversations": conv(f"Question {k} ünïcode?", "42")} for k in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = dataset(tmp_path / "d.json", tok)
    assert isinstance(ds.samples, data.SampleIndex) and len(ds.samples) == 5
    assert list(ds.samples) == rows and ds.samples[-1] == rows[4]
    ds.samples[0]["id"] = "changed"  # each access decodes a fresh dict
    assert ds.samples[0]["id"] == 0
    with pytest.raises(IndexError):
        ds.samples[5]
    assert list(ds.modality_lengths) == [-sum(len(t["value"].split()) for t in r["conversations"]) for r in rows]
