"""
Answer LLaVA-style question files with batched greedy decoding, and score the answers.

    python eval.py --ckpt out/shapes/final --questions data/shapes/eval_pope.jsonl \
        --image-folder data/shapes --answers out/pope_answers.jsonl --metric pope

Question files are jsonl: {"question_id", "image", "text", and "answer" or "label"}.
Answers are written one line per question as soon as a batch is done, so an interrupted run
continues where it stopped (questions already in the answer file are not asked again).

Metrics: pope (SPEC §7: accuracy, precision, recall, F1, yes-ratio; per category too), vqa (VQAv2's
answer normalisation, exact match against any accepted answer), mc (option letters, parsed as LLaVA's
ScienceQA script does). A checkpoint trained with pseudo image features answers from X_p by itself;
--pseudo-image-features switches any model to X_p (Eq. 8).
"""

import argparse
import json
import os
import re
import sys

import torch

import data
from model import VTLMM


def read_jsonl(path, allow_torn_tail=False):
    """Rows of a jsonl file. allow_torn_tail: a last line without its newline that does not parse
    (a run killed mid-write) is dropped instead of raising."""
    rows = []
    with open(path) as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if allow_torn_tail and n == len(lines) and not line.endswith("\n"):
                    break
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
        for row in read_jsonl(answers_path, allow_torn_tail=True):
            done[row["question_id"]] = row
        _drop_torn_tail(answers_path)
    todo = [q for q in questions if q["question_id"] not in done]
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    size = model.cfg.vision.image_size
    from tqdm import tqdm
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering",
               disable=None if progress else True, dynamic_ncols=True)  # None: off when not a terminal
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


def _drop_torn_tail(path):
    """Cut a file back to its last newline, so appended rows never glue onto a half-written one."""
    with open(path, "rb+") as f:
        raw = f.read()
        if raw and not raw.endswith(b"\n"):
            f.truncate(raw.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------------------------
# scoring


def pope_yes(text):
    """LLaVA's POPE parsing (SPEC §7): the text before the first '.', commas removed; 'no' if it
    holds the word No / not / no, else 'yes'."""
    first = text.split(".")[0].replace(",", "")
    words = first.split()
    return not ("No" in words or "not" in words or "no" in words)


def _pope_counts(pairs):
    """pairs: (predicted yes, gold yes) -> the POPE metrics, 'yes' the positive class."""
    tp = fp = tn = fn = 0
    for pred, gold in pairs:
        tp += pred and gold
        fp += pred and not gold
        tn += (not pred) and not gold
        fn += (not pred) and gold
    n = tp + fp + tn + fn
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"accuracy": (tp + tn) / max(n, 1), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / max(n, 1), "n": n}


def score_pope(answers, questions):
    """Accuracy, precision, recall, F1 and yes-ratio (SPEC §7), overall and per `category` if the
    questions have one (POPE's random / popular / adversarial)."""
    qs = {q["question_id"]: q for q in questions}
    pairs = {}
    for a in answers:
        q = qs[a["question_id"]]
        gold = str(q.get("label", q.get("answer"))).strip().lower() == "yes"
        pairs.setdefault(q.get("category"), []).append((pope_yes(a["text"]), gold))
    report = _pope_counts([p for ps in pairs.values() for p in ps])
    if any(c is not None for c in pairs):
        report["categories"] = {c: _pope_counts(ps) for c, ps in sorted(pairs.items(), key=str)}
    return report


# VQAv2's official answer normalisation (vqaEval.py / EvalAI's answer processor), abridged contractions
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "thats": "that's", "whats": "what's", "wasnt": "wasn't",
                 "werent": "weren't", "didnt": "didn't", "couldnt": "couldn't", "shouldnt": "shouldn't",
                 "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't", "youre": "you're",
                 "theyre": "they're", "lets": "let's", "ive": "i've"}
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: "2." -> "2", "3.5" stays


def normalize_answer(text):
    """VQAv2-style: lower case; a punctuation mark next to a space (or any, if the text has a number
    with a comma) is dropped, elsewhere it becomes a space ("black-and-white" -> "black and white");
    periods out except in numbers; number words to digits; articles out; contractions restored."""
    t = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if p + " " in t or " " + p in t or _COMMA_IN_NUMBER.search(t):
            t = t.replace(p, "")
        else:
            t = t.replace(p, " ")
    t = _PERIOD.sub("", t)
    words = [_NUMBERS.get(w, w) for w in t.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def score_vqa(answers, questions):
    """Exact match after normalisation; `answer` (or `answers`) may be one string or a list of accepted ones."""
    gold = {}
    for q in questions:
        a = q.get("answer", q.get("answers"))
        gold[q["question_id"]] = {normalize_answer(str(x)) for x in (a if isinstance(a, list) else [a])}
    hits = sum(normalize_answer(a["text"]) in gold[a["question_id"]] for a in answers)
    return {"accuracy": hits / max(len(answers), 1), "n": len(answers)}


def mc_letter(text, n_options=10):
    """The option letter an answer names, as LLaVA's ScienceQA script parses it (plus brackets):
    'B', 'B.', 'B)', '(B)', 'B: ...', '... The answer is B.' -> 'B'; 'A cat', 'b', '' -> None."""
    letters = "ABCDEFGHIJ"[:n_options]
    t = text.strip()
    m = re.match(rf"^\(?([{letters}])(?:[.:)]|$)", t)
    if m:
        return m.group(1)
    found = re.findall(rf"The answer is \(?([{letters}])(?:[.,:)]|$)", t)
    return found[0] if len(found) == 1 else None


def score_mc(answers, questions):
    """Accuracy on option letters; a question's `choices`/`options` list, if any, bounds the letters."""
    qs = {q["question_id"]: q for q in questions}
    hits = 0
    for a in answers:
        q = qs[a["question_id"]]
        gold = str(q.get("answer", q.get("label"))).strip().strip("()").upper()[:1]
        n = len(q.get("choices") or q.get("options") or "ABCDEFGHIJ")
        hits += mc_letter(a["text"], n) == gold
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
    p.add_argument("--pseudo-image-features", action="store_true", help="answer from X_p (Eq. 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--template", choices=data.TEMPLATES, default=None,
                   help="chat template (default: the one the checkpoint was trained with)")
    a = p.parse_args(argv)
    model, tok = load_model(a.ckpt, a.device, torch.bfloat16 if a.device == "cuda" else torch.float32, a.tokenizer)
    if a.template:
        model.cfg.template = a.template  # every prompt is rendered in model.cfg.template
    if a.pseudo_image_features:
        model.cfg.pseudo_image_features = True
    qs = read_jsonl(a.questions)[: a.limit or None]
    folder = a.image_folder or os.path.dirname(os.path.abspath(a.questions))
    ans = answer_file(model, tok, qs, folder, a.answers, a.batch_size, a.max_new_tokens)
    if a.metric:
        scores = METRICS[a.metric](ans, qs)
        print(json.dumps(scores, indent=2))
        return scores


if __name__ == "__main__":
    main(sys.argv[1:])
