"""
The paper's benchmarks (Tables 1, 4, 5) as LLaVA-1.5 evaluates them: question readers, prompts, where
each file lies, and the submission files of the benchmarks scored by a server or a GPT judge; the
scoring rules are in eval_scorers.py. eval.py answers. The data layout is LLaVA-1.5's playground/data/eval
(docs/eval.md).

Every reader returns question dicts {"question_id", "text" (the full user prompt, without <image>),
"image" (a file relative to the image folder) or "image_b64" or nothing, and gold fields}; a "key"
field is added where question_ids repeat by design (TextVQA: one id per image).
"""

import base64
import csv
import json
import os
import sys
import zipfile
from xml.sax.saxutils import escape

from eval_scorers import (_key, normalize_answer, score_gqa, score_mmbench, score_pope,  # noqa: F401 (re-exported)
                     score_sqa, score_vqa)

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
# readers


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


def image_of(q, folder, allow_outside=True):
    """A question's image as a PIL image, through the image gate (data.open_image) either way: from its
    file (relative to `folder`; kept inside it with allow_outside=False: data.image_path) or decoded from
    the tsv's base64."""
    import data
    if q.get("image_b64"):
        return data.open_image(base64.b64decode(q["image_b64"]))
    return data.open_image(data.image_path(folder, q["image"], allow_outside))


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
