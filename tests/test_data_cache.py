"""The read cache (data.ReadCache): one process per node parses the LLaVA JSON, the others map the
result. A dataset from the cache equals one from parsing; with 2 processes one parses; a changed
source, image folder or option is a miss and the cache is rebuilt."""

import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

import data
from tokenizer import load_tokenizer, train_sentencepiece
from tiny_ckpt import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv(q="<image>\nWhat is it?", a="A red circle."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    corpus = ["What is it? A red circle. How many? Two.", "USER: ASSISTANT:"] * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_sentencepiece(corpus, path, vocab_size=400)
    return path


@pytest.fixture
def source(tmp_path):
    """A JSON with usable samples (image and text-only, non-ASCII), LLaVA's repairs, bad samples
    of several kinds sharing an id, and missing images in two folders."""
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "good.png")
    rows = [{"id": f"ok-{k}", "image": "good.png", "conversations": conv(a="A red circle. " * (k + 1))}
            for k in range(6)]
    rows += [{"id": "text", "conversations": conv("Wie geht's? ünïcode ①", "Gut.")},
             {"id": "gpt-first", "image": "good.png", "conversations": [{"from": "gpt", "value": "Hi"}] + conv()},
             {"id": "unanswered", "conversations": conv("Q?", "A.") + [{"from": "human", "value": "And?"}]},
             {"id": "dup", "image": ["good.png"], "conversations": conv()},
             {"id": "dup", "image": 3, "conversations": conv()}, {"id": "empty", "conversations": []}, "not a dict"]
    rows += [{"id": f"gone-{k}", "image": f"ocr_vqa/{k}.jpg", "conversations": conv()} for k in range(3)]
    rows += [{"id": "gone-coco", "image": "coco/1.jpg", "conversations": conv()}]
    (tmp_path / "d.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return tmp_path / "d.json"


def make(path, tok, **kw):
    return data.LlavaDataset(path, None, tok, "vicuna_v1", 32, 4, max_len=200, **kw)


def state(ds):
    """Everything a dataset holds after its init that later code reads."""
    return {"samples": list(ds.samples), "len": len(ds), "lengths": list(ds.lengths),
            "modality_lengths": list(ds.modality_lengths), "skipped": list(ds.skipped.items()),
            "repaired": list(ds.repaired.items()), "missing": ds.missing, "report": ds.report(),
            "counted": dict(ds._counted)}


def no_reads(monkeypatch):
    def refuse(path):
        raise AssertionError(f"{path} was parsed; the cache should have served it")
    monkeypatch.setattr(data, "read_json", refuse)


def test_from_cache_equals_parsing(source, tok_path, tmp_path, monkeypatch):
    tok = load_tokenizer(tok_path)
    parsed = make(source, tok)  # the reference: no cache
    assert not parsed.from_cache and parsed.skipped and parsed.repaired and parsed.missing  # all kinds occur
    cache = tmp_path / "cache"
    first = make(source, tok, cache_dir=cache)  # parses, writes, then serves from the files
    assert first.from_cache and sorted(p.suffix for p in cache.iterdir()) == [".blob", ".json", ".npy", ".npy"]
    no_reads(monkeypatch)
    other = make(source, tok, cache_dir=cache, write_cache=False)
    for ds in (first, other):
        assert state(ds) == state(parsed)
        assert ds.samples._paths is not None  # memory-mapped, not a private copy
        for i in range(len(parsed)):  # the items too (tokenised, images loaded)
            a, b = parsed[i], ds[i]
            assert a["id"] == b["id"] and a["input_ids"].tolist() == b["input_ids"].tolist()
            assert a["labels"].tolist() == b["labels"].tolist()
            assert (a["pixel_values"] is None) == (b["pixel_values"] is None)
    # the sampler sees the same lengths: the same order
    sampler = lambda ds: data.make_sampler(ds, 4, seed=3, world_size=2, rank=1).indices()  # noqa: E731
    assert sampler(other) == sampler(parsed)
    # nothing in the cache needs unpickling; the metadata is plain JSON
    for f in cache.glob("*.npy"):
        np.load(f, allow_pickle=False)
    meta = json.loads(next(cache.glob("*.json")).read_text())
    assert meta["skipped"] == dict(parsed.skipped) and meta["samples"] == len(parsed)
    # DataLoader workers started by spawn get the dataset pickled: they map the files again
    import pickle
    clone = pickle.loads(pickle.dumps(other.samples))
    assert clone._paths == other.samples._paths and list(clone) == list(parsed.samples)


def test_strict_still_raises_and_is_its_own_key(source, tok_path, tmp_path):
    tok = load_tokenizer(tok_path)
    make(source, tok, cache_dir=tmp_path / "cache")  # a lenient cache exists
    with pytest.raises(ValueError, match="sample dup: image field is not a string"):
        make(source, tok, cache_dir=tmp_path / "cache", strict=True)


def test_a_changed_source_rebuilds_the_cache(source, tok_path, tmp_path, monkeypatch, caplog):
    tok = load_tokenizer(tok_path)
    cache = tmp_path / "cache"
    make(source, tok, cache_dir=cache)
    stems = {p.name.split(".")[0] for p in cache.iterdir()}
    # new content: the cache is a miss, the file is read again and the old cache removed
    rows = json.loads(source.read_text(encoding="utf-8"))
    rows.append({"id": "new", "conversations": conv("New?", "Yes.")})
    source.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    ds = make(source, tok, cache_dir=cache)
    assert state(ds) == state(make(source, tok)) and ds.samples[-1]["id"] == "new"
    new_stems = {p.name.split(".")[0] for p in cache.iterdir()}
    assert len(new_stems) == 1 and new_stems != stems
    # the same bytes rewritten (only the mtime changes): also read again
    st = os.stat(source)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    reads = []
    real = data.read_json
    monkeypatch.setattr(data, "read_json", lambda p: reads.append(p) or real(p))
    make(source, tok, cache_dir=cache)
    assert len(reads) == 1
    make(source, tok, cache_dir=cache)  # and then served from the new cache
    assert len(reads) == 1
    # another image folder (missing images differ) or num_patches (lengths differ): a miss
    folder = tmp_path / "elsewhere"
    (folder / "ocr_vqa").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (8, 8)).save(folder / "ocr_vqa" / f"{k}.jpg")
    moved = data.LlavaDataset(source, folder, tok, "vicuna_v1", 32, 4, max_len=200, cache_dir=cache)
    assert len(reads) == 2 and moved.missing.startswith("8 of 11 images missing")  # 7 x good.png, coco/1.jpg
    patches = data.LlavaDataset(source, None, tok, "vicuna_v1", 32, 9, max_len=200, cache_dir=cache)
    assert len(reads) == 3 and max(patches.lengths) == max(make(source, tok).lengths) + 5
    # a damaged cache (a truncated buffer) is read again, with a warning, not served
    make(source, tok, cache_dir=cache)  # this key's cache again (each new key replaced the one before)
    assert len(list(cache.glob("*.json"))) == 1
    n = len(reads)
    blob = next(cache.glob("*.blob"))
    blob.write_bytes(blob.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING, logger="nanovt.data"):
        ds = make(source, tok, cache_dir=cache)
    assert len(reads) == n + 1 and "unusable" in caplog.text and state(ds) == state(make(source, tok))


def test_two_processes_parse_once(source, tok_path, tmp_path):
    """torchrun with 2 gloo processes on one node: train.build_dataset has LOCAL_RANK 0 parse and
    write the cache; rank 1 waits and maps it. Both get the samples that parsing gives."""
    results = tmp_path / "results"
    results.mkdir()
    t = time.perf_counter()
    torchrun("tests/cache_worker.py", str(source), str(source.parent), str(tok_path), str(tmp_path / "run"),
             str(results))
    assert (results / "reads.txt").read_text().split() == ["0"], time.perf_counter() - t  # one parse, by rank 0
    got = [json.loads((results / f"rank{k}.json").read_text()) for k in range(2)]
    tok = load_tokenizer(tok_path)
    want = make(source, tok)
    for g in got:
        assert g["from_cache"] and g["mapped"]
        assert g["samples"] == list(want.samples) and g["report"] == want.report()
        assert g["modality_lengths"] == list(want.modality_lengths) and g["lengths"] == list(want.lengths)
        assert g["item0"] == want[0]["input_ids"].tolist()
    assert os.listdir(tmp_path / "run" / "data_cache")  # under the run's out_dir
