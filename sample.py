"""
Talk to a nanoVT model about an image, and look at its visual tokens.

    python sample.py --image x.png --prompt "What shape is in the center?"   # one answer, streamed
    python sample.py --image x.png                                            # interactive chat
    python sample.py --image x.png --visual-tokens vt.png --nearest --probs   # Fig. 4 / Fig. 3c
    python sample.py --ckpt model.gguf --prompt "What is the capital of France?"   # an LLM alone, no image

--ckpt is a nanoVT checkpoint, a llava-hf directory or a GGUF LLM file (default: the shapes demo's final
model); without --image the chat is text only (a GGUF file holds no vision tower, so it takes no image);
the chat template is the one the model was trained with (model.cfg.template). --device auto picks the
GPU if there is one; --dtype auto loads bf16 there and fp32 on a CPU (a 7B model: 14 GB in bf16, one
24 GB GPU). Greedy decoding unless --temperature > 0 (then --top-k / --top-p / --seed apply).
--pseudo-image-features feeds X_p = softmax(W_VM X_image) E instead of X_image (Eq. 8).
--visual-tokens writes the image with its patch grid and the top-1 token of softmax(W_VM x) of each
patch (with --nearest, a second panel with the Eq. 3 cosine-nearest embedding token): a small grid
gets a label per patch; a 336 px CLIP's 24 x 24 grid (Fig. 4) is coloured by token, with borders
around the regions of patches sharing one and a legend of the most frequent tokens. The same grids
are printed as tables; without --prompt it then stops instead of starting a chat.
"""

import argparse
import os
import re
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import conversation
import data
import inference
from inference import prompt_ids, stop_ids

DEMO_CKPT = os.path.join("out", "shapes", "stage4", "final")  # what `python train.py configs/shapes.py` writes


def load(ckpt, tokenizer=None, device="cpu", pseudo_image_features=False, dtype="auto", template=None, compile="off"):
    from gguf_file import is_gguf
    if not os.path.exists(os.path.join(ckpt, "config.json")) and not is_gguf(ckpt):
        sys.exit(f"no model at {ckpt}: train the shapes demo with `python train.py configs/shapes.py` (it writes "
                 f"{DEMO_CKPT}), or pass --ckpt DIR (a nanoVT checkpoint or a llava-hf directory) or a GGUF file")
    return inference.load_model(ckpt, tokenizer, device, dtype, pseudo_image_features, template, compile)


def pixels(model, image):
    w = model.mm_head.weight
    return data.process_image(image, model.cfg.vision.image_size)[None].to(w.device, w.dtype)


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
    for t in inference.generate_stream(model, torch.tensor([ids], device=device), pixel_values, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop_ids=stop_ids(tok), generator=gen):
        if int(t[0]) in stop_ids(tok):
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
    ids = prompt_ids(model, tok, text, pixel_values is not None, history)
    inference.check_prompt_length(model, ids, "the prompt" if not history else "the chat so far")
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
        first = (conversation.IMAGE_TAG + "\n" + text) if pixel_values is not None and not history else text
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


def wrap(text, f, width):
    """`text` as lines no wider than `width` px, broken at spaces (a longer word at characters):
    every character is kept, so ''.join of the lines minus the break spaces is the text."""
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split(" "):
        trial = word if not line else line + " " + word
        if d.textlength(trial, font=f) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # a word wider than the panel: break it between characters
            if line and d.textlength(line + ch, font=f) > width:
                lines.append(line)
                line = ""
            line += ch
    return lines + [line]


# a qualitative palette (Tableau 20 order): the most frequent tokens get one each, the rest grey
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
           (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229)]
OTHER = (127, 127, 127)
TITLE_PX = 16


def title_lines(title, width):
    return wrap(title, font(TITLE_PX), width - 8)


def legend_entries(labels, k=len(PALETTE)):
    """[(label, count, colour)] for the k most frequent top-1 labels, then ("other", count, grey)."""
    counts = Counter(lab for row in labels for lab in row).most_common()
    out = [(lab, n, PALETTE[i]) for i, (lab, n) in enumerate(counts[:k])]
    rest = sum(n for _, n in counts[k:])
    return out + ([(f"other ({len(counts) - k} tokens)", rest, OTHER)] if rest else [])


def draw_panel(image, labels, title, cell, head=None, legend_width=260):
    """The image upscaled to `cell` px per patch under a wrapped title (never cut). A small grid
    (<= 8 x 8) gets one boxed label per patch; a larger one (24 x 24 for a 336 px CLIP) is coloured by
    each patch's top-1 token, with lines between patches whose tokens differ (the regions) and a
    legend of the most frequent tokens with their patch counts beside it."""
    g = len(labels)
    regions = g > 8
    width = g * cell + (legend_width if regions else 0)
    lines = title_lines(title, width)
    head = head or (len(lines) * (TITLE_PX + 4) + 8)
    im = image.convert("RGB").resize((g * cell, g * cell), Image.NEAREST)
    entries = legend_entries(labels) if regions else []
    if regions:  # each patch in its token's colour, shaded by the picture's brightness (hues match the legend)
        colour = {lab: c for lab, _, c in entries}
        tint = Image.new("RGB", im.size)
        td = ImageDraw.Draw(tint)
        for r in range(g):
            for c in range(g):
                td.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1),
                             fill=colour.get(labels[r][c], OTHER))
        shade = 0.4 + 0.6 * np.asarray(im.convert("L"), np.float32)[..., None] / 255
        im = Image.fromarray((np.asarray(tint, np.float32) * shade).round().astype(np.uint8))
    height = head + max(g * cell, 12 + 22 * len(entries))
    panel = Image.new("RGB", (width, height), "white")
    panel.paste(im, (0, head))
    d = ImageDraw.Draw(panel)
    for k, line in enumerate(lines):
        d.text((4, 4 + k * (TITLE_PX + 4)), line, fill="black", font=font(TITLE_PX))
    if regions:
        for r in range(g):  # region borders: between neighbours with different tokens
            for c in range(g):
                x, y = c * cell, head + r * cell
                if c + 1 < g and labels[r][c] != labels[r][c + 1]:
                    d.line([(x + cell, y), (x + cell, y + cell)], fill="black", width=2)
                if r + 1 < g and labels[r][c] != labels[r + 1][c]:
                    d.line([(x, y + cell), (x + cell, y + cell)], fill="black", width=2)
        f, x0 = font(14), g * cell + 12
        for k, (lab, n, col) in enumerate(entries):
            y = head + 6 + 22 * k
            d.rectangle((x0, y, x0 + 16, y + 16), fill=col, outline="black")
            text = f"{lab}  {n} ({n / (g * g):.0%})"
            while d.textlength(text, font=f) > legend_width - 40 and len(lab) > 1:  # the table has the full label
                lab = lab[:-2] + "\u2026"
                text = f"{lab}  {n} ({n / (g * g):.0%})"
            d.text((x0 + 24, y + 8), text, fill="black", font=f, anchor="lm")
        return panel
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


def visual_token_picture(model, tok, image, out_path, nearest=False, cell=None):
    """Write the picture (one panel per reading of a patch, side by side); returns the grids.
    cell: pixels per patch (default 64 for a small grid, 768 / g for a larger one: 32 for 24 x 24)."""
    px = pixels(model, image)
    grids = token_grids(model, tok, px, nearest)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    cell = cell or (64 if g <= 8 else max(12, 768 // g))
    # show the image exactly as the model sees it: padded, resized, cropped (undo the normalisation)
    mean, std = torch.tensor(data.CLIP_MEAN)[:, None, None], torch.tensor(data.CLIP_STD)[:, None, None]
    rgb = ((px[0].float().cpu() * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    width = g * cell + (260 if g > 8 else 0)
    head = max(len(title_lines(name, width)) for name in grids) * (TITLE_PX + 4) + 8  # one title band for all
    panels = [draw_panel(Image.fromarray(rgb), labels, name, cell, head) for name, (labels, _) in grids.items()]
    pad = 16
    out = Image.new("RGB", (sum(p.width for p in panels) + pad * (len(panels) - 1), max(p.height for p in panels)),
                    "white")
    for k, p in enumerate(panels):
        out.paste(p, (k * (p.width + pad), 0))
    out.save(out_path)
    return grids


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    try:
        return _main(argv)
    except inference.InputError as e:  # one line, no traceback
        sys.exit(f"sample.py: {e}")


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=None, help="the picture to talk about (without it: text only)")
    p.add_argument("--prompt", default=None, help="one question; without it, an interactive chat")
    p.add_argument("--ckpt", default=DEMO_CKPT, help=f"nanoVT checkpoint, llava-hf directory or GGUF LLM file "
                                                     f"(default {DEMO_CKPT})")
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
    p.add_argument("--cell", type=int, default=None, help="picture: pixels per patch (default 64; 32 for 24 x 24)")
    inference.add_args(p)
    a = p.parse_args(argv)
    if a.image is None and a.visual_tokens:
        p.error("--visual-tokens needs --image")
    model, tok = load(a.ckpt, a.tokenizer, a.device, a.pseudo_image_features, a.dtype, a.template, a.compile)
    if a.image is not None and getattr(model, "llm_only", False):
        raise inference.InputError(f"{a.ckpt} is a language model alone (no trained vision tower): leave out "
                                   f"--image, or train one with it (configs/shapes_smollm2.py)")
    image = inference.read_image(a.image) if a.image is not None else None
    if a.visual_tokens:
        grids = visual_token_picture(model, tok, image, a.visual_tokens, a.nearest, a.cell)
        for name, (labels, values) in grids.items():
            print(f"{name}:\n{table(labels, values if a.probs else None)}\n")
        print(f"wrote {a.visual_tokens}")
        if a.prompt is None:
            return
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed)
    px = pixels(model, image) if image is not None else None
    if a.prompt is not None:
        return reply(model, tok, px, a.prompt, **sampling)[0]
    chat(model, tok, px, **sampling)


if __name__ == "__main__":
    main(sys.argv[1:])
