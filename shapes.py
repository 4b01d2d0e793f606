"""
The shapes world: a synthetic LLaVA-format dataset small enough for a tiny model on a laptop, and
everything the demo does with it beside the paper's four stages. train.py knows nothing of it: a
config names this module in its one `hook` field, and train.py calls the three hook functions below.

Read top to bottom:
  1. the world       1-4 coloured shapes on a 3x3 grid; captions (stage I), several questions per
                     image (stages II, IV), held-out short-answer and POPE sets, its own tokenizer:
                     python shapes.py --out data/shapes. Version 3 (the default) draws shapes that fill
                     their cells, so that on a 6x6 patch grid a patch is predictable from the ones
                     before it (raster_predictability), and names the last object first in captions
  2. the hook        the settings a config gives (`hook = dict(module="shapes", dir=..., ...)`) and
                     prepare_data / prepare_model / after_run, which train.py calls
  3. stage 0         a supervised pretraining of the vision tower on what each cell (version 3: each
                     patch) holds: the toy's stand-in for CLIP's own pretraining (the paper's stages
                     never train the tower)
  4. the report      the held-out sets answered and scored, as the demo prints them, and how often the
                     visual tokens name what a patch shows (visual_token_naming, prediction_naming)

The demo (configs/shapes.py) runs stage 0 and then stages I-IV exactly as the paper's runs do
(docs/method.md §Stages); docs/experiments.md has what it scored and how it got there.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import eval as evaluate
import train
from conversation import IMAGE_TAG, SYSTEM_VICUNA
from data import process_image
from tokenizer import train_sentencepiece

# -----------------------------------------------------------------------------
# 1. The world: 1-4 coloured shapes on a 3x3 grid, in LLaVA's formats


SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 230),
          "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (250, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPE_WEIGHTS = (0.35, 0.3, 0.2, 0.15)  # skewed on purpose, so POPE's "popular" negatives mean something
COLOR_WEIGHTS = (0.25, 0.2, 0.18, 0.15, 0.12, 0.1)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
         "center": "in the center"}  # how a cell reads in a sentence; the rest are "at the <cell>"
SHORT = "Answer the question using a single word or phrase."  # LLaVA's, docs/eval.md §Prompts
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBERS = ("zero", "one", "two", "three", "four")


def where(cell):
    return WHERE.get(cell, "at the " + cell)


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def there_are(n, noun, plural):
    return f"There is one {noun}" if n == 1 else f"There are {NUMBERS[n]} {plural}"


def sample_scene(rng):
    """A scene: background and 1-4 objects (color, shape, size, cell), each in its own grid cell."""
    n = rng.randint(1, 4)
    objects = [(rng.choices(list(COLORS), COLOR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0],
                rng.choice(("small", "large")), cell) for cell in sorted(rng.sample(range(9), n))]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects,
            "jitter": [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in objects]}


def sample_scene_v3(rng):
    """A version-3 scene: as version 2, but every object is large (drawn 0.9 of the cell wide, draw_scene),
    so that with the demo's 6 x 6 patch grid it covers all four patches of its cell (patch_labels)."""
    n = rng.randint(1, 4)
    objects = [(rng.choices(list(COLORS), COLOR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0], "large", cell)
               for cell in sorted(rng.sample(range(9), n))]
    return {"version": 3, "background": rng.choice(list(BACKGROUNDS)), "objects": objects,
            "jitter": [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in objects]}


def scene_of(seed, i, version=2):
    """Image i of the world made with `seed` (each scene has its own generator, so any one can be redrawn)."""
    if version == 2:
        return sample_scene(random.Random(f"{seed}/scene/{i}"))
    if version == 3:
        return sample_scene_v3(random.Random(f"{seed}/scene3/{i}"))
    raise ValueError(f"shapes world version {version}: this generator makes versions 2 and 3")


def cell_labels(scene):
    """What each of the 9 cells holds (0: empty, else 1 + 4 * colour + shape) and the background's index:
    the targets of the demo's toy vision pretraining."""
    cells = [0] * 9
    for c, s, _, cell in scene["objects"]:
        cells[cell] = 1 + 4 * list(COLORS).index(c) + SHAPES.index(s)
    return cells, list(BACKGROUNDS).index(scene["background"])


def patch_labels(scene, g):
    """What each patch of a g x g grid shows, in raster order: the label (cell_labels) of the cell that
    holds the patch's centre. In a version-3 world an object fills the middle of its cell, so on a
    grid whose patches tile the cells (g a multiple of 3) every patch of a cell shows its object."""
    cells, _ = cell_labels(scene)
    return [cells[3 * min(2, int(3 * (r + 0.5) / g)) + min(2, int(3 * (c + 0.5) / g))]
            for r in range(g) for c in range(g)]


def raster_predictability(labels, g):
    """How well a patch's label is predicted from its raster predecessor (the patch before it in
    row-major order) and the patch above it, at its position: the majority label of each (position,
    predecessor, above) triple, counted on the even-numbered images and scored on the odd-numbered
    ones, against the majority label alone ("chance"). labels: one list of g*g patch labels per image (0 = empty). Returns
    accuracy and chance over all scored patches, and over the object patches only (label != 0),
    where chance is the most frequent object label's share."""
    table, marginal, objects = {}, Counter(), Counter()
    context = lambda ls, t: (t, ls[t - 1] if t else -1, ls[t - g] if t >= g else -1)
    for ls in labels[0::2]:
        for t, y in enumerate(ls):
            table.setdefault(context(ls, t), Counter())[y] += 1
            marginal[y] += 1
            objects[y] += y != 0
    guess_all = marginal.most_common(1)[0][0]
    guess_obj = objects.most_common(1)[0][0]
    hit = base = n = hit_obj = base_obj = n_obj = 0
    for ls in labels[1::2]:
        for t, y in enumerate(ls):
            counts = table.get(context(ls, t))
            pred = counts.most_common(1)[0][0] if counts else guess_all
            n, hit, base = n + 1, hit + (pred == y), base + (guess_all == y)
            if y:
                n_obj, hit_obj, base_obj = n_obj + 1, hit_obj + (pred == y), base_obj + (guess_obj == y)
    return {"accuracy": hit / n, "chance": base / n, "object_accuracy": hit_obj / max(1, n_obj),
            "object_chance": base_obj / max(1, n_obj), "patches": n, "object_patches": n_obj}


def draw_scene(scene, size, ss=4):
    """Render a scene, drawn at ss x the size and box-downsampled (cheap anti-aliasing)."""
    S = size * ss
    im = Image.new("RGB", (S, S), BACKGROUNDS[scene["background"]])
    d = ImageDraw.Draw(im)
    for (color, shape, sz, cell), (jx, jy) in zip(scene["objects"], scene["jitter"]):
        r = S / 6 * (0.9 if scene.get("version", 2) >= 3 else 0.75 if sz == "large" else 0.45)  # a cell is S/3 wide
        cx = (cell % 3 + 0.5) * S / 3 + jx * (S / 6 - r) * 0.8
        cy = (cell // 3 + 0.5) * S / 3 + jy * (S / 6 - r) * 0.8
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
        else:
            k, radii = (3, (r,)) if shape == "triangle" else (5, (r, 0.45 * r))
            pts = [(cx + radii[j % len(radii)] * math.sin(math.pi * j / (k * len(radii) / 2)),
                    cy - radii[j % len(radii)] * math.cos(math.pi * j / (k * len(radii) / 2)))
                   for j in range(k * len(radii))]
            d.polygon(pts, fill=fill)
    return im.reduce(ss)


def _draw_and_save(job):
    scene, size, path = job
    draw_scene(scene, size).save(path, optimize=False, compress_level=1)


def caption(scene):
    if scene.get("version", 2) >= 3:
        return caption_v3(scene)
    parts = [f"{article(sz)} {c} {s} {where(CELLS[cell])}" for c, s, sz, cell in scene["objects"]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text}, on a {scene['background']} background."


def caption_v3(scene):
    """Version 3's caption names the objects first, colour first, from the last one in raster order
    (bottom right) to the first: after an image, its caption's first word names the object whose
    patches came last. The toy's stage 0 learns to caption (configs/shapes.py), so the MM head's
    prediction inside an image comes to name what the patches so far show, as a pretrained LLM's
    prediction carries content (docs/experiments.md §World version 3)."""
    parts = [f"{c} {s} {where(CELLS[cell])}" for c, s, _, cell in sorted(scene["objects"], key=lambda o: -o[3])]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text}, on a {scene['background']} background."


def questions(scene, rng, popular):
    """All (question, short answer, long answer, kind) tuples about a scene; the caller samples a few.
    kind names the question type (QUESTION_KINDS); POPE questions are "pope_<category>"."""
    objs = scene["objects"]
    present = {(c, s) for c, s, _, _ in objs}
    count = Counter(s for _, s, _, _ in objs)
    n = len(objs)
    # counts are words (a choice of this world kept so that older worlds stay comparable; digit answers,
    # with their leading bare "▁" piece, are supervised as LLaVA does: docs/data.md)
    qa = [("How many shapes are in the image?", NUMBERS[n].capitalize(), there_are(n, "shape", "shapes") + " in the image.",
           "count"),
          ("What color is the background?", scene["background"].capitalize(),
           f"The background is {scene['background']}.", "background"),
          ("Describe the image.", None, caption(scene).capitalize(), "describe")]
    s = rng.choice(SHAPES)
    qa.append((f"How many {PLURAL[s]} are there?", NUMBERS[count[s]].capitalize(),
               there_are(count[s], s, PLURAL[s]) + ".", "count_shape"))
    for c, s, sz, cell in objs:
        if count[s] == 1:
            qa.append((f"What color is the {s}?", c.capitalize(), f"The {s} is {c}.", "color"))
        if sum(1 for o in objs if o[:2] == (c, s)) == 1:
            qa.append((f"Where is the {c} {s}?", CELLS[cell].capitalize(), f"The {c} {s} is {where(CELLS[cell])}.",
                       "where"))
        qa.append((f"What shape is {where(CELLS[cell])}?", s.capitalize(),
                   f"There is {article(sz)} {c} {s} {where(CELLS[cell])}.", "shape_at"))
    for category in ("random", "popular", "adversarial"):
        qa.append(pope_question(scene, rng, present, True, category, popular))
        qa.append(pope_question(scene, rng, present, False, category, popular))
    return qa


QUESTION_KINDS = ("count", "background", "describe", "count_shape", "color", "where", "shape_at",
                  "pope_random", "pope_popular", "pope_adversarial")


def pope_question(scene, rng, present, positive, category, popular):
    """POPE-style "Is there a X in the image?"; negatives: random, popular (most frequent objects
    absent here), adversarial (shares a colour or a shape with an object that is present)."""
    if positive:
        c, s = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if category == "popular":
            absent = [o for o in popular if o not in present][:3]
        elif category == "adversarial":
            near = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
            absent = near or absent
        c, s = rng.choice(absent)
    where_ = next((where(CELLS[cell]) for oc, osh, _, cell in scene["objects"] if (oc, osh) == (c, s)), "")
    long = f"Yes, there is {article(c)} {s} {where_}." if positive else f"No, there is no {c} {s} in the image."
    return (f"Is there {article(c)} {s} in the image?", "Yes" if positive else "No", long, "pope_" + category)


def text_only_conversation(rng):
    """A question needing no image: simple facts about the world's shapes, colours and numbers."""
    sides = {"triangle": "three sides", "square": "four sides", "star": "five points", "circle": "no corners"}
    mixes = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
    kind = rng.randrange(4)
    if kind == 0:
        s = rng.choice(SHAPES)
        return f"What can you tell me about {article(s)}?", f"{article(s).capitalize()} has {sides[s]}."
    if kind == 1:
        (a, b), c = rng.choice(sorted(mixes.items()))
        return f"What color do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {c}."
    if kind == 2:
        a, b = rng.randint(0, 2), rng.randint(1, 2)
        q = f"{NUMBERS[a]} plus {NUMBERS[b]}"
        return f"What is {q}?", f"{q.capitalize()} is {NUMBERS[a + b]}."
    w = rng.choice(list(COLORS) + list(SHAPES))
    kind = "color" if w in COLORS else "shape"
    return f"Is {w} a color?", ("Yes" if w in COLORS else "No") + f", {w} is a {kind}."


WORLD_VERSION = 3  # the newest; bump when the generator changes what a seed produces: older worlds are rebuilt
WORLD_VERSIONS = {  # what each version the generator still makes is
    2: "1-4 shapes, small or large, in the cells of a 3 x 3 grid; the demo saw one 16 px patch per cell",
    3: "as 2, but every shape large (filling its cell) and captions colour first, last object first; "
       "the demo sees 6 x 6 patches of 8 px, so each shape covers 2 x 2 patches",
}


def training_conversations(scenes, paths, train, rng, popular, turns_per_image, text_only_fraction):
    """The training images' captions (stages I and III) and question turns (stages II and IV), with
    the text-only conversations mixed in, and the text corpus for the tokenizer: (stage1, instruct,
    corpus). Draws from `rng` in a fixed order (a version's files never change)."""
    stage1, instruct, corpus = [], [], []
    for i in train:
        cap = caption(scenes[i])
        stage1.append({"id": f"shapes-{i:06d}", "image": paths[i], "conversations": [
            {"from": "human", "value": rng.choice(("Describe the image briefly.", "Write a short caption."))
             + "\n" + IMAGE_TAG}, {"from": "gpt", "value": cap}]})
        qa = questions(scenes[i], rng, popular)
        turns = []
        # several questions per image: a from-scratch decoder learns to look up what a question
        # names far faster from many answers about each picture than from one
        for q, short, long, *_ in rng.sample(qa, min(len(qa), turns_per_image)):
            use_short = short is not None and rng.random() < 0.5
            turns += [{"from": "human", "value": f"{q}\n{SHORT}" if use_short else q},
                      {"from": "gpt", "value": short if use_short else long}]
            corpus.append(f"{q} {long}")
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
        instruct.append({"id": f"shapes-{i:06d}", "image": paths[i], "conversations": turns})
        corpus.append(cap.capitalize())
    for k in range(int(len(train) * text_only_fraction)):
        q, a = text_only_conversation(rng)
        instruct.append({"id": f"text-{k:06d}", "conversations": [{"from": "human", "value": q},
                                                                   {"from": "gpt", "value": a}]})
        corpus.append(f"{q} {a}")
    rng.shuffle(instruct)
    return stage1, instruct, corpus


def instruction_mix(scenes, paths, train, popular, seed, mix):
    """Stages II and IV's conversations drawn anew from the same training images, with their own
    generator (so the world's held-out sets and tokenizer stay those of its version). `mix` (a dict,
    world.json records it): "conversations" per image (1), "turns" per conversation (5), "weights"
    {kind: weight} over QUESTION_KINDS (1 each; a question is drawn with its kind's weight, without
    repeats inside a conversation), "short": the chance of asking for the short answer (0.5),
    "text_only": text-only conversations per training image (0.05)."""
    unknown = set(mix) - {"conversations", "turns", "weights", "short", "text_only"}
    bad_kinds = set(mix.get("weights", {})) - set(QUESTION_KINDS)
    if unknown or bad_kinds:
        raise ValueError(f"instruction mix: unknown entries {sorted(unknown | bad_kinds)} "
                         f"(kinds: {', '.join(QUESTION_KINDS)})")
    rng = random.Random(f"{seed}/mix")
    weights = {k: 1.0 for k in QUESTION_KINDS} | dict(mix.get("weights", {}))
    instruct = []
    for i in train:
        for c in range(mix.get("conversations", 1)):
            pool = list({x[0]: x for x in questions(scenes[i], rng, popular) if weights[x[3]] > 0}.values())
            turns = []
            for _ in range(min(len(pool), mix.get("turns", 5))):
                q, short, long, _ = pool.pop(rng.choices(range(len(pool)), [weights[x[3]] for x in pool])[0])
                use_short = short is not None and rng.random() < mix.get("short", 0.5)
                turns += [{"from": "human", "value": f"{q}\n{SHORT}" if use_short else q},
                          {"from": "gpt", "value": short if use_short else long}]
            turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
            instruct.append({"id": f"shapes-{i:06d}-{c}", "image": paths[i], "conversations": turns})
    for k in range(int(len(train) * mix.get("text_only", 0.05))):
        q, a = text_only_conversation(rng)
        instruct.append({"id": f"text-{k:06d}", "conversations": [{"from": "human", "value": q},
                                                                   {"from": "gpt", "value": a}]})
    rng.shuffle(instruct)
    return instruct


def held_out_questions(scenes, paths, held_out, rng, popular):
    """POPE (random / popular / adversarial, one positive and one negative each) and two short-answer
    questions per held-out image: (pope, short_eval), in LLaVA's question-file format."""
    pope, short_eval = [], []
    for i in held_out:
        present = {(c, s) for c, s, _, _ in scenes[i]["objects"]}
        for category in ("random", "popular", "adversarial"):
            for positive in (True, False):
                q, ans, _, _ = pope_question(scenes[i], rng, present, positive, category, popular)
                pope.append({"question_id": len(pope), "image": paths[i], "text": f"{q}\n{SHORT}",
                             "label": ans.lower(), "category": category})
        for q, ans, *_ in rng.sample([x for x in questions(scenes[i], rng, popular)
                                      if x[1] is not None and not x[3].startswith("pope")], 2):
            short_eval.append({"question_id": len(short_eval), "image": paths[i], "text": f"{q}\n{SHORT}",
                               "answer": ans.lower()})  # compare case-insensitively
    return pope, short_eval


def make_shapes_world(out_dir, n_images=10000, image_size=64, seed=0, eval_fraction=0.05,
                      vocab_size=1024, text_only_fraction=0.05, workers=2, turns_per_image=5,
                      version=WORLD_VERSION, mix=None):
    """Write the shapes world (LLaVA formats) to out_dir; deterministic from `seed` and `version`
    (WORLD_VERSIONS; a version's files do not change once it is released). Returns world.json's dict.

    Files: images/NNNNNN.png; stage1_captions.json (plain template; its images are also stage III's,
    as in the paper); instruct.json (stages II and IV); text_corpus.txt (text for a "stage 0"
    decoder); tokenizer.model; eval_pope.jsonl and eval_short.jsonl on held-out images; world.json.
    From version 3 on, two more question sets of the same definitions on images no training sees:
    val/ with eval_val_{pope,short}.jsonl (further scenes of the same seed: the split that recipes
    are chosen on) and heldout2/ with eval2_{pope,short}.jsonl (scenes of world seed + 1: a second
    held-out set that no tuning saw). `mix` replaces instruct.json's conversations by
    instruction_mix(..., mix); the held-out sets and the tokenizer do not depend on it.
    Image paths in every file are relative to out_dir.
    """
    t0 = time.time()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [scene_of(seed, i, version) for i in range(n_images)]
    paths = [f"images/{i:06d}.png" for i in range(n_images)]
    jobs = [(s, image_size, str(out / p)) for s, p in zip(scenes, paths)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            pool.map(_draw_and_save, jobs, chunksize=256)
    else:
        for job in jobs:
            _draw_and_save(job)

    n_eval = max(1, int(n_images * eval_fraction))
    train, held_out = range(n_images - n_eval), range(n_images - n_eval, n_images)
    freq = Counter((c, s) for i in train for c, s, _, _ in scenes[i]["objects"])
    popular = [o for o, _ in freq.most_common()]

    stage1, instruct, corpus = training_conversations(scenes, paths, train, rng, popular, turns_per_image,
                                                      text_only_fraction)
    pope, short_eval = held_out_questions(scenes, paths, held_out, rng, popular)
    if mix:
        instruct = instruction_mix(scenes, paths, train, popular, seed, mix)
    extra = {}  # name: (pope, short) on images apart from training and from the held-out set
    if version >= 3:
        for name, folder, scene_seed, first in (("val", "val", seed, n_images), ("2", "heldout2", seed + 1, 0)):
            idx = range(first, first + n_eval)
            more = {i: scene_of(scene_seed, i, version) for i in idx}
            where_ = {i: f"{folder}/{i:06d}.png" for i in idx}
            (out / folder).mkdir(exist_ok=True)
            for i in idx:
                _draw_and_save((more[i], image_size, str(out / where_[i])))
            extra[name] = held_out_questions(more, where_, idx, random.Random(f"{scene_seed}/{folder}"), popular)

    def dump(name, rows, lines=False):
        with open(out / name, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows, indent=0))

    dump("stage1_captions.json", stage1)
    dump("instruct.json", instruct)
    dump("eval_pope.jsonl", pope, lines=True)
    dump("eval_short.jsonl", short_eval, lines=True)
    for name, (p, q) in extra.items():
        dump(f"eval{'_' if name == 'val' else ''}{name}_pope.jsonl", p, lines=True)
        dump(f"eval{'_' if name == 'val' else ''}{name}_short.jsonl", q, lines=True)
    (out / "text_corpus.txt").write_text("\n".join(corpus) + "\n")
    # the tokenizer sees the world's text and the chat templates' words, so both are cheap pieces
    words = " ".join(list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + list(NUMBERS) + ["yes", "no", "small", "large"])
    template_text = [SYSTEM_VICUNA, "USER: ASSISTANT: [INST] [/INST]", SHORT, words, words.title()] * 200
    train_sentencepiece(template_text + corpus, out / "tokenizer.model", vocab_size, user_defined_symbols=["\n"])
    world = {"version": version, "seed": seed, "n_images": n_images, "turns_per_image": turns_per_image,
             "image_size": image_size, "eval_fraction": eval_fraction,
             "vocab_size": vocab_size, "text_only_fraction": text_only_fraction, "shapes": SHAPES,
             "colors": list(COLORS), "backgrounds": list(BACKGROUNDS), "cells": CELLS, "image_folder": ".",
             "counts": {"train_images": len(train), "eval_images": n_eval, "stage1": len(stage1),
                        "instruct": len(instruct), "eval_pope": len(pope), "eval_short": len(short_eval),
                        "corpus_lines": len(corpus)},
             "stage3": "stage1_captions.json", "mix": mix or None,
             "question_sets": {"held-out": "eval", **{"validation" if n == "val" else "held-out 2": f"eval{'_' if n == 'val' else ''}{n}"
                                                      for n in extra}},
             "seconds": round(time.time() - t0, 1)}
    (out / "world.json").write_text(json.dumps(world, indent=1))
    return world


def ensure_shapes_world(out_dir, version=WORLD_VERSION, mix=None, **kwargs):
    """Build the shapes world unless out_dir/world.json exists and is of `version` and `mix` (what the
    toy configs call): a world of another version or instruction mix is rebuilt."""
    path = Path(out_dir) / "world.json"
    w = json.loads(path.read_text()) if path.exists() else {}
    # a version-3 world written before the validation and second held-out sets existed lacks "question_sets"
    if (w.get("version"), w.get("mix")) != (version, mix or None) or (version >= 3 and "question_sets" not in w):
        make_shapes_world(out_dir, version=version, mix=mix, **kwargs)
    return json.loads((Path(out_dir) / "world.json").read_text())


# -----------------------------------------------------------------------------
# 2. The hook: what train.py calls when a config says hook = dict(module="shapes", ...)


@dataclass
class ShapesConfig:
    """The entries of TrainConfig.hook besides "module"; an unknown entry is an error."""
    dir: str = "data/shapes"       # the world; built here first if it is missing or of another version
    version: int = WORLD_VERSION   # which world (WORLD_VERSIONS)
    images: int = 10000
    image_size: int = 64
    vision_epochs: float = 0.0     # the first stage (0, or I from an LLM alone): teach the vision tower the cells (pretrain_vision)
    vision_lr: float = 2e-3
    report: bool = False           # after the last stage, answer and score the held-out sets (held_out_report)
    report_limit: int = 0          # the first N questions of each set (0: all)
    naming_images: int = 100       # the report's visual-token naming share (visual_token_naming) on this many held-out images
    report_sets: tuple = ("held-out", "held-out 2")  # the question sets the report scores (QUESTION_SETS)
    transcript_images: int = 0     # the report's transcript: this many held-out images, their questions answered
    mix: dict = None               # stages II and IV's conversations drawn by instruction_mix (None: the version's own)


def settings(cfg):
    entries = {k: v for k, v in cfg.hook.items() if k != "module"}
    names = {f.name for f in dataclasses.fields(ShapesConfig)}
    for k in entries:
        if k not in names:
            raise ValueError(f"hook: unknown entry {k!r} for the shapes world (known: {', '.join(sorted(names))})")
    return ShapesConfig(**entries)


def prepare_data(cfg):
    """Main process, at the start of every stage (train.py makes the others wait): the world on disk."""
    toy = settings(cfg)
    ensure_shapes_world(toy.dir, version=toy.version, n_images=toy.images, image_size=toy.image_size, mix=toy.mix)


def prepare_model(cfg, model, d):
    """Every process, once the stage's model is built and before anything is frozen or sharded (not
    when the stage resumes from a checkpoint): the vision pretraining, for a first stage whose tower is
    fresh: a stage 0 that starts from scratch (a second stage-0 entry goes on from the first one's
    checkpoint), or a stage I that starts from a pretrained LLM without CLIP (configs/shapes_smollm2.py)."""
    fresh_tower = cfg.stage == 0 or (cfg.stage == 1 and cfg.llm_path and not cfg.clip_path)
    if fresh_tower and settings(cfg).vision_epochs and not cfg.init_from:
        pretrain_vision(model, cfg, d)


def after_run(cfg, final):
    """Main process, after the last stage: the held-out report with the visual-token naming share,
    written to out_dir/eval.json."""
    toy = settings(cfg)
    if toy.report:
        held_out_report(final, toy.dir, limit=toy.report_limit, out_path=os.path.join(cfg.out_dir, "eval.json"),
                        naming_images=toy.naming_images, sets=toy.report_sets, transcript_images=toy.transcript_images)


# -----------------------------------------------------------------------------
# 3. Stage 0: the vision tower learns the cells


def pretrain_vision(model, cfg, d):
    """The demo's stand-in for CLIP's own pretraining (toy stage 0 only; the paper's stages never
    train the vision tower). A from-scratch tower that learns only through the LM loss of a few
    thousand answers does not learn to see small shapes, so here it first learns, with linear probes
    thrown away afterwards, what each cell of the world's 3x3 grid holds (empty, or one of 24 colour
    and shape pairs), which cell it is, and the background colour. Version 2 pools each cell's patches
    and names the cell; from version 3 on every patch names what it shows (patch_labels), so that
    each patch feature carries its object. Training images only; every process runs the same steps
    from the same seed, before any sharding. Returns the cell (or patch) accuracy over the last
    epoch's batches."""
    toy = settings(cfg)
    world = json.loads(Path(toy.dir, "world.json").read_text())
    version = world.get("version", 2)
    vc = model.cfg.vision
    g = vc.image_size // vc.patch_size
    if g % 3:
        raise ValueError(f"vision pretraining pools the {g}x{g} patch grid into the world's 3x3 cells; "
                         f"image_size / patch_size must be a multiple of 3")
    n_train = world["counts"]["train_images"]
    scenes = [scene_of(world["seed"], i, version) for i in range(n_train)]
    labels = [cell_labels(s) for s in scenes]
    per_patch = version >= 3
    k = g // 3
    if per_patch:  # each patch: its label, and the cell it lies in
        cells = torch.tensor([patch_labels(s, g) for s in scenes])
        where = torch.tensor([3 * (r // k) + c // k for r in range(g) for c in range(g)])
    else:
        cells = torch.tensor([c for c, _ in labels])
        where = torch.arange(9)
    backgrounds = torch.tensor([b for _, b in labels])
    pixels = torch.stack([process_image(Image.open(os.path.join(toy.dir, f"images/{i:06d}.png")),
                                        vc.image_size) for i in range(n_train)])
    torch.manual_seed(cfg.seed)
    vision = model.vision
    cell_head = torch.nn.Linear(vc.width, 1 + len(COLORS) * len(SHAPES))
    bg_head = torch.nn.Linear(vc.width, len(BACKGROUNDS))
    where_head = torch.nn.Linear(vc.width, 9)
    params = [p for m in (vision, cell_head, bg_head, where_head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=toy.vision_lr, weight_decay=0.0, foreach=False)
    batch = 64
    per_epoch = n_train // batch
    total = max(1, round(per_epoch * toy.vision_epochs))
    vcfg = dataclasses.replace(cfg, warmup_ratio=0.05, lr=toy.vision_lr)

    # the run's precision: bf16 autocast (float32 weights and losses) when the stages train in bf16
    amp = torch.autocast(next(vision.parameters()).device.type, dtype=torch.bfloat16,
                         enabled=train.resolve_dtype(cfg, d) == "bf16")

    def loss_and_hits(idx):
        with amp:
            f = vision(pixels[idx]).float()  # (B, g*g, width); version 2: the mean over each cell's k x k patches
        if not per_patch:
            f = f.view(len(idx), 3, k, 3, k, vc.width).mean((2, 4)).reshape(len(idx), 9, vc.width)
        logits = cell_head(f)
        loss = (F.cross_entropy(logits.flatten(0, 1), cells[idx].flatten())
                + F.cross_entropy(bg_head(f.mean(1)), backgrounds[idx])
                + F.cross_entropy(where_head(f).flatten(0, 1), where.repeat(len(idx))))
        return loss, (logits.argmax(-1) == cells[idx]).float().mean()

    from tqdm import tqdm
    bar = tqdm(total=total, desc="stage 0: vision", dynamic_ncols=True,
               disable=not d.main or (not sys.stderr.isatty() and not os.environ.get("NANOVT_PROGRESS")))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, hits = 0, []
    while step < total:
        perm = torch.randperm(n_train, generator=gen)
        for j in range(per_epoch):
            if step == total:
                break
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step, total, vcfg)
            loss, acc = loss_and_hits(perm[j * batch:(j + 1) * batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits = (hits + [acc.item()])[-per_epoch:]
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cells=f"{sum(hits) / len(hits):.3f}")
    bar.close()
    acc = sum(hits) / len(hits)
    if d.main:
        print(f"stage 0: vision pretrained on the shapes world's cells, {total} steps of {batch} images; "
              f"cell accuracy over the last epoch's batches {acc:.3f}")
    return acc


# -----------------------------------------------------------------------------
# 4. The held-out report, as the demo prints it


def set_images(world, name="held-out"):
    """Where the images of a question set (QUESTION_SETS) are, as make_shapes_world drew them:
    (folder, scene seed, image indices). held-out: the world's last eval_images images; validation:
    as many further scenes of the world's seed; held-out 2: as many scenes of seed + 1."""
    n, n_eval, seed = world["n_images"], world["counts"]["eval_images"], world["seed"]
    where = {"held-out": ("images", seed, range(n - n_eval, n)), "validation": ("val", seed, range(n, n + n_eval)),
             "held-out 2": ("heldout2", seed + 1, range(n_eval))}
    if name not in where:
        raise ValueError(f"unknown question set {name!r}; the sets are {', '.join(where)}")
    return where[name]


def held_out_images(world):
    """The indices of a world's held-out images (the last eval_images of them)."""
    return set_images(world)[2]


def token_word(tok, i):
    """A token as a plain lower-case word: "▁Red" -> "red" (what the naming share compares)."""
    return tok.piece(int(i)).replace("\u2581", "").strip().lower()


def naming_counts(words, labels, backgrounds, top=5):
    """The visual-token naming share, from its parts. words[i][t]: the word of the top-1 visual token
    of patch t of image i (token_word); labels[i][t]: what the patch shows (patch_labels: 0 empty,
    else 1 + 4 * colour + shape); backgrounds[i]: the image's background colour. An object patch is
    *named* when its word is its object's colour or its shape. Returns the shares named (colour or
    shape, colour, shape) over object patches, the share of background patches whose word is the
    background colour or any colour or shape of the world, and the most frequent words of each kind
    of patch with their shares."""
    obj, named, named_c, named_s, bg, bg_named, bg_object_word = 0, 0, 0, 0, 0, 0, 0
    obj_words, bg_words = Counter(), Counter()
    vocab = set(COLORS) | set(SHAPES)
    for ws, ls, back in zip(words, labels, backgrounds):
        for w, y in zip(ws, ls):
            if y:
                color, shape = list(COLORS)[(y - 1) // 4], SHAPES[(y - 1) % 4]
                obj, named, named_c, named_s = obj + 1, named + (w in (color, shape)), named_c + (w == color), named_s + (w == shape)
                obj_words[w] += 1
            else:
                bg, bg_named, bg_object_word = bg + 1, bg_named + (w == back), bg_object_word + (w in vocab)
                bg_words[w] += 1
    share = lambda a, b: a / b if b else float("nan")
    return {"object_patches": obj, "named": share(named, obj), "named_color": share(named_c, obj),
            "named_shape": share(named_s, obj), "background_patches": bg,
            "background_named_background": share(bg_named, bg), "background_color_or_shape": share(bg_object_word, bg),
            "object_top": [(w, share(c, obj)) for w, c in obj_words.most_common(top)],
            "background_top": [(w, share(c, bg)) for w, c in bg_words.most_common(top)]}


def _held_out_naming(model, tok, shapes_dir, n_images, batch_size, top1, split="held-out"):
    """naming_counts over the first n_images images of question set `split` (set_images; 0: all) of
    the world in shapes_dir, each patch labelled by what the generator put there; top1(pixel_values, g)
    gives each image's g * g token ids, one per patch in raster order."""
    world = json.loads((Path(shapes_dir) / "world.json").read_text())
    vc = model.cfg.vision
    g = vc.image_size // vc.patch_size
    folder, seed, images = set_images(world, split)
    idx = list(images)[:n_images or None]
    scenes = [scene_of(seed, i, world.get("version", 2)) for i in idx]
    device = next(model.parameters()).device
    dtype = next(model.vision.parameters()).dtype
    words = []
    for k in range(0, len(idx), batch_size):
        px = torch.stack([process_image(Image.open(os.path.join(shapes_dir, f"{folder}/{i:06d}.png")), vc.image_size)
                          for i in idx[k:k + batch_size]]).to(device, dtype)
        words += [[token_word(tok, t) for t in row.tolist()] for row in top1(px, g)]
    result = naming_counts(words, [patch_labels(s, g) for s in scenes], [s["background"] for s in scenes])
    return {**result, "images": len(idx), "grid": g, "set": split}


@torch.no_grad()
def visual_token_naming(model, tok, shapes_dir, n_images=100, batch_size=50, split="held-out"):
    """How often the top-1 visual token (Eq. 5) of a held-out object patch names the object's colour
    or shape, and what background patches get (naming_counts); `split` picks the question set whose
    images are scored (set_images)."""
    return _held_out_naming(model, tok, shapes_dir, n_images, batch_size,
                            lambda px, g: model.visual_tokens(px)[0][..., 0], split)


@torch.no_grad()
def prediction_naming(model, tok, shapes_dir, n_images=100, batch_size=50, split="held-out"):
    """The same share for what Eq. 9 fits the VM head to: the MM head's top-1 prediction Q_t at every
    position of stage III's input (BOS, then the patches), scored against the patch at t+1 that it
    predicts (docs/method.md §Index convention): does the prediction inside an image name what comes
    next? (naming_counts; the first patch's prediction comes from BOS.)"""
    def top1(px, g):
        ids = torch.tensor([[tok.bos_id] + [model.cfg.image_token_id] * g * g] * len(px), device=px.device)
        return model(ids, px).logits.argmax(-1)[:, :g * g]  # position t predicts patch t (t = 0: BOS)
    return _held_out_naming(model, tok, shapes_dir, n_images, batch_size, top1, split)


def naming_line(n, what="visual tokens"):
    top = lambda pairs: ", ".join(f"{w or repr(w)} {v:.0%}" for w, v in pairs[:3])
    return (f"{what} of {n['images']} {n.get('set', 'held-out')} images: {n['named']:.1%} of {n['object_patches']} object "
            f"patches name their object's colour or shape (colour {n['named_color']:.1%}, shape "
            f"{n['named_shape']:.1%}); background patches: {n['background_named_background']:.1%} name the "
            f"background, {n['background_color_or_shape']:.1%} a colour or shape; most frequent on objects: "
            f"{top(n['object_top'])}; on background: {top(n['background_top'])}")


QUESTION_SETS = {  # name: file prefix (PREFIX_short.jsonl, PREFIX_pope.jsonl), made by make_shapes_world
    "held-out": "eval",          # the world's last 500 images
    "held-out 2": "eval2",       # 500 scenes of world seed + 1 (version 3 on): no tuning saw them
    "validation": "eval_val",    # 500 further scenes of the world's seed (version 3 on): recipes are chosen here
}
SHORT_KINDS = (("How many shapes", "count"), ("What color is the background", "background"),
               ("How many", "count_shape"), ("What color is the", "color"), ("Where is the", "where"),
               ("What shape is", "shape_at"))  # question start -> kind (QUESTION_KINDS), first match


def short_kind(text):
    return next(kind for start, kind in SHORT_KINDS if text.startswith(start))


def score_set(model, tok, shapes_dir, prefix, limit, answers_dir, batch_size, progress):
    """Answer and score one question set: short answers (VQA accuracy, also by question kind) and POPE
    (accuracy, F1, yes-ratio, per category)."""
    out = {}
    for name, metric in (("short", "vqa"), ("pope", "pope")):
        qs = evaluate.read_jsonl(os.path.join(shapes_dir, f"{prefix}_{name}.jsonl"))
        if limit:
            qs = qs[:limit]
        apath = os.path.join(answers_dir, f"answers_{prefix}_{name}.jsonl")
        if os.path.exists(apath):
            os.remove(apath)  # a fresh model: old answers are stale
        ans = evaluate.answer_file(model, tok, qs, shapes_dir, apath, batch_size=batch_size, progress=progress)
        out[name] = evaluate.METRICS[metric](ans, qs)
        if name == "short":
            kinds = {}
            for q, a in zip(qs, ans):
                kinds.setdefault(short_kind(q["text"]), []).append(evaluate.METRICS["vqa"]([a], [q])["accuracy"])
            out[name]["by_kind"] = {k: sum(v) / len(v) for k, v in kinds.items()}
    return out


def held_out_report(ckpt, shapes_dir, limit=0, out_path=None, batch_size=32, progress=True, model=None, tok=None,
                    naming_images=0, sets=("held-out",), transcript_images=0):
    """Answer and score the shapes world's question sets (QUESTION_SETS; those the world has): the short
    answers (VQA accuracy) and POPE. report["short"] and report["pope"] are the first set's, report[name]
    holds each set's. With naming_images, also the visual-token naming share (visual_token_naming) on that
    many images of the first set; with transcript_images, a transcript of that many of its images
    (transcript): a run scored on the validation split alone looks at no held-out image. Prints the
    results table."""
    if model is None:  # the checkpoint's own tokenizer (a real LLM's), else the world's
        own = os.path.join(ckpt, "tokenizer.model")
        model, tok = evaluate.load_model(ckpt, tokenizer=own if os.path.isfile(own) else
                                         os.path.join(shapes_dir, "tokenizer.model"))
    answers_dir = os.path.dirname(out_path) if out_path else ckpt
    report = {}
    for name in sets:
        prefix = QUESTION_SETS[name]
        if not os.path.exists(os.path.join(shapes_dir, f"{prefix}_short.jsonl")):
            continue  # an older world has only the held-out set
        report[name] = score_set(model, tok, shapes_dir, prefix, limit, answers_dir, batch_size, progress)
    first_set = next(iter(report))
    report["short"], report["pope"] = report[first_set]["short"], report[first_set]["pope"]
    if naming_images:
        report["naming"] = visual_token_naming(model, tok, shapes_dir, naming_images, split=first_set)
        report["prediction_naming"] = prediction_naming(model, tok, shapes_dir, naming_images, split=first_set)
    md = [results_table(report, [n for n in sets if n in report])]
    if naming_images:
        md += ["", naming_line(report["naming"]),
               "", naming_line(report["prediction_naming"], "MM-head predictions of the next patch")]
    if transcript_images:
        report["transcript"] = transcript(model, tok, shapes_dir, transcript_images, split=first_set)
        md += ["", "```", transcript_text(report["transcript"]), "```"]
    print("\n".join(md))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(os.path.dirname(out_path), "results.md"), "w") as f:
            f.write("\n".join(md) + "\n")  # what the README shows (docs/demo/results.md is a copy)
    return report


def results_table(report, sets):
    """The demo's results as a Markdown table: one row per question set."""
    rows = ["| question set | short answers | POPE acc. | POPE random / popular / adversarial | POPE F1 | yes-ratio |",
            "|---|---|---|---|---|---|"]
    for name in sets:
        r = report[name]
        cats = r["pope"].get("categories", {})
        per = " / ".join(f"{100 * cats[c]['accuracy']:.1f}" for c in ("random", "popular", "adversarial") if c in cats)
        rows.append(f"| {name} ({r['short']['n']} + {r['pope']['n']} questions) | {100 * r['short']['accuracy']:.1f}% | "
                    f"{100 * r['pope']['accuracy']:.1f}% | {per} | {r['pope']['f1']:.3f} | {r['pope']['yes_ratio']:.2f} |")
    return "\n".join(rows)


def transcript(model, tok, shapes_dir, n_images=3, first=0, split="held-out"):
    """A few held-out images (of question set `split`, set_images) with one question of each kind that
    applies (short-answer form) and a POPE question, the model's greedy answer beside the truth (from
    the scene itself)."""
    world = json.loads((Path(shapes_dir) / "world.json").read_text())
    folder, seed, images = set_images(world, split)
    rng = random.Random(f"{world['seed']}/transcript")
    vc = model.cfg.vision
    model.eval()
    out = []
    for i in list(images)[first:first + n_images]:
        scene = scene_of(seed, i, world.get("version", 2))
        qa = questions(scene, rng, [(c, s) for c in COLORS for s in SHAPES])  # its POPE items are not used
        picked, seen = [], set()
        for q, short, _, kind in qa:
            if short is not None and kind not in seen and not kind.startswith("pope"):
                picked.append((q, short))
                seen.add(kind)
        c, s = next(((c, s) for c in COLORS for s in SHAPES if (c, s) not in {o[:2] for o in scene["objects"]}
                     and any(o[0] == c or o[1] == s for o in scene["objects"])))
        picked.append((f"Is there {article(c)} {s} in the image?", "No"))
        picked.append((f"Is there {article(scene['objects'][0][0])} {scene['objects'][0][1]} in the image?", "Yes"))
        px = process_image(Image.open(os.path.join(shapes_dir, f"{folder}/{i:06d}.png")), vc.image_size)
        prompts = [evaluate.prompt_ids(model, tok, f"{q}\n{SHORT}", True) for q, _ in picked]
        answers = evaluate.answer_batch(model, tok, prompts, torch.stack([px] * len(picked)), max_new_tokens=16)
        out.append({"image": f"{folder}/{i:06d}.png", "caption": caption(scene),
                    "turns": [{"question": q, "truth": t, "answer": a} for (q, t), a in zip(picked, answers)]})
    return out


def transcript_text(items):
    lines = []
    for item in items:
        lines.append(f"{item['image']}: {item['caption']}")
        for t in item["turns"]:
            mark = "ok" if t["answer"].strip().rstrip(".").lower() == t["truth"].lower() else "WRONG"
            lines.append(f"  Q: {t['question']:<40} model: {t['answer']:<14} truth: {t['truth']:<14} {mark}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the synthetic shapes world")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--version", type=int, default=WORLD_VERSION, choices=sorted(WORLD_VERSIONS))
    args = parser.parse_args()
    world = make_shapes_world(args.out, args.n_images, args.size, args.seed, workers=args.workers,
                              version=args.version)
    print(json.dumps(world["counts"]), f"in {world['seconds']} s")
