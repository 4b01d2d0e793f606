"""sample.py on a tiny random checkpoint: greedy output equals generate, multi-turn prompts, the picture."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluate
import sample
from tiny_ckpt import make_checkpoint, make_world


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    return make_checkpoint(world, tmp_path_factory.mktemp("ckpt") / "tiny"), os.path.join(world, "images",
                                                                                        "000003.png")


def reference(model, tok, image, text, n):
    ids = evaluate.prompt_ids(model, tok, text, True)
    px = sample.pixels(model, data.load_image(image))
    out = model.generate(torch.tensor([ids]), px, max_new_tokens=n, stop_ids=[tok.eos_id])[0, len(ids):].tolist()
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
                          "--max-new-tokens", "20"])
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
    assert history[0]["value"].startswith(data.IMAGE_TAG + "\n") and data.IMAGE_TAG not in history[2]["value"]
    # the third turn's generation prompt: the whole chat in the model's template, one image block
    rendered = data.render_conversation(history[:2] + [{"from": "human", "value": "Q3"}], model.cfg.template)
    assert rendered == (data.SYSTEM_VICUNA + " USER: <image>\nHow many shapes are there? ASSISTANT: "
                        + history[1]["value"] + "</s>USER: Q3 ASSISTANT:")
    ids = evaluate.prompt_ids(model, tok, "Q3", True, history[:2])
    n = model.cfg.vision.num_patches
    where = [k for k, i in enumerate(ids) if i == model.cfg.image_token_id]
    assert len(where) == n and where == list(range(where[0], where[0] + n))  # once, contiguous
    assert ids.count(tok.eos_id) == 1  # the first answer's end of turn
    assert capsys.readouterr().out.count("ASSISTANT: ") == 2


def test_visual_token_picture_labels_every_patch(ckpt, tmp_path, capsys):
    path, image = ckpt
    out = str(tmp_path / "vt.png")
    sample.main(["--ckpt", path, "--image", image, "--visual-tokens", out, "--nearest", "--probs", "--cell", "48"])
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
    head = 24
    assert pic.shape == (head + g * 48, 2 * g * 48 + 16, 3)
    for panel in range(2):
        x0 = panel * (g * 48 + 16)
        for r in range(g):
            for c in range(g):
                cell = pic[head + r * 48:head + (r + 1) * 48, x0 + c * 48:x0 + (c + 1) * 48]
                assert (cell == 0).all(-1).sum() > 20, (panel, r, c)  # the label's black box and text


def test_no_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match="python train.py configs/shapes.py"):
        sample.main(["--ckpt", str(tmp_path / "nothing"), "--image", "x.png", "--prompt", "hi"])
