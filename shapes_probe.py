"""What the patch features of a trained shapes-world model carry: linear probes, fitted on the
features of training images and scored on held-out ones, for each patch's object (empty or one of 24
colour-and-shape pairs), its shape alone and its colour alone. Read at two places: the vision tower's
output and the adapter's (what the decoder receives). A probe that reads a property well where the
decoder's answers about it are poor says the decoder, not the vision side, is what falls short.

    python shapes_probe.py out/shapes_v3/stage4/final data/shapes_v3 [--train 3000]

Prints one Markdown table. World version 3 or later (one label per patch, shapes.patch_labels).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

import shapes
import weights
from data import process_image

TASKS = {  # name: patch label (0 empty, else 1 + 4 * colour + shape) -> class
    "object (25 classes)": lambda y: y,
    "shape (empty + 4)": lambda y: torch.where(y > 0, 1 + (y - 1) % len(shapes.SHAPES), 0),
    "colour (empty + 6)": lambda y: torch.where(y > 0, 1 + (y - 1) // len(shapes.SHAPES), 0),
}


def features(model, world, ids, version, image_size, seed=0):
    """(vision features, adapter outputs, patch labels), each flattened over images and patches."""
    px = torch.stack([process_image(Image.open(os.path.join(world, f"images/{i:06d}.png")), image_size)
                      for i in ids])
    g = int(model.cfg.vision.num_patches ** 0.5)
    labels = torch.tensor([shapes.patch_labels(shapes.scene_of(seed, i, version), g) for i in ids])
    with torch.no_grad():
        f = model.vision(px)
        a = model.adapter(f)
    return f.flatten(0, 1), a.flatten(0, 1), labels.flatten()


def probe(x, y, xt, yt, l2=1e-4):
    """Multinomial logistic regression (L-BFGS) on standardised x; accuracy on (xt, yt), overall and
    over object patches (yt != 0)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    k = int(max(y.max(), yt.max())) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        hit = ((xt @ w + b).argmax(-1) == yt).float()
    return hit.mean().item(), hit[yt > 0].mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("world")
    ap.add_argument("--train", type=int, default=3000, help="training images whose patches fit the probes")
    args = ap.parse_args(argv)
    info = json.load(open(os.path.join(args.world, "world.json")))
    version = info.get("version", 2)
    if version < 3:
        raise SystemExit(f"{args.world}: world version {version}; the probe needs one label per patch (version 3+)")
    model = weights.from_pretrained(args.ckpt).eval()
    n_train = info["counts"]["train_images"]
    held_out = range(n_train, n_train + info["counts"]["eval_images"])
    size = model.cfg.vision.image_size
    tr = features(model, args.world, range(min(args.train, n_train)), version, size, info["seed"])
    te = features(model, args.world, held_out, version, size, info["seed"])
    print(f"Linear probes on {args.ckpt}: fitted on {min(args.train, n_train)} training images' patches, "
          f"scored on {len(held_out)} held-out images' patches (all / object patches only)\n")
    print("| probe | vision tower output | adapter output (the decoder's input) |")
    print("|---|---|---|")
    for name, relabel in TASKS.items():
        cells = []
        for i in (0, 1):
            acc, obj = probe(tr[i], relabel(tr[2]), te[i], relabel(te[2]))
            cells.append(f"{acc:.1%} / {obj:.1%}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
