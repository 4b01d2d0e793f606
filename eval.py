"""
Answer LLaVA-style question files with batched greedy decoding, and score the answers.

    python eval.py --ckpt out/shapes/final --questions data/shapes/eval_pope.jsonl \
        --image-folder data/shapes --answers out/pope_answers.jsonl --metric pope

Question files are jsonl: {"question_id", "image", "text", and "answer" or "label"}.
Answers are written one line per question as soon as a batch is done, so an interrupted run
continues where it stopped (questions already in the answer file are not asked again).

Metrics: pope (SPEC §7: accuracy, precision, recall, F1, yes-ratio), vqa (VQAv2-style answer
normalisation, exact match), mc (multiple-choice letters, ScienceQA-style parsing).
"""

import argparse
import json
import os
import re
import sys

import torch
from PIL import Image

import data
from model import VTLMM


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    return rows


# ----------------------------------------------------------------------------------------------
# answering


def load_model(ckpt, device="cpu", dtype=torch.float32, tokenizer=None):
    model = VTLMM.from_pretrained(ckpt, dtype=dtype, device=device).eval()
    tok = data.load_tokenizer(tokenizer or ckpt)
    return model, tok


def prompt_ids(model, tok, text, has_image, history=()):
    """Token ids of a generation prompt: the chat so far + a new user turn, ending at the
    assistant's prefix, in the model's own template."""
    turns = list(history) + [{"from": "human", "value": (data.IMAGE_TAG + "\n" + text) if has_image and
                              not history else text}]
    rendered = data.render_conversation(turns, model.cfg.template, has_image=has_image)
    return data.tokenize_prompt(rendered, tok, model.cfg.image_token_id, model.cfg.vision.num_patches)


def stop_ids(tok):
    return [tok.eos_id]


@torch.no_grad()
def answer_batch(model, tok, prompts, images, max_new_tokens=32):
    """prompts: lists of ids; images: (N, 3, H, W) for the prompts holding an image, in order.
    Left-pads, decodes greedily with the KV cache, returns the answer strings."""
    device = model.mm_head.weight.device
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = True
    steps = list(model.generate_stream(ids.to(device), images.to(device) if images is not None else None,
                                       attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                       stop_ids=stop_ids(tok)))
    out = []
    for b in range(len(prompts)):
        toks = []
        for s in steps:
            t = int(s[b])
            if t in stop_ids(tok):
                break
            toks.append(t)
        out.append(tok.decode(toks).strip())
    return out


def answer_file(model, tok, questions, image_folder, answers_path, batch_size=16, max_new_tokens=32,
                progress=True):
    """Answer every question not yet in `answers_path`, appending as it goes. Returns all answers."""
    done = {}
    if os.path.exists(answers_path):
        for row in read_jsonl(answers_path):
            done[row["question_id"]] = row
    todo = [q for q in questions if q["question_id"] not in done]
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    size = model.cfg.vision.image_size
    from tqdm import tqdm
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering",
               disable=not progress, dynamic_ncols=True)
    with open(answers_path, "a") as f:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompts, images = [], []
            for q in chunk:
                has_image = bool(q.get("image"))
                prompts.append(prompt_ids(model, tok, q["text"], has_image))
                if has_image:
                    img = data.load_image(os.path.join(image_folder, q["image"]))
                    images.append(data.process_image(img, size))
            texts = answer_batch(model, tok, prompts, torch.stack(images) if images else None, max_new_tokens)
            for q, a in zip(chunk, texts):
                row = {"question_id": q["question_id"], "prompt": q["text"], "text": a}
                done[q["question_id"]] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return [done[q["question_id"]] for q in questions]


# ----------------------------------------------------------------------------------------------
# scoring


def pope_yes(text):
    """LLaVA's POPE parsing (SPEC §7): the text before the first '.', commas removed; 'no' if it
    holds the word No / not / no, else 'yes'."""
    first = text.split(".")[0].replace(",", "")
    words = first.split()
    return not ("No" in words or "not" in words or "no" in words)


def score_pope(answers, questions):
    """Accuracy, precision, recall, F1 and yes-ratio, with 'yes' the positive class."""
    label = {q["question_id"]: q.get("label", q.get("answer")).strip().lower() == "yes" for q in questions}
    tp = fp = tn = fn = 0
    for a in answers:
        pred, gold = pope_yes(a["text"]), label[a["question_id"]]
        tp += pred and gold
        fp += pred and not gold
        tn += (not pred) and not gold
        fn += (not pred) and gold
    n = max(tp + fp + tn + fn, 1)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": tp + fp + tn + fn}


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "its": "it's", "im": "i'm", "thats": "that's", "whats": "what's"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(text):
    """VQAv2-style: lower case, punctuation out (a period only outside numbers), number words to
    digits, articles out, common contractions restored."""
    t = text.replace("\n", " ").replace("\t", " ").strip().lower()
    t = _PUNCT.sub("", t)
    t = re.sub(r"(?<!\d)\.(?!\d)", "", t)
    words = []
    for w in t.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def score_vqa(answers, questions):
    """Exact match after normalisation; `answer` may be one string or a list of accepted ones."""
    gold = {}
    for q in questions:
        a = q.get("answer", q.get("answers"))
        gold[q["question_id"]] = {normalize_answer(x) for x in (a if isinstance(a, list) else [a])}
    hits = sum(normalize_answer(a["text"]) in gold[a["question_id"]] for a in answers)
    return {"accuracy": hits / max(len(answers), 1), "n": len(answers)}


def mc_letter(text, n_options=5):
    """The option letter an answer names: 'B', 'B.', '(B)', 'The answer is B.' -> 'B'; else None."""
    letters = "ABCDEFGHIJ"[:n_options]
    t = text.strip()
    m = re.match(rf"^\(?([{letters}])\)?(?:[.:)\s]|$)", t)
    if m:
        return m.group(1)
    m = re.search(rf"answer is:?\s*\(?([{letters}])\b", t, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    return None


def score_mc(answers, questions):
    gold = {q["question_id"]: q.get("answer", q.get("label")).strip().strip("()").upper()[:1] for q in questions}
    hits = sum(mc_letter(a["text"]) == gold[a["question_id"]] for a in answers)
    return {"accuracy": hits / max(len(answers), 1), "n": len(answers)}


METRICS = {"pope": score_pope, "vqa": score_vqa, "mc": score_mc}


# ----------------------------------------------------------------------------------------------
# the shapes world's held-out sets, as the demo reports them


def shapes_report(ckpt, shapes_dir, limit=0, out_path=None, batch_size=32, progress=True, model=None, tok=None):
    """Answer and score the shapes world's eval_short.jsonl (vqa) and eval_pope.jsonl (pope)."""
    if model is None:
        model, tok = load_model(ckpt, tokenizer=os.path.join(shapes_dir, "tokenizer.model"))
    report = {}
    for name, metric in (("short", "vqa"), ("pope", "pope")):
        qs = read_jsonl(os.path.join(shapes_dir, f"eval_{name}.jsonl"))
        if limit:
            qs = qs[:limit]
        apath = os.path.join(os.path.dirname(out_path) if out_path else ckpt, f"answers_{name}.jsonl")
        if os.path.exists(apath):
            os.remove(apath)  # a fresh model: old answers are stale
        ans = answer_file(model, tok, qs, shapes_dir, apath, batch_size=batch_size, progress=progress)
        report[name] = METRICS[metric](ans, qs)
    print("held-out shapes: short-answer accuracy {:.1%} ({} questions); POPE accuracy {:.1%}, F1 {:.3f}, "
          "yes-ratio {:.2f} ({} questions)".format(report["short"]["accuracy"], report["short"]["n"],
                                                   report["pope"]["accuracy"], report["pope"]["f1"],
                                                   report["pope"]["yes_ratio"], report["pope"]["n"]))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="nanoVT checkpoint or llava-hf directory")
    p.add_argument("--questions", required=True, help="question jsonl")
    p.add_argument("--image-folder", default="", help="images are relative to this (default: the file's folder)")
    p.add_argument("--answers", required=True, help="answer jsonl (appended to; resumable)")
    p.add_argument("--metric", choices=sorted(METRICS), help="score the answers with this metric")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: in --ckpt)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    model, tok = load_model(a.ckpt, a.device, torch.bfloat16 if a.device == "cuda" else torch.float32, a.tokenizer)
    qs = read_jsonl(a.questions)[: a.limit or None]
    folder = a.image_folder or os.path.dirname(os.path.abspath(a.questions))
    ans = answer_file(model, tok, qs, folder, a.answers, a.batch_size, a.max_new_tokens)
    if a.metric:
        scores = METRICS[a.metric](ans, qs)
        print(json.dumps(scores, indent=2))
        return scores


if __name__ == "__main__":
    main(sys.argv[1:])
