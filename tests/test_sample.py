"""sample.py on a tiny random checkpoint: greedy output equals generate, multi-turn prompts, the picture."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_ckpt import make_checkpoint, make_world

import data
import inference
import sample
from conversation import IMAGE_TAG, SYSTEM_VICUNA, render_conversation
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    return make_checkpoint(world, tmp_path_factory.mktemp("ckpt") / "tiny"), os.path.join(world, "images",
                                                                                        "000003.png")


def reference(model, tok, image, text, n):
    ids = inference.prompt_ids(model, tok, text, True)
    px = sample.pixels(model, data.load_image(image))
    out = inference.generate(model, torch.tensor([ids]), px, max_new_tokens=n, stop_ids=[tok.eos_id])[0, len(ids):].tolist()
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out


def test_greedy_equals_generate(ckpt, capsys):
    path, image = ckpt
    model, tok = sample.load(path)
    ref = reference(model, tok, image, "What shape is in the center?", 20)
    pieces = []
    text, ids = sample.reply(model, tok, sample.pixels(model, data.load_image(image)), "What shape is in the center?",
                             write=pieces.append, max_new_tokens=20)
    assert ids == ref and len(ref) > 0
    assert "".join(pieces) == tok.decode(ref) + "\n"  # streamed pieces add up to the whole answer
    answer = sample.main(["--ckpt", path, "--image", image, "--prompt", "What shape is in the center?",
                          "--max-new-tokens", "20", "--device", "cpu"])
    assert answer == tok.decode(ref).strip()
    assert capsys.readouterr().out == tok.decode(ref) + "\n"


def test_sampling_is_seeded(ckpt):
    path, image = ckpt
    model, tok = sample.load(path)
    px = sample.pixels(model, data.load_image(image))
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    a = sample.reply(model, tok, px, "Describe the image.", write=lambda s: None, seed=1, **kw)[1]
    b = sample.reply(model, tok, px, "Describe the image.", write=lambda s: None, seed=1, **kw)[1]
    c = sample.reply(model, tok, px, "Describe the image.", write=lambda s: None, seed=2, **kw)[1]
    assert a == b and a != c


def test_chat_history_renders_one_image_block(ckpt, capsys):
    path, image = ckpt
    model, tok = sample.load(path)
    px = sample.pixels(model, data.load_image(image))
    questions = iter(["How many shapes are there?", "What color is the background?"])

    def read(prompt):
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    history = sample.chat(model, tok, px, read=read, max_new_tokens=6)
    assert [t["from"] for t in history] == ["human", "gpt", "human", "gpt"]
    assert history[0]["value"].startswith(IMAGE_TAG + "\n") and IMAGE_TAG not in history[2]["value"]
    # the third turn's generation prompt: the whole chat in the model's template, one image block
    rendered = render_conversation(history[:2] + [{"from": "human", "value": "Q3"}], model.cfg.template)
    assert rendered == (SYSTEM_VICUNA + " USER: <image>\nHow many shapes are there? ASSISTANT: "
                        + history[1]["value"] + "</s>USER: Q3 ASSISTANT:")
    ids = inference.prompt_ids(model, tok, "Q3", True, history[:2])
    n = model.cfg.vision.num_patches
    where = [k for k, i in enumerate(ids) if i == model.cfg.image_token_id]
    assert len(where) == n and where == list(range(where[0], where[0] + n))  # once, contiguous
    assert ids.count(tok.eos_id) == 1  # the first answer's end of turn
    assert capsys.readouterr().out.count("ASSISTANT: ") == 2


def test_visual_token_picture_labels_every_patch(ckpt, tmp_path, capsys):
    path, image = ckpt
    out = str(tmp_path / "vt.png")
    sample.main(["--ckpt", path, "--image", image, "--visual-tokens", out, "--nearest", "--probs", "--cell", "48",
                 "--device", "cpu"])
    model, tok = sample.load(path)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    ids, _ = model.visual_tokens(sample.pixels(model, data.load_image(image)))
    labels = [sample.label(tok, i) for i in ids[0, :, 0].tolist()]
    # stdout: two g x g tables, the first one the top-1 visual tokens, row by row
    text = capsys.readouterr().out
    tables = [block.splitlines()[1:] for block in text.split("\n\n")[:2]]
    assert [len(t) for t in tables] == [g, g]
    cells = [c.strip().rsplit(" ", 1)[0] for row in tables[0] for c in row.split(" | ")]
    assert cells == labels
    # the picture: two panels of g x g cells of 48 px under a title band, a boxed label in every cell
    pic = np.asarray(Image.open(out).convert("RGB"))
    head = pic.shape[0] - g * 48  # the titles, wrapped to the panel's width (never cut), then the grid
    lines = sample.title_lines("visual tokens: top-1 of softmax(W_VM x)", g * 48)
    assert len(lines) > 1 and " ".join(lines) == "visual tokens: top-1 of softmax(W_VM x)"
    assert head >= len(lines) * sample.TITLE_PX and pic.shape[1] == 2 * g * 48 + 16
    for panel in range(2):
        x0 = panel * (g * 48 + 16)
        for r in range(g):
            for c in range(g):
                cell = pic[head + r * 48:head + (r + 1) * 48, x0 + c * 48:x0 + (c + 1) * 48]
                assert (cell == 0).all(-1).sum() > 20, (panel, r, c)  # the label's black box and text


def test_no_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match="python train.py configs/shapes.py"):
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", "x.png", "--prompt", "hi"])


def test_visual_token_picture_24x24(ckpt, tmp_path, capsys):
    # a 336 px CLIP with 14 px patches (24 x 24 = 576 patches, Fig. 4's grid), a tiny width to stay fast
    from model import DecoderConfig, VisionConfig, VTLMM, VTLMMConfig
    path, image = ckpt
    tok = load_tokenizer(path)
    cfg = VTLMMConfig(vision=VisionConfig(image_size=336, patch_size=14, width=16, layers=2, heads=2, mlp=32),
                      decoder=DecoderConfig(vocab_size=tok.vocab_size, dim=32, layers=1, heads=2, kv_heads=2,
                                            hidden=64, max_seq_len=1024))
    torch.manual_seed(0)
    big = str(tmp_path / "big")
    VTLMM(cfg).save_pretrained(big)
    os.symlink(os.path.join(path, "tokenizer.model"), os.path.join(big, "tokenizer.model"))
    out = str(tmp_path / "vt24.png")
    sample.main(["--ckpt", big, "--image", image, "--visual-tokens", out, "--device", "cpu"])
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]
    assert len(table) == 24 and all(len(row.split(" | ")) == 24 for row in table)  # the text table, still printed
    pic = Image.open(out)
    title = sample.title_lines("visual tokens: top-1 of softmax(W_VM x)", 24 * 32 + 260)
    assert len(title) == 1  # the full title on one line
    assert pic.size == (24 * 32 + 260, len(title) * (sample.TITLE_PX + 4) + 8 + 24 * 32)  # 32 px patches + legend


def test_regions_and_legend():
    # a made-up 24 x 24 top-1 map: sky above, grass below, a 4 x 4 sun, and 20 rare tokens in the grass
    g, cell = 24, 32
    labels = [["sky" if r < 12 else "grass" for c in range(g)] for r in range(g)]
    for r in range(2, 6):
        for c in range(18, 22):
            labels[r][c] = "sun"
    for k in range(20):
        labels[14 + k // 10][2 + k % 10] = f"rare{k}"
    entries = sample.legend_entries(labels)
    assert entries[:3] == [("sky", 288 - 16, sample.PALETTE[0]), ("grass", 288 - 20, sample.PALETTE[1]),
                           ("sun", 16, sample.PALETTE[2])]
    assert entries[-1] == (f"other ({23 - len(sample.PALETTE)} tokens)", 23 - len(sample.PALETTE), sample.OTHER)
    panel = np.asarray(sample.draw_panel(Image.new("RGB", (336, 336), "white"), labels, "a title", cell))
    head = panel.shape[0] - max(g * cell, 12 + 22 * len(entries))
    assert panel.shape[1] == g * cell + 260

    def border_below(r, c):  # the 2 px line under patch (r, c), sampled at the patch's middle column
        return (panel[head + (r + 1) * cell:head + (r + 1) * cell + 2, c * cell + cell // 2] == 0).all()

    def border_right(r, c):
        return (panel[head + r * cell + cell // 2, (c + 1) * cell:(c + 1) * cell + 2] == 0).all()
    assert border_below(11, 0) and border_below(5, 19) and border_right(3, 17) and border_right(3, 21)
    assert not border_below(3, 3) and not border_right(20, 20) and not border_right(3, 19)  # inside a region
    # patches are tinted with their token's colour: sky and sun differ, two sky patches agree
    mid = lambda r, c: panel[head + r * cell + cell // 2, c * cell + cell // 2]  # noqa: E731
    assert (mid(0, 0) == mid(8, 10)).all() and not (mid(0, 0) == mid(3, 19)).all()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_decoding_streams_the_same_answer(ckpt, capsys):
    path, image = ckpt
    model, tok = sample.load(path)
    ref = reference(model, tok, image, "What shape is in the center?", 20)  # the growing-cache path below
    ref_dynamic = inference.generate(model, torch.tensor([inference.prompt_ids(model, tok, "What shape is in the center?", True)]),
                                 sample.pixels(model, data.load_image(image)), max_new_tokens=20, static=False,
                                 stop_ids=[tok.eos_id])
    assert ref == [t for t in ref_dynamic[0, -20:].tolist() if t != tok.eos_id][:len(ref)]
    answer = sample.main(["--ckpt", path, "--image", image, "--prompt", "What shape is in the center?",
                          "--max-new-tokens", "20", "--device", "cpu", "--compile", "on"])
    assert answer == tok.decode(ref).strip()
    assert capsys.readouterr().out == tok.decode(ref) + "\n"
