"""
Talk to a nanoVT model about an image, and look at its visual tokens.

    python sample.py --image x.png --prompt "What shape is in the center?"   # one answer, streamed
    python sample.py --image x.png                                            # interactive chat
    python sample.py --image x.png --visual-tokens vt.png --nearest --probs   # Fig. 4 / Fig. 3c

--ckpt is a nanoVT checkpoint or a llava-hf directory (default: the shapes demo's final model);
the chat template is the one the model was trained with (model.cfg.template). Greedy decoding
unless --temperature > 0 (then --top-k / --top-p / --seed apply). --pseudo-image-features feeds
X_p = softmax(W_VM X_image) E instead of X_image (Eq. 8). --visual-tokens writes the image with
its patch grid, each patch labelled with the top-1 token of softmax(W_VM x) (and, with --nearest,
a second panel with the Eq. 3 cosine-nearest embedding token), and prints the same as a table;
without --prompt it then stops instead of starting a chat.
"""

import argparse
import os
import re
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import data
import eval as evaluate
from model import VTLMM

DEMO_CKPT = os.path.join("out", "shapes", "stage4", "final")  # what `python train.py configs/shapes.py` writes


def load(ckpt, tokenizer=None, device="cpu", pseudo_image_features=False):
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        sys.exit(f"no model at {ckpt}: train the shapes demo with `python train.py configs/shapes.py` (it writes "
                 f"{DEMO_CKPT}), or pass --ckpt DIR (a nanoVT checkpoint or a llava-hf directory)")
    model = VTLMM.from_pretrained(ckpt, device=device).eval()
    if pseudo_image_features:
        model.cfg.pseudo_image_features = True  # Eq. 8 at inference
    return model, data.load_tokenizer(tokenizer or ckpt)


def pixels(model, image):
    return data.process_image(image, model.cfg.vision.image_size)[None].to(model.mm_head.weight.device)


# ----------------------------------------------------------------------------------------------
# answering


def stream(model, tok, ids, pixel_values, out=None, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
           seed=None):
    """Yields the answer's text piece by piece, one generated token at a time, appending the ids to
    `out`. Each piece is the new suffix of the decoded growing id list, so sentencepiece's word-start
    spaces come out right (decoding tokens one by one would lose them)."""
    device = model.mm_head.weight.device
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    out = [] if out is None else out
    shown = ""
    for t in model.generate_stream(torch.tensor([ids], device=device), pixel_values, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop_ids=evaluate.stop_ids(tok), generator=gen):
        if int(t[0]) in evaluate.stop_ids(tok):
            break
        out.append(int(t[0]))
        text = tok.decode(out)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        yield text[len(os.path.commonprefix([text, shown])):]
        shown = text
    text = tok.decode(out)
    if text != shown:
        yield text[len(os.path.commonprefix([text, shown])):]


def reply(model, tok, pixel_values, text, history=(), write=None, **sampling):
    """Answer one user turn (the image belongs to the first turn of `history`, or to this one if
    there is no history), writing the answer as it comes; returns (answer text, answer ids)."""
    write = write or sys.stdout.write
    ids = evaluate.prompt_ids(model, tok, text, pixel_values is not None, history)
    out = []
    for piece in stream(model, tok, ids, pixel_values, out, **sampling):
        write(piece)
        sys.stdout.flush()
    write("\n")
    return tok.decode(out).strip(), out


def chat(model, tok, pixel_values, read=input, **sampling):
    """Multi-turn chat about one image; the history is re-rendered in the model's template each turn."""
    history = []
    print("chat about the image (empty line or Ctrl-D to quit)")
    while True:
        try:
            text = read("USER: ").strip()
        except EOFError:
            break
        if not text:
            break
        sys.stdout.write("ASSISTANT: ")
        answer, _ = reply(model, tok, pixel_values, text, history, **sampling)
        first = (data.IMAGE_TAG + "\n" + text) if pixel_values is not None and not history else text
        history += [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]
    return history


# ----------------------------------------------------------------------------------------------
# visual tokens (Fig. 4, Fig. 3c)


def label(tok, i):
    """A token as a short readable label: the word-start marker dropped, control pieces escaped."""
    p = tok.piece(i)
    m = re.fullmatch(r"<0x([0-9A-F]{2})>", p)  # a byte-fallback piece: show the character if printable
    if m and 32 < int(m.group(1), 16) < 127:
        p = chr(int(m.group(1), 16))
    s = p.replace("\u2581", " ").strip()
    return (s or "\u2423").replace("\n", "\\n")  # a bare space piece shows as a visible-space sign


def token_grids(model, tok, pixel_values, nearest=False):
    """{"top-1 of softmax(W_VM x)": (labels, probs), "Eq. 3 nearest": (labels, cosines)}, each a g x g grid."""
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    ids, probs = model.visual_tokens(pixel_values, k=1)
    grids = {"visual tokens: top-1 of softmax(W_VM x)": (ids[0, :, 0], probs[0, :, 0])}
    if nearest:
        nids, cos = model.nearest_tokens(pixel_values)
        grids["Eq. 3: nearest input embedding (cosine)"] = (nids[0], cos[0])
    return {name: ([[label(tok, t) for t in i[r * g:(r + 1) * g].tolist()] for r in range(g)],
                   [p[r * g:(r + 1) * g].tolist() for r in range(g)])
            for name, (i, p) in grids.items()}


def table(labels, values=None):
    """A rows x cols text grid, columns padded to their widest cell."""
    cells = [[lab + (f" {v:.3f}" if values is not None else "") for lab, v in zip(row, vrow or row)]
             for row, vrow in zip(labels, values or [None] * len(labels))]
    widths = [max(len(r[c]) for r in cells) for c in range(len(cells[0]))]
    return "\n".join(" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in cells)


def font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def draw_panel(image, labels, title, cell):
    """The image upscaled to `cell` px per patch, the patch grid, and one boxed label per patch."""
    g = len(labels)
    im = image.convert("RGB").resize((g * cell, g * cell), Image.NEAREST)
    head = cell // 2
    panel = Image.new("RGB", (im.width, im.height + head), "white")
    panel.paste(im, (0, head))
    d = ImageDraw.Draw(panel)
    d.text((4, head // 2), title, fill="black", font=font(max(10, head // 2)), anchor="lm")
    for k in range(g + 1):
        d.line([(k * cell, head), (k * cell, head + g * cell)], fill=(255, 255, 255), width=1)
        d.line([(0, head + k * cell), (g * cell, head + k * cell)], fill=(255, 255, 255), width=1)
    for r in range(g):
        for c in range(g):
            text, size = labels[r][c], max(8, cell // 4)
            f = font(size)
            while d.textlength(text, font=f) > cell - 4 and size > 7:  # shrink, then cut, to fit the cell
                size -= 1
                f = font(size)
            while d.textlength(text, font=f) > cell - 4 and len(text) > 1:
                text = text[:-2] + "\u2026"
            x, y = c * cell + cell / 2, head + (r + 1) * cell - 3  # at the cell's foot: the patch stays visible
            box = d.textbbox((x, y), text, font=f, anchor="mb")
            d.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(255, 255, 255), outline=(0, 0, 0))
            d.text((x, y), text, fill=(0, 0, 0), font=f, anchor="mb")
    return panel


def visual_token_picture(model, tok, image, out_path, nearest=False, cell=64):
    """Write the picture (one panel per reading of a patch, side by side); returns the grids."""
    px = pixels(model, image)
    grids = token_grids(model, tok, px, nearest)
    # show the image exactly as the model sees it: padded, resized, cropped (undo the normalisation)
    mean, std = torch.tensor(data.CLIP_MEAN)[:, None, None], torch.tensor(data.CLIP_STD)[:, None, None]
    rgb = ((px[0].cpu() * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    panels = [draw_panel(Image.fromarray(rgb), labels, name, cell) for name, (labels, _) in grids.items()]
    pad = 16
    out = Image.new("RGB", (sum(p.width for p in panels) + pad * (len(panels) - 1), panels[0].height), "white")
    for k, p in enumerate(panels):
        out.paste(p, (k * (p.width + pad), 0))
    out.save(out_path)
    return grids


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default=None, help="one question; without it, an interactive chat")
    p.add_argument("--ckpt", default=DEMO_CKPT, help=f"nanoVT checkpoint or llava-hf directory (default {DEMO_CKPT})")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --ckpt)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (temperature > 0)")
    p.add_argument("--pseudo-image-features", action="store_true", help="answer from X_p (Eq. 8)")
    p.add_argument("--visual-tokens", default=None, metavar="OUT.png", help="write the visual-token picture")
    p.add_argument("--nearest", action="store_true", help="picture: add the Eq. 3 nearest-token panel")
    p.add_argument("--probs", action="store_true", help="table: print each label's probability (cosine)")
    p.add_argument("--cell", type=int, default=64, help="picture: pixels per patch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--template", choices=data.TEMPLATES, default=None,
                   help="chat template (default: the one the checkpoint was trained with)")
    a = p.parse_args(argv)
    model, tok = load(a.ckpt, a.tokenizer, a.device, a.pseudo_image_features)
    if a.template:
        model.cfg.template = a.template  # every prompt is rendered in model.cfg.template
    image = data.load_image(a.image)
    if a.visual_tokens:
        grids = visual_token_picture(model, tok, image, a.visual_tokens, a.nearest, a.cell)
        for name, (labels, values) in grids.items():
            print(f"{name}:\n{table(labels, values if a.probs else None)}\n")
        print(f"wrote {a.visual_tokens}")
        if a.prompt is None:
            return
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed)
    px = pixels(model, image)
    if a.prompt is not None:
        return reply(model, tok, px, a.prompt, **sampling)[0]
    chat(model, tok, px, **sampling)


if __name__ == "__main__":
    main(sys.argv[1:])
