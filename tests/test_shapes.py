"""shapes.py: the world is deterministic and says what its labels say, old worlds are rebuilt; the toy
vision pretraining learns the cells; train.py runs the world's hook (data, stage 0, report) from a config."""

import json
import os
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_ckpt import tiny_args

import data
import shapes
import train
from conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, check_conversations
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the world

def test_shapes_world(tmp_path):
    w = shapes.make_shapes_world(tmp_path / "a", n_images=200, seed=5, vocab_size=600)
    shapes.make_shapes_world(tmp_path / "b", n_images=200, seed=5, vocab_size=600, workers=1)
    for name in ["stage1_captions.json", "instruct.json", "eval_pope.jsonl", "eval_short.jsonl", "text_corpus.txt",
                 "tokenizer.model", "images/000123.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name  # deterministic
    root = tmp_path / "a"
    tok = load_tokenizer(root)
    assert all(len(tok.encode(wd)) == 1 for wd in ["red", "circle", "yes", "No", "triangle", "purple", "USER"])
    instruct = json.loads((root / "instruct.json").read_text())
    train_images = {s["image"] for s in instruct if "image" in s}
    assert any("image" not in s for s in instruct) and any(len(s["conversations"]) >= 4 for s in instruct)
    assert all(check_conversations(s) is None for s in instruct)
    pope = [json.loads(l) for l in (root / "eval_pope.jsonl").read_text().splitlines()]
    short = [json.loads(l) for l in (root / "eval_short.jsonl").read_text().splitlines()]
    assert {p["category"] for p in pope} == {"random", "popular", "adversarial"}
    assert sum(p["label"] == "yes" for p in pope) * 2 == len(pope)
    assert all(q["text"].endswith(shapes.SHORT) for q in short + pope)
    assert not train_images & {q["image"] for q in pope + short}  # evaluation images are held out
    assert w["counts"]["eval_images"] == 10 and json.loads((root / "world.json").read_text())["seed"] == 5
    im = Image.open(root / pope[0]["image"])
    assert im.size == (64, 64) and im.mode == "RGB"
    # a real batch through the sampler and loader
    ds = data.LlavaDataset(root / "instruct.json", None, tok, "vicuna_v1", 64, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=data.make_sampler(ds, 8, seed=0),
                                         collate_fn=lambda s: data.collate(s, tok.pad_id))
    b = next(iter(loader))
    n_img = 0 if b["pixel_values"] is None else len(b["pixel_values"])
    assert (b["input_ids"] == IMAGE_TOKEN_ID).sum() == 64 * n_img and (b["labels"] != IGNORE_INDEX).any()
    assert sum(ds.skipped.values()) == 0


def test_shapes_world_cell_labels_and_rebuild_of_old_versions(tmp_path):
    for i in range(50):  # the labels the toy vision pretraining learns say what the caption says
        scene = shapes.scene_of(0, i)
        cells, bg = shapes.cell_labels(scene)
        said = {(shapes.CELLS[k], list(shapes.COLORS)[(v - 1) // 4], shapes.SHAPES[(v - 1) % 4]) for k, v in enumerate(cells) if v}
        assert said == {(shapes.CELLS[cell], c, s) for c, s, _, cell in scene["objects"]}
        assert list(shapes.BACKGROUNDS)[bg] == scene["background"]
        assert f"on a {scene['background']} background" in shapes.caption(scene)
    root = tmp_path / "w"
    shapes.ensure_shapes_world(root, n_images=60, vocab_size=600, workers=1)
    w = json.loads((root / "world.json").read_text())
    assert w["version"] == shapes.WORLD_VERSION
    instruct = json.loads((root / "instruct.json").read_text())
    assert max(len(s["conversations"]) for s in instruct) == 2 * w["turns_per_image"]
    (root / "world.json").write_text(json.dumps({**w, "version": 1}))  # a world from an older generator
    (root / "instruct.json").write_text("[]")
    shapes.ensure_shapes_world(root, n_images=60, vocab_size=600, workers=1)
    assert json.loads((root / "instruct.json").read_text()) == instruct


@pytest.mark.slow
def test_shapes_world_10k_is_fast(tmp_path):
    t = time.time()
    w = shapes.make_shapes_world(tmp_path, n_images=10_000, workers=2)
    assert time.time() - t < 60 and len(list((tmp_path / "images").iterdir())) == 10_000
    assert w["counts"]["stage1"] == 9500
    tok = load_tokenizer(tmp_path)
    for s in json.loads((tmp_path / "instruct.json").read_text()):
        for turn in s["conversations"][1::2]:  # every answer starts with a piece the label mask supervises:
            # a bare "▁" (before a digit, say) belongs to "ASSISTANT: " and would never be learned
            assert tok.piece(tok.encode("ASSISTANT: " + turn["value"])[2]) != "▁", turn["value"]


# ---------------------------------------------------------------------------- stage 0 and the hook



def test_vision_pretraining_learns_the_cells(world):
    """The demo's toy stand-in for CLIP pretraining: the tower (and only it) learns to name what each
    cell holds, well above always answering "empty"; stage 0 can then keep it frozen."""
    hook = {"module": "shapes", "dir": str(world), "vision_epochs": 120, "vision_lr": 3e-3}
    cfg = train.load_config(tiny_args(world, "unused", f"--hook={hook!r}", "--stage=0"))
    cfg.model = dict(vision=dict(image_size=48, patch_size=16, width=48, layers=2, heads=2, mlp=96),
                     decoder=dict(dim=32, layers=1, heads=2, kv_heads=2, hidden=64, max_seq_len=64))
    model = train.build_model(cfg, load_tokenizer(os.path.join(world, "tokenizer.model")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = train.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    acc = shapes.pretrain_vision(model, cfg, d)
    n = json.load(open(os.path.join(world, "world.json")))["counts"]["train_images"]
    cells = torch.tensor([shapes.cell_labels(shapes.scene_of(0, i))[0] for i in range(n)])
    empty = (cells == 0).float().mean().item()
    assert acc > empty + 0.5 * (1 - empty), (acc, empty)  # half of the way from "all empty" to perfect
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"vision"}
    assert not any(n.startswith("vision.") for n in train.set_trainable(model, 0, freeze=("vision",)))
    cfg.model["vision"]["patch_size"] = 12  # a 4x4 grid does not pool into 3x3 cells
    with pytest.raises(ValueError, match="multiple of 3"):
        shapes.pretrain_vision(train.build_model(cfg), cfg, d)


def test_settings_come_from_the_hook_entries():
    cfg = train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--hook.report_limit=7", "--hook.dir=/x/y",
                             "--hook.vision_lr=1e-4"])
    toy = shapes.settings(cfg)
    assert (toy.dir, toy.report_limit, toy.vision_lr, toy.vision_epochs) == ("/x/y", 7, 1e-4, 4)
    assert cfg.hook["module"] == "shapes"
    with pytest.raises(ValueError, match="--lr.x: lr is not a dict"):
        train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--lr.x=1"])
    cfg = train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--model.decoder.layers=1",
                             "--model.vision.mlp=96"])
    assert cfg.model["decoder"]["layers"] == 1 and cfg.model["vision"]["mlp"] == 96
    assert train.build_model(cfg).cfg.decoder.layers == 1
    with pytest.raises(ValueError, match="--model.template.x: model.template is not a dict"):
        train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--model.template.x=1"])
    with pytest.raises(ValueError, match="--hook.images: expected int"):
        train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--hook.images=many"])
    with pytest.raises(ValueError, match="unknown entry 'bogus'"):
        shapes.settings(train.load_config([os.path.join(ROOT, "configs/shapes.py"), "--hook.bogus=1"]))


def test_train_runs_the_hook_world_stage0_report(tmp_path):
    """`python train.py CONFIG` with hook = shapes: the world is built before stage 0 (nothing there
    yet), stage 0 pretrains the tower although it keeps it frozen, the next stage does not, and the
    held-out report of the last stage lands in out_dir/eval.json."""
    wdir, out = tmp_path / "world", tmp_path / "run"
    hook = {"module": "shapes", "dir": str(wdir), "images": 240, "image_size": 32, "vision_epochs": 1,
            "report": True, "report_limit": 4, "naming_images": 2}
    stages = [dict(stage=0, out_dir=str(out / "s0"), template="plain", data_path=f"{wdir}/stage1_captions.json",
                   freeze=("vision",)),
              dict(stage=2, out_dir=str(out / "s2"))]
    model = dict(vision=dict(image_size=48, patch_size=16, width=32, layers=2, heads=2, mlp=64),  # 3x3 patches
                 decoder=dict(dim=32, layers=1, heads=2, kv_heads=2, hidden=64, max_seq_len=128), template="vicuna_v1")
    argv = [os.path.join(ROOT, "configs/tiny.py"), f"--hook={hook!r}", f"--stages={stages!r}", f"--model={model!r}",
            f"--tokenizer={wdir}/tokenizer.model", f"--data_path={wdir}/instruct.json", f"--out_dir={out}",
            "--max_steps=1", "--save_every=0"]
    cfg = train.load_config(argv)
    final = train.run(cfg)
    assert json.loads((wdir / "world.json").read_text())["counts"]["train_images"] == 228
    s0 = load_file(str(out / "s0" / "final" / "model.safetensors"))
    s2 = load_file(os.path.join(final, "model.safetensors"))
    fresh = train.build_model(train.load_config(argv + ["--stage=0"]), load_tokenizer(wdir)).state_dict()
    vision = [k for k in s0 if k.startswith("vision.blocks.0.") and not k.endswith("attn.k.bias")]  # no grad
    assert vision and all(not torch.equal(s0[k], fresh[k]) for k in vision)  # pretrained in stage 0
    assert all(torch.equal(s0[k], s2[k]) for k in s0 if k.startswith("vision."))  # and only there
    report = json.loads((out / "eval.json").read_text())
    assert report["short"]["n"] == 4 and report["pope"]["n"] == 4
    assert report["naming"]["images"] == 2 and report["naming"]["grid"] == 3  # the visual tokens, scored
