"""shapes.py world version 3: deterministic, patches predictable in raster order (and not in version 2),
version 2 unchanged, the visual-token naming share by its definition, the demo's scoring path."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_ckpt import make_checkpoint

import shapes_ablate as ablate
import data
import eval as evaluate
import shapes
import train
from conversation import IMAGE_TAG
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    d = tmp_path_factory.mktemp("world3")
    shapes.make_shapes_world(d, n_images=80, image_size=48, vocab_size=600, workers=1, version=3)
    return d


def test_v3_is_deterministic_and_keeps_the_question_types(world3, tmp_path):
    shapes.make_shapes_world(tmp_path, n_images=80, image_size=48, vocab_size=600, workers=2, version=3)
    for name in ["stage1_captions.json", "instruct.json", "eval_pope.jsonl", "eval_short.jsonl", "text_corpus.txt",
                 "tokenizer.model", "images/000042.png"]:
        assert (tmp_path / name).read_bytes() == (world3 / name).read_bytes(), name
    w = json.loads((world3 / "world.json").read_text())
    assert w["version"] == 3 == shapes.WORLD_VERSION
    instruct = json.loads((world3 / "instruct.json").read_text())
    assert any("image" not in s for s in instruct)  # text-only turns
    questions = {t["value"].replace(IMAGE_TAG, "").split("\n")[1 if t["value"].startswith(IMAGE_TAG) else 0]
                 for s in instruct if "image" in s for t in s["conversations"][0::2]}
    for start in ("How many", "What color is the", "Where is the", "What shape is", "Is there", "Describe"):
        assert any(q.startswith(start) for q in questions), start
    pope = [json.loads(x) for x in (world3 / "eval_pope.jsonl").read_text().splitlines()]
    assert {p["category"] for p in pope} == {"random", "popular", "adversarial"}
    # captions name the objects colour first, from the last in raster order (the highest cell) to the first
    captions = json.loads((world3 / "stage1_captions.json").read_text())
    for c in captions[:30]:
        scene = shapes.scene_of(0, int(c["id"].split("-")[1]), 3)
        last = max(scene["objects"], key=lambda o: o[3])
        assert c["conversations"][1]["value"].startswith(f"{last[0]} {last[1]} "), (c, scene)
        assert all(sz == "large" for _, _, sz, _ in scene["objects"])


def test_v2_generates_exactly_as_before(tmp_path):
    """Version 2's files, pinned by their SHA-256 as the generator wrote them before version 3 existed."""
    shapes.make_shapes_world(tmp_path, n_images=60, seed=3, vocab_size=600, workers=1, version=2)
    pinned = {"stage1_captions.json": "9acefa17fe3018a3134d889020083f931aa03341e7eb9439c02fc0564f263af2",
              "instruct.json": "19e9e15153895d0fab1728e926dabe094e91ccf9ab0df68192ef9831d29a2eaa",
              "eval_pope.jsonl": "4d3374ab1b7ad53c551b48c8fc549865a3fb70f2b838c0a1efce222d37bcddfd",
              "eval_short.jsonl": "f4e70be079701ca6bc7f38354e5119a0131aab6a086b767663e0adb6e2cef800",
              "text_corpus.txt": "fd8ae5805d5b34a45b6901944739991b866cb2f73766a38fddf54af2aec471d3"}
    for name, digest in pinned.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name
    assert json.loads((tmp_path / "world.json").read_text())["version"] == 2


def test_a_world_of_another_version_is_rebuilt(tmp_path):
    shapes.ensure_shapes_world(tmp_path, version=2, n_images=40, vocab_size=600, workers=1)
    v2 = (tmp_path / "stage1_captions.json").read_text()
    shapes.ensure_shapes_world(tmp_path, version=2, n_images=40, vocab_size=600, workers=1)
    assert (tmp_path / "stage1_captions.json").read_text() == v2  # the right version: kept
    shapes.ensure_shapes_world(tmp_path, version=3, n_images=40, vocab_size=600, workers=1)
    assert json.loads((tmp_path / "world.json").read_text())["version"] == 3
    assert (tmp_path / "stage1_captions.json").read_text() != v2
    with pytest.raises(ValueError, match="versions 2 and 3"):
        shapes.scene_of(0, 0, version=1)


def test_patch_labels_say_what_the_pixels_show(world3):
    """Every patch of a 6 x 6 grid labelled with an object holds pixels of that object's colour;
    every other patch holds only the background colour (up to anti-aliasing at no distance)."""
    w = json.loads((world3 / "world.json").read_text())
    for i in range(30):
        scene = shapes.scene_of(w["seed"], i, 3)
        labels = shapes.patch_labels(scene, 6)
        assert shapes.patch_labels(scene, 3) == shapes.cell_labels(scene)[0]  # one patch per cell: the cells
        px = torch.tensor(np.asarray(Image.open(world3 / f"images/{i:06d}.png")), dtype=torch.float)
        bg = torch.tensor(shapes.BACKGROUNDS[scene["background"]], dtype=torch.float)
        for t, y in enumerate(labels):
            patch = px[8 * (t // 6):8 * (t // 6 + 1), 8 * (t % 6):8 * (t % 6 + 1)].reshape(-1, 3)
            if y:
                color = torch.tensor(shapes.COLORS[list(shapes.COLORS)[(y - 1) // 4]], dtype=torch.float)
                assert ((patch - color).abs().max(-1).values < 3).sum() >= 4, (i, t)
            else:
                assert ((patch - bg).abs().max(-1).values < 1).all(), (i, t)


def test_raster_predictability_by_hand():
    """g = 2; counted on images 0 and 2 (A = [0, 1, 0, 0] twice), scored on 1 and 3 (B = [0, 1, 0, 3]).
    Contexts (position, predecessor, above) from A: (0,-,-) -> 0, (1,0,-) -> 1, (2,0,1) -> 0, (3,0,0) -> 0;
    majority overall 0, among objects 1. On B: right at 0, 1, 2, wrong at 3 (3/4); "always 0" is right at
    0 and 2 (1/2); object patches 1 and 3: the table gets 1 (1/2), "always 1" gets 1 (1/2)."""
    A, B = [0, 1, 0, 0], [0, 1, 0, 3]
    r = shapes.raster_predictability([A, B, A, B], 2)
    assert (r["accuracy"], r["chance"], r["object_accuracy"], r["object_chance"]) == (0.75, 0.5, 0.5, 0.5)
    assert (r["patches"], r["object_patches"]) == (8, 4)


def test_v3_patches_are_predictable_from_raster_predecessors_v2_cells_are_not():
    v3 = shapes.raster_predictability([shapes.patch_labels(shapes.scene_of(0, i, 3), 6) for i in range(600)], 6)
    v2 = shapes.raster_predictability([shapes.patch_labels(shapes.scene_of(0, i, 2), 3) for i in range(600)], 3)
    assert v3["object_accuracy"] > v3["object_chance"] + 0.4 and v3["accuracy"] > v3["chance"] + 0.1, v3
    # version 2 as the demo saw it (one patch per cell): no better than guessing
    assert v2["object_accuracy"] <= v2["object_chance"] and v2["accuracy"] <= v2["chance"] + 0.01, v2


def test_naming_counts_by_hand():
    red_circle = 1 + 4 * list(shapes.COLORS).index("red") + shapes.SHAPES.index("circle")
    blue_star = 1 + 4 * list(shapes.COLORS).index("blue") + shapes.SHAPES.index("star")
    words = [["red", "circle", "at", "white"], ["blue", "red", "star", "gray"]]
    labels = [[red_circle, red_circle, red_circle, 0], [blue_star, blue_star, 0, 0]]
    n = shapes.naming_counts(words, labels, ["white", "black"])
    # object patches: red|rc, circle|rc, at|rc, blue|bs, red|bs -> named 3 of 5 (colour 2, shape 1)
    assert n["object_patches"] == 5 and n["named"] == 3 / 5 and n["named_color"] == 2 / 5 and n["named_shape"] == 1 / 5
    # background patches: white|white (named), star|black, gray|black -> 1 of 3 names its background, 1 a shape
    assert n["background_patches"] == 3 and n["background_named_background"] == 1 / 3
    assert n["background_color_or_shape"] == 1 / 3
    assert n["object_top"][0] == ("red", 2 / 5) and dict(n["background_top"]) == {"white": 1 / 3, "star": 1 / 3, "gray": 1 / 3}


@pytest.fixture(scope="module")
def tiny3(world3, tmp_path_factory):
    """A tiny random model on a 6 x 6 grid of 8 px patches over the 48 px version-3 world."""
    cfg = train.load_config([os.path.join(ROOT, "configs/tiny.py"), f"--tokenizer={world3}/tokenizer.model"])
    cfg.model = dict(vision=dict(image_size=48, patch_size=8, width=32, layers=1, heads=2, mlp=64),
                     decoder=dict(dim=32, layers=1, heads=2, kv_heads=2, hidden=64, max_seq_len=256))
    tok = load_tokenizer(cfg.tokenizer)
    return train.build_model(cfg, tok).eval(), tok


def test_naming_on_a_tiny_model_follows_the_definition(world3, tiny3):
    model, tok = tiny3
    n = shapes.visual_token_naming(model, tok, world3, n_images=3)
    w = json.loads((world3 / "world.json").read_text())
    held = range(w["n_images"] - w["counts"]["eval_images"], w["n_images"])[:3]
    named = objects = 0
    for i in held:  # the definition, by hand: top-1 of softmax(W_VM x) per patch against the generator's labels
        scene = shapes.scene_of(0, i, 3)
        px = data.process_image(Image.open(world3 / f"images/{i:06d}.png"), 48)[None]
        top = model.vm_head(model.image_features(px))[0].argmax(-1)
        for t, y in enumerate(shapes.patch_labels(scene, 6)):
            if y:
                word = tok.piece(int(top[t])).replace("\u2581", "").lower()
                objects += 1
                named += word in (list(shapes.COLORS)[(y - 1) // 4], shapes.SHAPES[(y - 1) % 4])
    assert (n["images"], n["grid"], n["object_patches"]) == (3, 6, objects) and n["named"] == named / objects


def test_prediction_naming_scores_the_prediction_of_each_next_patch(world3, tiny3, monkeypatch):
    """Eq. 9's target for patch j is the MM head's prediction at position j of BOS + patches (docs/method.md
    §Index convention): it is computed from the first j + 1 positions only, and scored against patch j."""
    model, tok = tiny3
    seen = []
    monkeypatch.setattr(shapes, "naming_counts", lambda words, labels, bg: seen.append((words, labels)) or {})
    shapes.prediction_naming(model, tok, world3, n_images=1)
    (words,), (labels,) = seen[0]
    w = json.loads((world3 / "world.json").read_text())
    i = w["n_images"] - w["counts"]["eval_images"]
    assert labels == shapes.patch_labels(shapes.scene_of(0, i, 3), 6)
    px = data.process_image(Image.open(world3 / f"images/{i:06d}.png"), 48)[None]
    x, _, _ = model.embed(torch.tensor([[tok.bos_id] + [model.cfg.image_token_id] * 36]), px)
    for j in (0, 1, 7, 35):  # the prediction for patch j, from a prefix that ends with the position before it
        top = model.mm_head(model.decoder(x[:, :j + 1]))[0, -1].argmax()
        assert words[j] == shapes.token_word(tok, top), j


def test_naming_reads_the_patches_in_raster_order(world3, tiny3, monkeypatch):
    """A stand-in VM head that names the colour of each patch's pixels: every object patch is named by
    its colour, every background patch by the background (the labels line up with the patches)."""
    model, tok = tiny3
    names = list(shapes.COLORS) + list(shapes.BACKGROUNDS)
    rgb = torch.tensor([*shapes.COLORS.values(), *shapes.BACKGROUNDS.values()], dtype=torch.float) / 255
    ids = torch.tensor([tok.encode(x)[-1] for x in names])
    mean, std = torch.tensor(data.CLIP_MEAN).view(3, 1, 1), torch.tensor(data.CLIP_STD).view(3, 1, 1)

    def by_colour(px):
        img = px * std + mean  # (N, 3, 48, 48) back to [0, 1]
        patches = img.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 4, 5, 1).reshape(len(px), 36, 64, 3)
        nearest = (patches[:, :, :, None] - rgb).abs().amax(-1).argmin(-1)  # per pixel, the nearest named colour
        found = torch.stack([torch.bincount(row, minlength=len(names)) for row in nearest.flatten(0, 1)])
        found[:, len(shapes.COLORS):] *= found[:, :len(shapes.COLORS)].sum(-1, keepdim=True) == 0  # object first
        return ids[found.argmax(-1)].view(len(px), 36, 1), None

    monkeypatch.setattr(model, "visual_tokens", by_colour)
    n = shapes.visual_token_naming(model, tok, world3, n_images=0)
    assert n["images"] == 4 and n["named_color"] == 1.0 and n["named_shape"] == 0.0
    assert n["background_named_background"] == 1.0


def test_held_out_report_scores_answers_and_names(world3, tmp_path, monkeypatch):
    """The demo's scoring path: answers are scored as VQA accuracy (short) and POPE, the naming share
    is added, and eval.json holds it all. Answers come from a stand-in: gold for even question ids."""
    ckpt = make_checkpoint(str(world3), tmp_path / "ckpt")
    calls = []

    def answer(model, tok, qs, folder, path, **kw):
        calls.append(len(qs))
        rows = [{"question_id": q["question_id"], "text": (q.get("answer") or q["label"]).capitalize() + "."
                 if q["question_id"] % 2 == 0 else "banana"} for q in qs]
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    monkeypatch.setattr(evaluate, "answer_file", answer)
    out = tmp_path / "run" / "eval.json"
    out.parent.mkdir()
    r = shapes.held_out_report(ckpt, str(world3), limit=6, out_path=str(out), progress=False, naming_images=2)
    assert calls == [6, 6] and (r["short"]["accuracy"], r["short"]["n"]) == (0.5, 6)
    shorts = [json.loads(x) for x in (world3 / "eval_short.jsonl").read_text().splitlines()][:6]
    by_kind = {}
    for q in shorts:  # even ids answered with the gold answer, odd ones wrong
        by_kind.setdefault(shapes.short_kind(q["text"]), []).append(q["question_id"] % 2 == 0)
    assert r["short"]["by_kind"] == {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert r["held-out"]["short"] is r["short"] or r["held-out"]["short"] == r["short"]
    pope = [json.loads(x) for x in (world3 / "eval_pope.jsonl").read_text().splitlines()][:6]
    # even ids: the gold label; odd ids: "banana", which POPE's rule (no "no" or "not" in it) reads as "yes"
    right = sum(p["question_id"] % 2 == 0 or p["label"] == "yes" for p in pope)
    assert r["pope"]["accuracy"] == right / 6 and r["naming"]["images"] == 2
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))


def test_demo_config_and_ablation_stage0_steps(tmp_path, monkeypatch):
    """configs/shapes_v3.py is on world version 3 with a 6 x 6 grid and a two-step stage 0 (captions, then
    instructions); only a stage 0 from scratch pretrains the tower; shapes_ablate.py runs both steps. Version 2
    keeps its own config, with its one patch per cell."""
    v2 = train.load_config([os.path.join(ROOT, "configs/shapes_v2.py")])
    assert shapes.settings(v2).version == 2 and v2.model["vision"]["image_size"] // v2.model["vision"]["patch_size"] == 3
    cfg = train.load_config([os.path.join(ROOT, "configs/shapes_v3.py")])
    toy = shapes.settings(cfg)
    assert toy.version == 3 and cfg.model["vision"]["image_size"] // cfg.model["vision"]["patch_size"] == 6
    zero = [s for s in cfg.stages if s["stage"] == 0]
    assert [s["template"] for s in zero] == ["plain", "vicuna_v1"]
    calls = []
    monkeypatch.setattr(shapes, "pretrain_vision", lambda m, c, d: calls.append(c.init_from))
    stage0 = dataclasses.replace(cfg, stage=0)
    shapes.prepare_model(stage0, None, None)  # from scratch: the tower is pretrained
    shapes.prepare_model(dataclasses.replace(stage0, init_from="out/stage0_captions/final"), None, None)  # goes on
    shapes.prepare_model(dataclasses.replace(cfg, stage=2), None, None)
    assert calls == [""]
    a = ablate.stage_config(cfg, 0, str(tmp_path / "s0b"), which=1, seed=0)
    assert (a.template, a.data_path.endswith("instruct.json"), a.epochs) == ("vicuna_v1", True, zero[1]["epochs"])


def test_feature_probe_reads_colour_from_pixels(world3, tiny3, tmp_path, capsys):
    """shapes_probe.py: a random tower's patch features carry their pixels' colour, so a linear
    probe of colour, scored on held-out patches, is far above chance (1 in 7) if the labels line up
    with the patches; shuffled labels would put it near chance."""
    import shapes_probe as probe
    model, tok = tiny3
    model.save_pretrained(str(tmp_path / "m"))
    probe.main([str(tmp_path / "m"), str(world3), "--train", "60"])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "%" in line}
    assert set(rows) == {"object (25 classes)", "shape (empty + 4)", "colour (empty + 6)"}
    vision_all, vision_objects = rows["colour (empty + 6)"].split(" | ")[1].split(" / ")
    assert float(vision_objects.rstrip("%")) > 60, rows


def test_long_recipe_is_the_v3_recipe_with_four_times_the_epochs(tmp_path, monkeypatch):
    base = train.load_config([os.path.join(ROOT, "configs/shapes_v3.py")])
    monkeypatch.chdir(tmp_path)  # the long config finds its base beside itself, not in the working directory
    long = train.load_config([os.path.join(ROOT, "configs/shapes_v3_long.py")])
    assert [s["epochs"] * 4 for s in base.stages] == [s["epochs"] for s in long.stages]
    assert [{k: v for k, v in s.items() if k not in ("epochs", "out_dir")} for s in base.stages] == \
        [{k: v for k, v in s.items() if k not in ("epochs", "out_dir")} for s in long.stages]
    assert all(s["out_dir"].startswith("out/shapes_v3_long/") for s in long.stages)
    assert (long.hook, long.model, long.lr) == (base.hook, base.model, base.lr)


def test_each_question_set_lies_where_set_images_says(world3):
    """set_images, checked against the files the generator wrote: every POPE question of a set is about an
    image in the set's folder with one of its indices, and its "yes"/"no" agrees with the scene drawn
    from the set's seed (a wrong seed or index range would give other scenes)."""
    w = json.loads((world3 / "world.json").read_text())
    for name, prefix in shapes.QUESTION_SETS.items():
        folder, seed, idx = shapes.set_images(w, name)
        pope = [json.loads(x) for x in (world3 / f"{prefix}_pope.jsonl").read_text().splitlines()]
        assert {p["image"] for p in pope} == {f"{folder}/{i:06d}.png" for i in idx}, name
        for p in pope:
            colour, shape = p["text"].split(" in the image?")[0].split()[-2:]
            scene = shapes.scene_of(seed, int(p["image"][-10:-4]), 3)
            assert ((colour, shape) in {o[:2] for o in scene["objects"]}) == (p["label"] == "yes"), (name, p)
    with pytest.raises(ValueError, match="unknown question set 'test'"):
        shapes.set_images(w, "test")


def test_a_validation_report_looks_at_no_held_out_image(world3, tmp_path, monkeypatch):
    """Recipes are chosen on the validation split: a report scored on it alone takes the naming share and
    the transcript from validation images too, and opens no held-out image."""
    ckpt = make_checkpoint(str(world3), tmp_path / "ckpt")

    def answer(model, tok, qs, folder, path, **kw):
        return [{"question_id": q["question_id"], "text": "Yes."} for q in qs]

    opened, open_image = [], shapes.Image.open
    monkeypatch.setattr(evaluate, "answer_file", answer)
    monkeypatch.setattr(shapes.Image, "open", lambda p, *a, **k: opened.append(str(p)) or open_image(p, *a, **k))
    out = tmp_path / "run" / "eval.json"
    out.parent.mkdir()
    r = shapes.held_out_report(ckpt, str(world3), limit=4, out_path=str(out), progress=False, naming_images=2,
                               sets=("validation",), transcript_images=1)
    w = json.loads((world3 / "world.json").read_text())
    first_val = shapes.set_images(w, "validation")[2][0]
    assert r["naming"]["set"] == r["prediction_naming"]["set"] == "validation" and r["naming"]["images"] == 2
    assert [t["image"] for t in r["transcript"]] == [f"val/{first_val:06d}.png"]
    assert opened and all(os.path.relpath(p, world3).startswith("val" + os.sep) for p in opened), opened
    assert "visual tokens of 2 validation images" in (out.parent / "results.md").read_text()
