"""conversation.py, tokenizer.py and data.py: templates and label masks, whole-prompt tokenisation,
LLaVA's image recipe against transformers' CLIP processor, every bad input's documented outcome, sampler."""

import base64
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    SYSTEM_VICUNA,
    render_conversation,
    tokenize_conversation,
    tokenize_prompt,
)
from tokenizer import load_tokenizer, train_sentencepiece

SYS = SYSTEM_VICUNA
CONV = [  # multi-turn, <image> at the end of the first question (LLaVA moves it to the front)
    {"from": "human", "value": "What color is the circle?\n<image>"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "There are 3 shapes, naïvely counted: ① ② ③."},  # non-ASCII on purpose
    {"from": "human", "value": "Is there a blue star?"},
    {"from": "gpt", "value": "No"},
]
ANSWERS = [CONV[1]["value"], CONV[3]["value"], CONV[5]["value"]]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """A real sentencepiece model, trained here on a small corpus (byte fallback covers the rest)."""
    corpus = [SYS, "USER: ASSISTANT: [INST] [/INST]"] + [t["value"] for t in CONV] * 5 + [
        "a red circle at the top left and a blue square at the bottom right.",
        "Is there a green triangle in the image? Yes, there is.", "How many stars are there? Two."] * 20
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="module")
def tt_tok(tmp_path_factory):
    """A LLaMA-3 style tiktoken rank file: the 256 bytes plus a few merges."""
    ranks = [bytes([i]) for i in range(256)] + [b" t", b"he", b" the", b"ir", b" c", b" cir", b"cle", b" circle"]
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    return load_tokenizer(path)


# ---------------------------------------------------------------------------- templates

def test_render_templates_exact_strings():
    q1 = "<image>\nWhat color is the circle?"
    assert render_conversation(CONV, "vicuna_v1") == (
        f"{SYS} USER: {q1} ASSISTANT: {ANSWERS[0]}</s>USER: How many shapes are there? ASSISTANT: {ANSWERS[1]}</s>"
        f"USER: Is there a blue star? ASSISTANT: No</s>")
    assert render_conversation(CONV, "mistral_instruct") == (
        f"[INST] {q1} [/INST] {ANSWERS[0]} </s>[INST] How many shapes are there? [/INST] {ANSWERS[1]} </s>"
        f"[INST] Is there a blue star? [/INST] No </s>")
    assert render_conversation(CONV[:2], "plain") == "<image>The circle is red.\n"
    # a conversation ending with a question renders the generation prompt
    assert render_conversation(CONV[:1], "vicuna_v1").endswith(" ASSISTANT:")
    assert render_conversation(CONV[:1], "mistral_instruct").endswith(" [/INST]")


def supervised_runs(ids, labels):
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "plain"])
def test_ids_equal_whole_prompt_and_labels_mask(kind, template, sp_tok, tt_tok, request):
    tok = sp_tok if kind == "sentencepiece" else tt_tok
    conv = CONV[:2] if template == "plain" else CONV
    ids, labels = tokenize_conversation(conv, tok, template, IMAGE_TOKEN_ID, num_patches=7)
    prompt = render_conversation(conv, template)
    # the ids are those of the whole rendered prompt, tokenised at once (no per-turn mismatch)
    assert ids == tokenize_prompt(prompt, tok, IMAGE_TOKEN_ID, 7)
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX
    assert ids.count(IMAGE_TOKEN_ID) == 7 and all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == IMAGE_TOKEN_ID)
    # supervised: exactly each answer and its </s> (plain: the caption and its newline)
    runs = supervised_runs(ids, labels)
    if template == "plain":
        assert [tok.decode(r) for r in runs] == [ANSWERS[0] + "\n"]
    else:
        assert len(runs) == 3
        for run, answer in zip(runs, ANSWERS):
            assert run[-1] == tok.eos_id
            assert tok.decode(run[:-1]).strip() == answer
    # and nothing of the system prompt or the questions
    assert all(l == IGNORE_INDEX for l in labels[:ids.index(IMAGE_TOKEN_ID)])


def test_sentencepiece_ids_without_image(sp_tok):
    conv = [{"from": "human", "value": "Is there a blue star?"}, {"from": "gpt", "value": "No"}]
    ids, labels = tokenize_conversation(conv, sp_tok, "vicuna_v1", has_image=False)
    assert IMAGE_TOKEN_ID not in ids and ids == tokenize_prompt(render_conversation(conv, "vicuna_v1"), sp_tok)
    with pytest.raises(ValueError, match="no image file"):
        tokenize_conversation(CONV, sp_tok, "vicuna_v1", has_image=False)
    # an image with no <image> tag: the tag is prepended to the first question
    ids, _ = tokenize_conversation(conv, sp_tok, "vicuna_v1", num_patches=3, has_image=True)
    assert ids.count(IMAGE_TOKEN_ID) == 3


def test_tokenizer_interface(sp_tok, tt_tok):
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 3) and sp_tok.vocab_size <= 400
    assert sp_tok.piece(sp_tok.encode("circle")[-1]) == "▁circle"
    n = 264  # ranks in the file; LLaMA-3's 256 special tokens follow them
    assert (tt_tok.bos_id, tt_tok.eos_id, tt_tok.pad_id, tt_tok.vocab_size) == (n, n + 1, n + 1, n + 256)
    assert tt_tok.encode(" the circle") == [258, 263] and tt_tok.piece(263) == " circle"
    for tok in (sp_tok, tt_tok):  # an id past the list (an embedding with spare rows) names no word
        assert tok.piece(tok.vocab_size) == "" and tok.piece(-1) == ""
    text = "<|begin_of_text|> héllo ① </s>"
    assert tt_tok.decode(tt_tok.encode(text)) == text and tt_tok.bos_id not in tt_tok.encode(text)
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_train_sentencepiece_deterministic_whole_words(tmp_path):
    texts = ["the red circle and the blue star", "yes no red blue circle star"] * 50
    a = train_sentencepiece(texts, tmp_path / "a.model", vocab_size=340)
    train_sentencepiece(texts, tmp_path / "b.model", vocab_size=340)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert all(len(a.encode(w)) == 1 for w in ["red", "circle", "yes", "star"])


# ---------------------------------------------------------------------------- images

def _photos():
    import skimage.data as sk
    astro = Image.fromarray(sk.astronaut())
    rgba = astro.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(astro.size))
    i16 = Image.fromarray((sk.camera().astype(np.uint16) * 257))
    assert i16.mode == "I;16"
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 700, 3), dtype=np.uint8))
    huge = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2000, 3100, 3), dtype=np.uint8))
    return {"astronaut": astro, "coffee": Image.fromarray(sk.coffee()), "chelsea": Image.fromarray(sk.chelsea()),
            "camera_L": Image.fromarray(sk.camera()), "rgba": rgba, "P": astro.quantize(64),
            "P_adaptive": Image.fromarray(sk.coffee()).convert("P", palette=Image.ADAPTIVE),
            "cmyk": Image.fromarray(sk.chelsea()).convert("CMYK"), "I;16": i16,
            "tiny_1x3": Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)),
            "wide": wide, "tall": wide.transpose(Image.Transpose.ROTATE_90), "huge": huge}


PHOTOS = _photos()


@pytest.mark.parametrize("name", list(PHOTOS))
@pytest.mark.parametrize("pad", [True, False])
def test_process_image_matches_clip_processor(name, pad):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    image, size = PHOTOS[name], 64 if name == "huge" else 336
    hf = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    rgb = data.to_rgb(image)
    if not image.mode.startswith("I;16"):  # LLaVA's first step is .convert("RGB"); ours is the same
        assert np.array_equal(np.asarray(rgb), np.asarray(image.convert("RGB")))
    ref = hf(data.expand_to_square(rgb) if pad else rgb, return_tensors="pt")["pixel_values"][0]
    ours = data.process_image(image, size, pad_to_square=pad)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-5


def test_expand_to_square_and_16_bit():
    im = data.expand_to_square(Image.new("RGB", (4, 2), (255, 0, 0)))
    a = np.asarray(im)
    assert im.size == (4, 4) and (a[0] == (122, 116, 104)).all() and (a[1:3] == (255, 0, 0)).all()
    assert data.CLIP_MEAN_RGB == (122, 116, 104)
    # 16-bit greys are scaled to 8 bits, not clipped to white as PIL's convert("RGB") would
    rgb = np.asarray(data.to_rgb(PHOTOS["I;16"]))
    assert np.array_equal(rgb[..., 0], np.asarray(Image.fromarray(__import__("skimage.data").data.camera())))


# ---------------------------------------------------------------------------- bad input

def _png_header(w, h):
    """A PNG that claims w x h pixels but holds almost nothing: a decompression bomb's header."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _sample(i, q="<image>\nWhat is it?", a="A circle.", image="good.png"):
    s = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    return {**s, "image": image} if image else s


@pytest.fixture
def bad_world(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "good.png")
    buf = io.BytesIO()
    PHOTOS["coffee"].save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (tmp_path / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # PIL's own DecompressionBombError
    (tmp_path / "bomb2.png").write_bytes(_png_header(10_000, 10_000))   # over MAX_PIXELS, under 2x
    samples = [
        _sample("ok-image"),
        _sample("ok-text", q="Is red a color?", image=None),
        _sample("no-tag", q="What is it?"),  # image but no <image>: the tag is prepended
        _sample("truncated", image="truncated.png"),
        _sample("corrupt", image="corrupt.jpg"),
        _sample("missing", image="nope.png"),
        _sample("bomb", image="bomb.png"),
        _sample("bomb2", image="bomb2.png"),
        _sample("too-long", q="<image>\n" + "word " * 300),  # no answer within max_len
        _sample("two-tags", q="<image>\nA <image>"),
        _sample("tag-no-image", image=None),
        {"id": "empty", "conversations": []},
        {"id": "gpt-first", "image": "good.png", "conversations": [{"from": "gpt", "value": "<image>\nHi"}]},
        _sample("ok-last"),
    ]
    (tmp_path / "data.json").write_text(json.dumps(samples))
    return tmp_path


def _dataset(root, sp_tok, **kw):
    return data.LlavaDataset(root / "data.json", None, sp_tok, "vicuna_v1", 32, 4, max_len=200, **kw)


def test_bad_inputs_are_skipped_counted_and_warned_once(bad_world, sp_tok, caplog):
    with caplog.at_level(logging.WARNING, logger="nanovt.data"):
        ds = _dataset(bad_world, sp_tok)
        # text-level problems and missing files are found at init
        assert [s["id"] for s in ds.samples] == ["ok-image", "ok-text", "no-tag", "truncated", "corrupt",
                                                 "bomb", "bomb2", "too-long", "ok-last"]
        assert sum(ds.skipped.values()) == 5
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]  # two epochs
    ok = {"ok-image", "ok-text", "no-tag", "ok-last"}
    assert {it["id"] for it in items} == ok  # every bad one replaced by the next good one
    # gpt-first: LLaVA drops the first turn from gpt, and then nothing is left
    assert ds.skipped == {"empty conversations": 2,
                          "2 <image> tags (one image per sample)": 1, "<image> tag but no image file": 1,
                          "bad image": 2, "missing image file": 1, "decompression bomb": 2, "too long": 1}
    for bad in ["truncated", "corrupt", "missing", "bomb", "bomb2", "too-long", "two-tags", "empty", "gpt-first"]:
        assert sum(f"sample {bad}:" in r.getMessage() for r in caplog.records) == 1, bad  # warned once, with id
    assert "skipped 10 samples" in ds.report()
    no_tag = next(it for it in items if it["id"] == "no-tag")
    assert (no_tag["input_ids"] == IMAGE_TOKEN_ID).sum() == 4 and no_tag["pixel_values"].shape == (3, 32, 32)
    assert next(it for it in items if it["id"] == "ok-text")["pixel_values"] is None
    # skips made while loading reach the batch, so the main process can count them across workers
    assert [s for _, s, _ in ds[3]["skipped"]] == ["truncated", "corrupt", "bomb", "bomb2", "too-long"]


def test_strict_fails_fast(bad_world, sp_tok):
    with pytest.raises(ValueError, match="sample two-tags: 2 <image> tags"):
        _dataset(bad_world, sp_tok, strict=True)
    rows = json.loads((bad_world / "data.json").read_text())
    (bad_world / "one.json").write_text(json.dumps([r for r in rows if r["id"] == "missing"]))
    with pytest.raises(ValueError, match="sample missing: missing image file"):  # found when read
        data.LlavaDataset(bad_world / "one.json", None, sp_tok, "vicuna_v1", 32, 4, strict=True)
    for bad, match in [("truncated", "bad image.*truncated"), ("corrupt", "bad image"),
                       ("bomb", "decompression bomb"), ("bomb2", "decompression bomb"),
                       ("too-long", "image block|no answer")]:
        (bad_world / "one.json").write_text(json.dumps([r for r in rows if r["id"] == bad]))
        ds = data.LlavaDataset(bad_world / "one.json", None, sp_tok, "vicuna_v1", 32, 4, max_len=200, strict=True)
        with pytest.raises(Exception, match=match):
            ds[0]
    # our own pixel limit is read from the header, before decoding
    (bad_world / "one.json").write_text(json.dumps([_sample("small-limit")]))
    ds = data.LlavaDataset(bad_world / "one.json", None, sp_tok, "vicuna_v1", 32, 4, strict=True, max_pixels=1000)
    with pytest.raises(ValueError, match="decompression bomb: 40x30 > 1000 pixels"):
        ds[0]


def test_truncation_never_cuts_an_image_block(bad_world, sp_tok):
    conv = _sample("x", a="word " * 30)["conversations"]
    (bad_world / "one.json").write_text(json.dumps([_sample("x", a="word " * 30)]))
    n = len(tokenize_conversation(conv, sp_tok, "vicuna_v1", IMAGE_TOKEN_ID, 4, True)[0])
    ds = data.LlavaDataset(bad_world / "one.json", None, sp_tok, "vicuna_v1", 32, 4, max_len=n - 5)
    item = ds[0]  # the tail of the answer is cut, the image block is whole
    assert len(item["input_ids"]) == n - 5 and (item["input_ids"] == IMAGE_TOKEN_ID).sum() == 4
    first = tokenize_conversation(conv, sp_tok, "vicuna_v1", IMAGE_TOKEN_ID, 4, True)[0].index(IMAGE_TOKEN_ID)
    ds = data.LlavaDataset(bad_world / "one.json", None, sp_tok, "vicuna_v1", 32, 4, max_len=first + 2)
    with pytest.raises(RuntimeError, match="bad samples in a row"):  # nothing else left to serve
        ds[0]
    assert ds.skipped == {"too long": 1}


def test_malformed_json_names_file_line_and_column(tmp_path, sp_tok):
    (tmp_path / "bad.json").write_text('[\n  {"id": 1,\n   "conversations": [}\n]')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3, column 22"):
        data.LlavaDataset(tmp_path / "bad.json", tmp_path, sp_tok, "vicuna_v1", 32, 4)  # strict or not
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: malformed JSON at line 2"):
        data.read_json(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------- collate, sampler

def test_collate(bad_world, sp_tok):
    ds = _dataset(bad_world, sp_tok)
    items = [ds[1], ds[0], None, ds[2]]  # text-only, image, dropped, image
    b = data.collate(items, pad_id=sp_tok.pad_id)
    T = max(len(it["input_ids"]) for it in items if it)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    assert b["pixel_values"].shape == (2, 3, 32, 32) and b["ids"] == ["ok-text", "ok-image", "no-tag"]
    assert torch.equal(b["pixel_values"][0], items[1]["pixel_values"])
    n0 = len(items[0]["input_ids"])
    assert (b["input_ids"][0, n0:] == sp_tok.pad_id).all() and (b["labels"][0, n0:] == IGNORE_INDEX).all()
    assert b["attention_mask"][0].sum() == n0 and b["attention_mask"].dtype == torch.bool
    assert (b["input_ids"] == IMAGE_TOKEN_ID).sum() == 2 * 4
    assert data.collate([ds[1]], 0)["pixel_values"] is None


def test_sampler_deterministic_sharded_grouped_resumable():
    lengths = [(-1) ** i * (5 + i % 7) for i in range(103)]  # alternating image / text-only
    mk = lambda **kw: data.LengthGroupedSampler(lengths, batch_size=4, seed=3, **kw)
    shards = [list(mk(rank=r, world_size=3)) for r in range(3)]
    assert shards == [list(mk(rank=r, world_size=3)) for r in range(3)]  # deterministic
    assert all(len(s) == 35 == len(mk(rank=0, world_size=3)) for s in shards)  # equal, padded by repeating
    flat = sum(shards, [])
    assert set(flat) == set(range(103)) and len(flat) - len(set(flat)) == 2
    assert list(mk(epoch=1)) != list(mk(epoch=0)) and sorted(mk(epoch=1)) == list(range(103))
    s = mk(rank=1, world_size=3)
    s.set_epoch(2, skip=9)
    assert list(s) == list(mk(rank=1, world_size=3, epoch=2))[9:] and len(s) == 26
    # group by modality: each micro-batch of each rank is all-image or all-text (except the leftover)
    for shard in shards:
        batches = [shard[i:i + 4] for i in range(0, 32, 4)]
        assert sum(len({lengths[i] > 0 for i in b}) == 1 for b in batches) >= len(batches) - 1
    plain = data.LengthGroupedSampler(lengths, 4, seed=3, group_by_length=False)
    assert sorted(plain) == list(range(103))


def test_image_only_dataset(bad_world, sp_tok, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (10, 20)).save(folder / "a.png")
    Image.new("L", (5, 5)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    ds = data.ImageOnlyDataset(folder, sp_tok, 16, 4, IMAGE_TOKEN_ID)
    assert len(ds) == 2 and ds[1]["id"] == "sub/b.jpg"
    item = ds[0]
    assert item["input_ids"].tolist() == [sp_tok.bos_id] + [IMAGE_TOKEN_ID] * 4
    assert (item["labels"] == IGNORE_INDEX).all() and item["pixel_values"].shape == (3, 16, 16)
    ds = data.ImageOnlyDataset(bad_world / "data.json", sp_tok, 16, 4)  # images of a LLaVA JSON
    assert {ds[i]["id"] for i in range(len(ds))} == {"ok-image", "no-tag", "ok-last", "two-tags", "gpt-first", "too-long"}
    assert ds.skipped["bad image"] == 2 and ds.skipped["missing image file"] == 1
