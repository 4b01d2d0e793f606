"""
The paper's benchmarks (Tables 1, 4, 5) as LLaVA-1.5 evaluates them: question readers, prompts, scorers,
and the submission files of the benchmarks scored by a server or a GPT judge. eval.py answers; this
file knows the benchmarks. The data layout is LLaVA-1.5's playground/data/eval (docs/eval.md).

Every reader returns question dicts {"question_id", "text" (the full user prompt, without <image>),
"image" (a file relative to the image folder) or "image_b64" or nothing, and gold fields}; a "key"
field is added where question_ids repeat by design (TextVQA: one id per image).
"""

import base64
import csv
import io
import json
import os
import re
import sys
import zipfile
from xml.sax.saxutils import escape

# ----------------------------------------------------------------------------------------------
# prompts (LLaVA-1.5's question files carry them; a bare question gets them appended)

SHORT = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"


def with_suffix(text, suffix):
    """`text` ending with `suffix` on its own last line (left as is if it already does)."""
    text = text.strip()
    return text if not suffix or text.endswith(suffix) else text + "\n" + suffix


# ----------------------------------------------------------------------------------------------
# EvalAI's answer normalisation (VQAv2, VizWiz, TextVQA; m4c_evaluator.EvalAIAnswerProcessor)

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# missing apostrophes restored, as EvalAI's table lists them (keys written without the apostrophe)
_CONTRACTIONS = dict(
    w.split(":") for w in (
        "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
        "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
        "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
        "howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've "
        "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
        "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
        "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
        "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
        "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
        "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
        "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
        "somethingd:something'd somethingd've:something'd've something'dve:something'd've "
        "somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've "
        "therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll "
        "theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've "
        "werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd "
        "wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's "
        "whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't "
        "wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll "
        "yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've "
        "you'dve:you'd've youll:you'll youre:you're youve:you've").split())
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: "2." -> "2", "3.5" stays


def normalize_answer(text):
    """EvalAI's steps in order: lower case, ',' and '?' out, "'s" split off ("man's" -> "man 's");
    a punctuation mark next to a space is dropped, elsewhere it becomes a space ("black-and-white"
    -> "black and white"); periods out unless a digit follows (at most 32, as EvalAI's count argument);
    number words to digits; articles out; missing apostrophes restored ("dont" -> "don't")."""
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    spaced = t
    for p in _PUNCT:  # the test looks at the text before any replacement, as EvalAI does
        t = t.replace(p, "" if (p + " " in spaced or " " + p in spaced) else " ")
    t = _PERIOD.sub("", t, count=32)
    words = [_NUMBERS.get(w, w) for w in t.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction, human_answers):
    """VQA accuracy of one prediction: over the ten leave-one-out subsets of the ten human answers,
    the mean of min(#answers in the subset equal to the prediction / 3, 1), all normalised."""
    if len(human_answers) != 10:
        raise ValueError(f"VQA accuracy needs ten human answers, got {len(human_answers)}")
    pred = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in human_answers]
    matches = sum(g == pred for g in gold)
    # leaving out a matching answer leaves matches - 1, any other leaves matches
    return sum(min((matches - (g == pred)) / 3, 1.0) for g in gold) / len(gold)


def score_vqa(answers, questions):
    """Mean VQA accuracy. A question's gold (`answers` or `answer`) is a list of the ten human answers
    (strings or VQAv2's {"answer": ...}), or one string, which counts as ten annotators agreeing (the
    shapes world's held-out set)."""
    qs = _by_key(questions)
    total = 0.0
    for a in answers:
        q = qs[_key(a)]
        gold = q.get("answers", q.get("answer"))
        if not isinstance(gold, list):
            gold = [str(gold)] * 10
        total += vqa_accuracy(a["text"], [g["answer"] if isinstance(g, dict) else str(g) for g in gold])
    return {"accuracy": total / max(len(answers), 1), "n": len(answers)}


def score_gqa(answers, questions):
    """GQA accuracy: LLaVA's conversion (trailing periods off, lower case), then exact match with the
    gold answer, as GQA's eval.py counts it on the balanced test-dev questions."""
    qs = _by_key(questions)
    hits = sum(a["text"].rstrip(".").lower() == qs[_key(a)]["answer"] for a in answers)
    return {"accuracy": hits / max(len(answers), 1), "n": len(answers)}


# ----------------------------------------------------------------------------------------------
# ScienceQA (eval_science_qa.py): option letters A-E, integer gold index


SQA_OPTIONS = ("A", "B", "C", "D", "E")


def sqa_letter(text):
    """LLaVA's parse: the whole answer is a letter ("B"), or starts with a letter and ". " ("B. cat"),
    or holds exactly one "The answer is X" followed by any character; anything else fails (None).
    So "B)", "(B)", "B." and "The answer is (B)." fail, as in LLaVA's scorer."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


def score_sqa(answers, questions):
    """Accuracy over all questions (a missing or unparsable answer is wrong), and over the questions
    with an image: the paper's SQA-I figure. Gold is the integer index of the right choice."""
    got = {_key(a): a["text"] for a in answers}
    right = {True: 0, False: 0}
    count = {True: 0, False: 0}
    for q in questions:
        letter = sqa_letter(got.get(_key(q), "FAILED"))
        n = len(q.get("choices") or SQA_OPTIONS)
        pred = SQA_OPTIONS.index(letter) if letter is not None and letter in SQA_OPTIONS[:n] else -1
        gold = q["answer"]  # ScienceQA's integer index; a letter ("B") is read as its index
        gold = SQA_OPTIONS.index(gold.strip()) if isinstance(gold, str) and gold.strip() in SQA_OPTIONS else int(gold)
        img = bool(q.get("image"))
        right[img] += pred == gold
        count[img] += 1
    n = count[True] + count[False]
    return {"accuracy": (right[True] + right[False]) / max(n, 1), "img_accuracy": right[True] / max(count[True], 1),
            "n": n, "n_img": count[True]}


# ----------------------------------------------------------------------------------------------
# POPE (eval_pope.py): per category, the paper's figure is the mean of the three F1


def pope_yes(text):
    """LLaVA's parse: the text before the first '.', commas removed, split at spaces; 'no' if a word
    is No / not / no, else 'yes'."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(pairs):
    """pairs: (predicted yes, gold yes) -> accuracy, precision, recall, F1, yes-ratio ('yes' positive)."""
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    tn = sum(not p and not g for p, g in pairs)
    fn = sum(not p and g for p, g in pairs)
    n = tp + fp + tn + fn
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / max(n, 1), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / max(n, 1), "n": n}


def score_pope(answers, questions):
    """Metrics over all answers, per `category` (random / popular / adversarial) when the questions
    have one, and `mean_f1`: the mean F1 of the categories (Table 1's POPE figure)."""
    qs = _by_key(questions)
    pairs = {}
    for a in answers:
        q = qs[_key(a)]
        gold = str(q.get("label", q.get("answer"))).strip().lower() == "yes"
        pairs.setdefault(q.get("category"), []).append((pope_yes(a["text"]), gold))
    report = pope_metrics([p for ps in pairs.values() for p in ps])
    if any(c is not None for c in pairs):
        report["categories"] = {c: pope_metrics(ps) for c, ps in sorted(pairs.items(), key=str)}
        f1s = [m["f1"] for m in report["categories"].values()]
        report["mean_f1"] = sum(f1s) / len(f1s)
    return report


# ----------------------------------------------------------------------------------------------
# MMBench: circular evaluation; a question counts only if every rotation of its options is right


def mmbench_letter(text, options):
    """The option an answer names, by MMBench's rules before its GPT fallback (not run here): with
    . ( ) [ ] , : ; ! * # { } made spaces, exactly one option letter standing as a word (and no
    standalone 'A' in a longer answer, where it may be an article); else exactly one option's text
    inside the answer (case-insensitive), tried whenever the letter rule does not decide. None if
    neither decides."""
    letters = [chr(65 + i) for i in range(len(options))]
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    named = [c for c in letters if c in words]
    if len(named) == 1 and not ("A" in words and len(words) > 3):
        return named[0]
    if not named and "Z" in words:  # MMBench's "none of the options"
        return None
    inside = [c for c, o in zip(letters, options) if str(o).lower() in text.lower()]
    return inside[0] if len(inside) == 1 else None


def score_mmbench(answers, questions):
    """Circular accuracy: questions grouped by `group` (MMBench's index mod 1e6: a question and its
    rotated copies); a group is right only if every copy's answer names its gold letter."""
    got = {_key(a): a["text"] for a in answers}
    groups = {}
    for q in questions:
        ok = _key(q) in got and mmbench_letter(got[_key(q)], q["options"]) == q["answer"]
        groups[q["group"]] = groups.get(q["group"], True) and ok
    single = sum(_key(q) in got and mmbench_letter(got[_key(q)], q["options"]) == q["answer"] for q in questions)
    return {"accuracy": sum(groups.values()) / max(len(groups), 1), "n": len(groups),
            "single_pass_accuracy": single / max(len(questions), 1)}


# ----------------------------------------------------------------------------------------------
# readers


def _key(row):
    return row.get("key", row["question_id"])


def _by_key(rows):
    return {_key(r): r for r in rows}


def duplicates(questions):
    """The keys that occur more than once."""
    seen, dup = set(), []
    for q in questions:
        k = _key(q)
        if k in seen and k not in dup:
            dup.append(k)
        seen.add(k)
    return dup


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    return rows


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _short(rows, suffix_lines):
    for r in rows:
        r["text"] = with_suffix(r["text"], "\n".join(suffix_lines))
    return rows


def read_vqa(path, suffix_lines=(SHORT,)):
    """LLaVA's jsonl {"question_id", "image", "text"}; rows may carry `answers` (ten human answers)."""
    return _short(read_jsonl(path), suffix_lines)


def read_textvqa(path, annotations=None):
    """LLaVA's jsonl: text = question + "\\nReference OCR token: ..." + the short-answer line; the
    question_id is the image id, so questions are keyed by (id, question) as LLaVA's scorer does;
    gold: the ten answers of TextVQA_0.5.1_val.json with that image id and question."""
    rows = _short(read_jsonl(path), (SHORT,))
    gold = {}
    if annotations and os.path.exists(annotations):
        for a in _read_json(annotations)["data"]:
            gold[(str(a["image_id"]), a["question"].lower())] = a["answers"]
    for r in rows:
        lines = r["text"].split("\n")
        question = (lines[1] if lines[0].startswith("Reference OCR token:") else lines[0]).lower()
        r["key"] = f"{r['question_id']}|{question}"
        if gold:
            if (str(r["question_id"]), question) not in gold:
                raise KeyError(f"{path}: question {r['question_id']} {question!r} is not in {annotations}")
            r["answers"] = gold[(str(r["question_id"]), question)]
    return rows


def read_gqa(path, gold_path=None):
    rows = _short(read_jsonl(path), (SHORT,))
    if gold_path and os.path.exists(gold_path):
        gold = _read_json(gold_path)
        for r in rows:
            if str(r["question_id"]) not in gold:
                raise KeyError(f"{path}: question {r['question_id']} is not in {gold_path}")
            r["answer"] = gold[str(r["question_id"])]["answer"]
    return rows


def read_pope(path, label_dir=None):
    """llava_pope_test.jsonl; gold from the row's `label`, or else coco/coco_pope_<category>.json, whose
    lines pair with the category's questions in order (as eval_pope.py pairs them)."""
    rows = _short(read_jsonl(path), (SHORT,))
    if rows and "label" not in rows[0] and label_dir and os.path.isdir(label_dir):
        order = {}
        for r in rows:
            order.setdefault(r["category"], []).append(r)
        for cat, rs in order.items():
            labels = [x["label"] for x in read_jsonl(os.path.join(label_dir, f"coco_pope_{cat}.json"))]
            if len(labels) != len(rs):
                raise ValueError(f"{label_dir}/coco_pope_{cat}.json has {len(labels)} labels for {len(rs)} questions")
            for r, lab in zip(rs, labels):
                r["label"] = lab
    return rows


def read_sqa(path, problems_path=None):
    """llava_test_CQM-A.json: the first human turn (<image> taken out), the letter prompt appended;
    gold from problems.json: `answer` (an integer index) and `choices`."""
    problems = _read_json(problems_path) if problems_path and os.path.exists(problems_path) else {}
    rows = []
    for s in _read_json(path):
        text = s["conversations"][0]["value"].replace("<image>", "").strip()
        r = {"question_id": s["id"], "text": with_suffix(text, LETTER)}
        if s.get("image"):
            r["image"] = s["image"]
        if s["id"] in problems:
            r["answer"], r["choices"] = problems[s["id"]]["answer"], problems[s["id"]]["choices"]
        rows.append(r)
    return rows


def _none(v):
    return v is None or v.strip().lower() in ("", "nan", "none")


_NOT_SUBMITTED = ("hint", "category", "source", "image", "comment", "l2-category")  # as LLaVA's converter


def read_mmbench(path, lang="en", circular=True):
    """MMBench's tsv (base64 images). The prompt is hint + question + one "X. option" line per option
    + the letter prompt (LLaVA's model_vqa_mmbench). A question's rotated copies share
    `group` = index mod 1e6; a file without copies gets them here (every rotation of the options)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    suffix = LETTER_CN if lang == "cn" else LETTER
    has_copies = any(int(r["index"]) >= 1_000_000 for r in table)
    rows = []
    for r in table:
        options = []
        for c in "ABCD":
            if c not in r or _none(r[c]):
                break
            options.append(r[c])
        gold = r.get("answer")
        gold = None if gold is None or _none(gold) else gold.strip()
        rotations = 1 if has_copies or not circular else len(options)
        for k in range(rotations):
            opts = options[k:] + options[:k]
            q = r["question"] if _none(r.get("hint")) else r["hint"] + "\n" + r["question"]
            q += "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(opts))
            row = {"question_id": int(r["index"]) + k * 1_000_000, "group": int(r["index"]) % 1_000_000,
                   "text": q + "\n" + suffix, "image_b64": r["image"], "options": opts}
            if k == 0:  # the tsv's own row, for the submission sheet
                row["tsv"] = {c: r[c] for c in r if c not in _NOT_SUBMITTED}
            if gold is not None:  # the gold option moves with the rotation
                row["answer"] = chr(65 + ("ABCD".index(gold) - k) % len(opts))
            rows.append(row)
    return rows


def read_mmvet(path):
    """llava-mm-vet.jsonl: the question as it is (LLaVA adds no prompt for MM-Vet)."""
    return read_jsonl(path)


def image_of(q, folder):
    """A question's image as a PIL image (from its file, or decoded from the tsv's base64)."""
    import data
    if q.get("image_b64"):
        from PIL import Image
        return data.to_rgb(Image.open(io.BytesIO(base64.b64decode(q["image_b64"]))))
    return data.load_image(os.path.join(folder, q["image"]))


# ----------------------------------------------------------------------------------------------
# submission files (server / judge benchmarks)


def write_vqav2_submission(answers, questions, path):
    """VQAv2 test-dev server (EvalAI): a JSON list of {question_id, answer}, answers normalised,
    every question of the split present (unanswered ones empty)."""
    got = {a["question_id"]: a["text"] for a in answers}
    rows = [{"question_id": q["question_id"], "answer": normalize_answer(got[q["question_id"]])
             if q["question_id"] in got else ""} for q in questions]
    _dump(rows, path)


def write_vizwiz_submission(answers, questions, path):
    """VizWiz test server (EvalAI): a JSON list of {image, answer}, answers normalised."""
    got = {a["question_id"]: a["text"] for a in answers}
    _dump([{"image": q["image"], "answer": normalize_answer(got[q["question_id"]])} for q in questions], path)


def write_mmvet_submission(answers, questions, path):
    """MM-Vet's GPT-4 judge: a JSON object {"v1_<question_id>": answer}."""
    _dump({f"v1_{a['question_id']}": a["text"] for a in answers}, path)


def write_gqa_predictions(answers, questions, path):
    """GQA's own eval.py: [{questionId, prediction}] (trailing periods off, lower case)."""
    _dump([{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers], path)


def write_mmbench_submission(answers, questions, path):
    """MMBench server: an .xlsx sheet with the tsv's rows (hint, category, source, image, comment and
    l2-category left out, as LLaVA's converter does) and a `prediction` column after the options.
    The server runs the circular evaluation itself."""
    got = {a["question_id"]: a["text"] for a in answers}
    tsv = [q for q in questions if "tsv" in q]
    cols = list(tsv[0]["tsv"]) if tsv else ["index", "question", "A", "B", "C", "D"]
    at = cols.index("D") + 1 if "D" in cols else len(cols)
    head = cols[:at] + ["prediction"] + cols[at:]
    rows = [head] + [[q["tsv"].get(c, "") if c != "prediction" else got.get(q["question_id"], "") for c in head]
                     for q in tsv]
    write_xlsx(rows, path)


def write_xlsx(rows, path):
    """A one-sheet .xlsx of strings (inline cells), without a spreadsheet library."""
    def col(i):
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        return s
    cells = "".join(
        f'<row r="{n + 1}">' + "".join(
            f'<c r="{col(c)}{n + 1}" t="inlineStr"><is><t xml:space="preserve">{escape(str(v))}</t></is></c>'
            for c, v in enumerate(row)) + "</row>" for n, row in enumerate(rows))
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006"
    files = {
        "[Content_Types].xml":
            f'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="{pkg}/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels":
            f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml":
            f'<?xml version="1.0" encoding="UTF-8"?><workbook {ns} xmlns:r="{rel}"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels":
            f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml":
            f'<?xml version="1.0" encoding="UTF-8"?><worksheet {ns}><sheetData>{cells}</sheetData></worksheet>',
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)


def _dump(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# the benchmarks: where LLaVA-1.5's eval data puts each file (relative to playground/data/eval)


BENCHMARKS = {
    # name: (Table 1 column, question file, image folder, reader, scorer, headline, submission)
    "vqav2": ("VQAv2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015",
              lambda p, d: read_vqa(p), score_vqa, "accuracy", ("vqav2_test-dev_submission.json",
                                                                write_vqav2_submission)),
    "gqa": ("GQA", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images",
            lambda p, d: read_gqa(p, os.path.join(d, "gqa/data/testdev_balanced_questions.json")), score_gqa,
            "accuracy", ("testdev_balanced_predictions.json", write_gqa_predictions)),
    "vizwiz": ("VizWiz", "vizwiz/llava_test.jsonl", "vizwiz/test",
               lambda p, d: read_vqa(p, (UNANSWERABLE, SHORT)), score_vqa, "accuracy",
               ("vizwiz_test_submission.json", write_vizwiz_submission)),
    "sqa": ("SQA-I", "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test",
            lambda p, d: read_sqa(p, os.path.join(d, "scienceqa/problems.json")), score_sqa, "img_accuracy", None),
    "textvqa": ("TextVQA", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
                lambda p, d: read_textvqa(p, os.path.join(d, "textvqa/TextVQA_0.5.1_val.json")), score_vqa,
                "accuracy", None),
    "pope": ("POPE", "pope/llava_pope_test.jsonl", "pope/val2014",
             lambda p, d: read_pope(p, os.path.join(d, "pope/coco")), score_pope, "mean_f1", None),
    "mmbench": ("MMB", "mmbench/mmbench_dev_20230712.tsv", None, lambda p, d: read_mmbench(p, "en"),
                score_mmbench, "accuracy", ("mmbench_submission.xlsx", write_mmbench_submission)),
    "mmbench_cn": ("MMB-CN", "mmbench_cn/mmbench_dev_cn_20231003.tsv", None, lambda p, d: read_mmbench(p, "cn"),
                   score_mmbench, "accuracy", ("mmbench_cn_submission.xlsx", write_mmbench_submission)),
    "mmvet": ("MM-Vet", "mm-vet/llava-mm-vet.jsonl", "mm-vet/images", lambda p, d: read_mmvet(p), None, None,
              ("mmvet_results.json", write_mmvet_submission)),
}
TABLE1 = [v[0] for v in BENCHMARKS.values()]


def has_gold(name, questions):
    """Whether the questions carry what the benchmark's scorer needs (test splits and MM-Vet do not)."""
    need = {"vqav2": "answers", "vizwiz": "answers", "textvqa": "answers", "gqa": "answer", "sqa": "answer",
            "pope": "label", "mmbench": "answer", "mmbench_cn": "answer"}.get(name)
    return bool(questions) and need is not None and all(need in q for q in questions)


def table1_row(results):
    """results: {benchmark: headline (0-1) or None} -> the header and one row of Table 1, in percent."""
    cells = []
    for name, spec in BENCHMARKS.items():
        v = results.get(name)
        cells.append("-" if v is None else f"{100 * v:.1f}")
    widths = [max(len(h), len(c)) for h, c in zip(TABLE1, cells)]
    return (" | ".join(h.rjust(w) for h, w in zip(TABLE1, widths)),
            " | ".join(c.rjust(w) for c, w in zip(cells, widths)))
