"""
Answer LLaVA-style question files with batched greedy decoding, and score the answers as the official
scorers do (the rules: eval_scorers.py; the benchmarks' files and prompts: eval_benchmarks.py). One command per
benchmark of the paper's Table 1, on LLaVA-1.5's eval data:

    python eval.py --ckpt DIR --benchmark textvqa --data playground/data/eval --out out/eval/mymodel

(benchmarks: vqav2 gqa vizwiz sqa textvqa pope mmbench mmbench_cn mmvet; data layout: docs/eval.md).
Answers, scores and submission files go to OUT/<benchmark>/; every run prints the row of Table 1 from
the scores cached in OUT (`python eval.py --summary OUT` prints it alone). Any question file works too:

    python eval.py --ckpt DIR --questions q.jsonl --image-folder IMAGES --answers a.jsonl --metric pope

Question files are jsonl: {"question_id", "image", "text", and "answer"/"answers" or "label"}.
Answers are written one line per question as soon as a batch is done, so an interrupted run
continues where it stopped (questions already in the answer file are not asked again). The answer
file's first line records which run wrote it (checkpoint and weights fingerprint, questions, generation
settings); a run with anything different refuses to reuse it unless --overwrite. Decoding is
greedy with up to 128 new tokens (1024 for ScienceQA, MMBench and MM-Vet, as LLaVA's scripts), and a
batch answers exactly as one question at a time. A checkpoint trained with pseudo image features
answers from X_p by itself; --pseudo-image-features switches any model to X_p (Eq. 8).
"""

import argparse
import json
import os
import sys

import torch

import eval_benchmarks as benchmarks
import data
import errors
import inference
from eval_scorers import (_key, normalize_answer, pope_yes, score_gqa, score_mmbench, score_pope,  # noqa: F401
                     score_sqa, score_vqa)
from inference import InputError, add_args, check_prompt_length, load_model, prompt_ids, stop_ids  # noqa: F401


HEADER = "nanovt_eval"  # the key of an answer file's first line: which run wrote the file (provenance)


def is_header(row):
    return isinstance(row, dict) and list(row) == [HEADER]


def read_jsonl(path, allow_torn_tail=False, header=False):
    """Rows of a jsonl file. allow_torn_tail: a last line without its newline that does not parse
    (a run killed mid-write) is dropped instead of raising. An answer file's provenance line is left
    out; with header=True the result is (that line's record or None, rows)."""
    rows = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {inference.why(e)}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if allow_torn_tail and n == len(lines) and not line.endswith("\n"):
                    break
                raise InputError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    head = rows.pop(0)[HEADER] if rows and is_header(rows[0]) else None
    return (head, rows) if header else rows


def check_questions(questions, where):
    """Every question is an object with a question_id and a text (the prompt): an InputError naming the
    file and the question's place otherwise, before any model work."""
    for n, q in enumerate(questions, 1):
        if not isinstance(q, dict):
            raise InputError(f"{where}: question {n} is a JSON {type(q).__name__}, not an object")
        for field, kind in (("question_id", (int, str)), ("text", str)):
            if field not in q:
                raise InputError(f"{where}: question {n} has no {field!r}")
            if not isinstance(q[field], kind) or isinstance(q[field], bool):
                raise InputError(f"{where}: question {n}: {field!r} is a {type(q[field]).__name__}")
        if not isinstance(q.get("image") or "", str):
            raise InputError(f"{where}: question {n}: 'image' is a {type(q['image']).__name__}, not a path")


def provenance(ckpt, model, questions, question_file, max_new_tokens, tokenizer=None):
    """What an answer file records of the run that wrote it: the checkpoint (path, and the fingerprint
    that decides), the questions (file, count, sha256 of the questions as asked) and the settings that
    change an answer. Not the batch size, the process count, the device or compile: answers do not
    depend on them (tests/test_eval.py)."""
    import hashlib
    qhash = hashlib.sha256(json.dumps(questions, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    weights = model.mm_head.weight
    return {"checkpoint": os.path.abspath(ckpt), "weights": inference.weights_fingerprint(ckpt),
            "questions": {"file": os.path.abspath(question_file), "n": len(questions), "sha256": qhash},
            "settings": {"max_new_tokens": max_new_tokens, "dtype": str(weights.dtype).replace("torch.", ""),
                         "template": model.cfg.template, "pseudo_image_features": model.cfg.pseudo_image_features,
                         "tokenizer": data.file_hash(tokenizer) if tokenizer and os.path.isfile(tokenizer) else None,
                         "decoding": "greedy"}}


def provenance_diff(then, now):
    """What differs between two provenance records, in words ([] when the same run could have written both)."""
    out = []
    if then.get("weights") != now["weights"]:
        out.append(f"weights {then.get('checkpoint')} ({str(then.get('weights'))[:12]}) then, {now['checkpoint']} "
                   f"({now['weights'][:12]}) now")
    tq, nq = then.get("questions") or {}, now["questions"]
    if (tq.get("sha256"), tq.get("n")) != (nq["sha256"], nq["n"]):
        out.append(f"questions {tq.get('file')} ({tq.get('n')} questions, {str(tq.get('sha256'))[:12]}) then, "
                   f"{nq['file']} ({nq['n']} questions, {nq['sha256'][:12]}) now")
    ts = then.get("settings") or {}
    out += [f"{k} {ts.get(k)!r} then, {v!r} now" for k, v in now["settings"].items() if ts.get(k) != v]
    return out


# ----------------------------------------------------------------------------------------------
# answering


@torch.no_grad()
def answer_batch(model, tok, prompts, images, max_new_tokens=128):
    """prompts: lists of ids; images: (N, 3, H, W) for the prompts holding an image, in order.
    Left-pads, decodes greedily with the KV cache, returns the answer strings."""
    device = model.mm_head.weight.device
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = True
    if images is not None:
        images = images.to(device, model.mm_head.weight.dtype)
    steps = list(inference.generate_stream(model, ids.to(device), images, attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, stop_ids=stop_ids(tok)))
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


def check_unique(questions, where="the question file"):
    """Answers are matched to questions by id: a repeated id would score one question twice."""
    dup = benchmarks.duplicates(questions)
    if dup:
        raise ValueError(f"{where}: {len(dup)} question_id(s) occur more than once, e.g. {dup[:10]}; "
                         f"give every question its own id")


def part_path(answers_path, rank):
    """Where process `rank` of a multi-process run appends its answers until the first process merges them."""
    return f"{answers_path}.part{rank}"


def _part_files(answers_path):
    folder, base = os.path.split(os.path.abspath(answers_path))
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith(base + ".part") and f[len(base) + 5:].isdigit())


def answer_file(model, tok, questions, image_folder, answers_path, batch_size=16, max_new_tokens=128,
                progress=True, failed=None, dist=None, record=None, overwrite=False, allow_outside=True):
    """Answer every question not yet in `answers_path`, appending as it goes. Returns the answers, in
    question order. A question whose image cannot be read, or that the image gate refuses
    (data.open_image), is reported (question id and file), left unanswered (its answer stays empty in
    the submission files) and appended to `failed` as (question_id, file, reason); the rest of its batch is
    answered. allow_outside=False keeps image paths inside image_folder (data.image_path); eval.py's
    question files are the evaluator's own, and may name images anywhere, absolute paths included.

    record: this run's provenance(); the answer file (and each part file) starts with it, and a file
    that another run wrote (provenance_diff) is refused with an InputError saying what differs, unless
    `overwrite`, which starts over. A file without the line (an older eval.py, or by hand) is taken as
    this run's, with a note.

    dist: a Dist (several processes, eval.py under torchrun). Each process reads what is answered so far
    (the answer file and every process's part file: a run stopped with another process count resumes
    too), takes every world-th question still to answer, and appends to its own part file; then the
    first process merges the parts into the answer file, in question order after the rows it already
    held, as one process would have written it, and every process returns all the answers. `failed`
    gets every process's failures."""
    check_unique(questions)
    key = _key
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    files = [p for p in [answers_path] + _part_files(answers_path) if os.path.exists(p)]
    if record is not None and files:
        _check_record(files, record, overwrite, rank)
        if overwrite:
            if dist:
                dist.barrier()  # everyone has looked before the files go
            if rank == 0:
                for path in files:
                    os.remove(path)
                print(f"--overwrite: removed the answers in {', '.join(files)}", file=sys.stderr)
    done = {}
    for path in [answers_path] + _part_files(answers_path):
        if os.path.exists(path):
            for row in read_jsonl(path, allow_torn_tail=True):
                done[key(row)] = row
    todo = [q for q in questions if key(q) not in done]
    if dist:
        dist.barrier()  # everyone has read the files before anyone writes to them
    mine = todo[rank::world]
    out_path = part_path(answers_path, rank) if dist else answers_path
    if os.path.exists(out_path):
        _drop_torn_tail(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    if record is not None:
        _start_with_record(out_path, record)
    size = model.cfg.vision.image_size
    failed = [] if failed is None else failed
    mine_failed = []
    from tqdm import tqdm
    bar = tqdm(total=len(questions) if not dist else len(mine), initial=len(questions) - len(todo) if not dist else 0,
               desc="answering" if not dist else f"answering (process {rank} of {world})",
               disable=None if progress and rank == 0 else True, dynamic_ncols=True)  # None: off when not a terminal
    with open(out_path, "a") as f:
        for i in range(0, len(mine), batch_size):
            chunk, prompts, images = [], [], []
            for q in mine[i:i + batch_size]:
                has_image = bool(q.get("image") or q.get("image_b64"))
                if has_image:
                    try:  # the gate (data.open_image) bounds what decoding and padding allocate
                        images.append(data.process_image(benchmarks.image_of(q, image_folder, allow_outside), size))
                    except Exception as e:  # missing, a FIFO, truncated, not an image, too large, outside
                        where = q.get("image") or "its base64 image"
                        reason = (inference.why(e) if isinstance(e, (InputError, OSError))
                                  else f"{type(e).__name__}: {e}")
                        mine_failed.append((q["question_id"], where, reason))
                        print(f"question {q['question_id']}: cannot read image {where} ({reason}); not answered, "
                              f"its answer left empty", file=sys.stderr)
                        continue
                ids = prompt_ids(model, tok, q["text"], has_image)
                try:
                    check_prompt_length(model, ids, "its prompt")
                except InputError as e:
                    mine_failed.append((q["question_id"], "its prompt", str(e)))
                    print(f"question {q['question_id']}: {e}; not answered", file=sys.stderr)
                    if has_image:
                        images.pop()
                    continue
                chunk.append(q)
                prompts.append(ids)
            if chunk:
                texts = answer_batch(model, tok, prompts, torch.stack(images) if images else None, max_new_tokens)
                for q, a in zip(chunk, texts):
                    row = {"question_id": q["question_id"], "prompt": q["text"], "text": a}
                    if "key" in q:
                        row["key"] = q["key"]
                    done[key(q)] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
            bar.update(len(mine[i:i + batch_size]))
    bar.close()
    if dist:
        dist.barrier()  # every part file is complete
        mine_failed = [tuple(x) for part in dist.all_gather(mine_failed) for x in part]
        if rank == 0:
            _merge_parts(answers_path, questions, record)
        dist.barrier()
        done = {key(row): row for row in read_jsonl(answers_path)}
    elif _part_files(answers_path):  # a multi-process run stopped before its merge: fold its parts in now
        _merge_parts(answers_path, questions, record)
    failed.extend(mine_failed)
    if failed and rank == 0:
        print(f"{len(failed)} question(s) not answered: an image that could not be read or a prompt over the "
              f"context length", file=sys.stderr)
    return [done[key(q)] for q in questions if key(q) in done]


def _merge_parts(answers_path, questions, record=None):
    """The answer file's rows and the part files' rows (the answer file's win a tie), in question order,
    as one uninterrupted process writes them, whatever the process counts of the runs that wrote them;
    rows of other question sets after them. Written to a temporary file and moved into place, its
    provenance line first; then the part files go."""
    key = _key
    head, own = read_jsonl(answers_path, allow_torn_tail=True, header=True) if os.path.exists(answers_path) \
        else (None, [])
    rows = {key(r): r for r in own}
    parts = _part_files(answers_path)
    for path in parts:
        for row in read_jsonl(path, allow_torn_tail=True):
            rows.setdefault(key(row), row)
    asked = {key(q) for q in questions}
    merged = [rows[key(q)] for q in questions if key(q) in rows] + [r for k, r in rows.items() if k not in asked]
    head = record if record is not None else head
    tmp = answers_path + ".merging"
    with open(tmp, "w") as f:
        if head is not None:
            f.write(json.dumps({HEADER: head}, ensure_ascii=False) + "\n")
        for row in merged:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, answers_path)
    for path in parts:
        os.remove(path)


def _check_record(files, record, overwrite, rank):
    """Refuse answer files another run wrote (an InputError saying what differs), unless overwrite."""
    for path in files:
        head, _ = read_jsonl(path, allow_torn_tail=True, header=True)
        if head is None:
            if rank == 0 and not overwrite:
                print(f"note: {path} does not say which run wrote it (an older eval.py, or by hand); its answers "
                      f"are taken as this run's", file=sys.stderr)
            continue
        diff = provenance_diff(head, record)
        if diff and not overwrite:
            raise InputError(f"{path} holds answers of another run: {'; '.join(diff)}. Pass --overwrite to answer "
                             f"again, or choose another answer file")


def _start_with_record(path, record):
    """Make `path` start with this run's provenance line: a new file gets it, a file without one gets it
    put in front (rewritten whole, then moved into place)."""
    line = json.dumps({HEADER: record}, ensure_ascii=False) + "\n"
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w") as f:
            f.write(line)
        return
    with open(path) as f:
        first = f.readline()
        try:
            if is_header(json.loads(first)):
                return
        except json.JSONDecodeError:
            pass
        rest = first + f.read()
    with open(path + ".merging", "w") as f:
        f.write(line + rest)
    os.replace(path + ".merging", path)


class Dist:
    """The processes of `torchrun --nproc_per_node=N eval.py ...`: rank, world size, and a gloo group
    for the barriers and for gathering the failures (gloo works beside any device). Long timeout: a
    process waits at the merge for the slowest share."""

    def __init__(self):
        import datetime
        import torch.distributed as td
        self.td = td
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        if not td.is_initialized():
            td.init_process_group("gloo", timeout=datetime.timedelta(hours=48))

    @classmethod
    def from_env(cls):
        """A Dist under torchrun with more than one process, else None."""
        return cls() if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None

    def barrier(self):
        self.td.barrier()

    def all_gather(self, obj):
        out = [None] * self.world
        self.td.all_gather_object(out, obj)
        return out

    def device(self, device):
        """Each process its own GPU: auto / cuda become cuda:LOCAL_RANK."""
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if device == "auto" else device

    def close(self):
        self.td.destroy_process_group()


def _drop_torn_tail(path):
    """Cut a file back to its last newline, so appended rows never glue onto a half-written one."""
    with open(path, "rb+") as f:
        raw = f.read()
        if raw and not raw.endswith(b"\n"):
            f.truncate(raw.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------------------------
# scoring: the official rules live in eval_scorers.py


# "mc" is the old name of the ScienceQA rule, kept for existing commands
METRICS = {"pope": score_pope, "vqa": score_vqa, "gqa": score_gqa, "sqa": score_sqa, "mc": score_sqa,
           "mmbench": score_mmbench}


def run_benchmark(model, tok, name, data_dir, out_dir, questions=None, image_folder=None, batch_size=16,
                  max_new_tokens=None, limit=0, progress=True, dist=None, ckpt=None, overwrite=False,
                  tokenizer=None):
    """Answer and score one benchmark; writes OUT/<name>/answers.jsonl, result.json and, for server or
    judge benchmarks, the submission file. Returns the result dict. With `dist` (several processes)
    each answers its share and the first one scores and writes the files; the others return None.
    With `ckpt` (the model's directory) the answer file records its provenance (answer_file)."""
    column, qfile, ifolder, reader, scorer, headline, submission = benchmarks.BENCHMARKS[name]
    qpath = questions or os.path.join(data_dir, qfile)
    if not os.path.exists(qpath):
        raise InputError(f"{name}: no question file {qpath} (data layout: docs/eval.md)")
    try:
        qs = reader(qpath, data_dir)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a file of another shape
        raise InputError(f"{name}: cannot read questions from {qpath}: {type(e).__name__}: {e}") from None
    check_questions(qs, qpath)
    check_unique(qs, qpath)
    qs = qs[: limit or None]
    folder = image_folder or (os.path.join(data_dir, ifolder) if ifolder else "")
    bdir = os.path.join(out_dir, name)
    failed = []
    long = name in ("sqa", "mmbench", "mmbench_cn", "mmvet")  # LLaVA's model_vqa(_science/_mmbench): 1024
    new_tokens = max_new_tokens or (1024 if long else 128)
    record = provenance(ckpt, model, qs, qpath, new_tokens, tokenizer) if ckpt else None
    ans = answer_file(model, tok, qs, folder, os.path.join(bdir, "answers.jsonl"), batch_size,
                      new_tokens, progress, failed, dist, record, overwrite)
    if dist and dist.rank != 0:
        return None
    result = {"benchmark": name, "column": column, "questions": qpath, "n_questions": len(qs),
              "unanswered": [{"question_id": i, "image": f, "error": e} for i, f, e in failed]}
    if scorer is not None and benchmarks.has_gold(name, qs):
        result["scores"] = scorer(ans, qs)
        result["headline"] = result["scores"][headline]
    if submission is not None:
        fname, write = submission
        write(ans, qs, os.path.join(bdir, fname))
        result["submission"] = os.path.join(bdir, fname)
        print(f"{name}: wrote {result['submission']} ({SUBMIT[name]})")
    with open(os.path.join(bdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    return result


SUBMIT = {"vqav2": "upload to the VQAv2 test-dev server on EvalAI",
          "vizwiz": "upload to the VizWiz VQA test server on EvalAI",
          "gqa": "GQA's own eval.py reads it too: python eval.py --tier testdev_balanced",
          "mmbench": "upload to the MMBench server (test split) or read locally: dev is scored here",
          "mmbench_cn": "upload to the MMBench server (test split) or read locally: dev is scored here",
          "mmvet": "MM-Vet's GPT-4 judge scores it: upload to its evaluator"}


def summary(out_dir):
    """The row of Table 1 from the result.json files cached under out_dir ('-' where none)."""
    results = {}
    for name in benchmarks.BENCHMARKS:
        path = os.path.join(out_dir, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f).get("headline")
    head, row = benchmarks.table1_row(results)
    return head + "\n" + row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="nanoVT checkpoint or llava-hf directory")
    p.add_argument("--benchmark", choices=list(benchmarks.BENCHMARKS), help="one of the paper's benchmarks")
    p.add_argument("--data", default="playground/data/eval", help="LLaVA-1.5's eval data folder (docs/eval.md)")
    p.add_argument("--out", default=None, help="results folder (default: CKPT/eval); one subfolder per benchmark")
    p.add_argument("--summary", metavar="OUT", help="only print the Table 1 row cached in OUT")
    p.add_argument("--questions", default=None, help="question jsonl (with --benchmark: replaces its default)")
    p.add_argument("--image-folder", default="", help="images are relative to this (default: the file's folder)")
    p.add_argument("--answers", default=None, help="answer jsonl (appended to; resumable)")
    p.add_argument("--metric", choices=sorted(METRICS), help="score the answers with this metric")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: in --ckpt)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (1024 for sqa, mmbench, mmvet)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--pseudo-image-features", action="store_true", help="answer from X_p (Eq. 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="answer every question again, replacing an answer file another run (or this one) wrote")
    add_args(p)
    a = p.parse_args(argv)
    if a.summary:
        print(summary(a.summary))
        return
    if not a.ckpt or not (a.benchmark or (a.questions and a.answers)):
        p.error("give --ckpt and either --benchmark or --questions with --answers")
    dist = Dist.from_env()  # torchrun --nproc_per_node=N: each process its share of the questions
    try:
        return _run(a, dist)
    except (InputError, OSError) as e:  # one line, no traceback (errors.one_line; other OSErrors keep theirs)
        line = errors.one_line(e)
        if line is None:
            raise
        sys.exit(f"eval.py: {line}")
    finally:
        if dist:
            dist.close()


def _run(a, dist):
    device = dist.device(a.device) if dist else a.device
    model, tok = load_model(a.ckpt, a.tokenizer, device, a.dtype, a.pseudo_image_features, a.template, a.compile)
    if a.benchmark:
        out = a.out or os.path.join(a.ckpt, "eval")
        r = run_benchmark(model, tok, a.benchmark, a.data, out, a.questions, a.image_folder or None, a.batch_size,
                          a.max_new_tokens, a.limit, dist=dist, ckpt=a.ckpt, overwrite=a.overwrite,
                          tokenizer=a.tokenizer)
        if r is None:  # not the first process: it scores
            return None
        if "scores" in r:
            print(json.dumps(r["scores"], indent=2))
        print(summary(out))
        return r
    qs = read_jsonl(a.questions)
    check_questions(qs, a.questions)
    qs = qs[: a.limit or None]
    folder = a.image_folder or os.path.dirname(os.path.abspath(a.questions))
    record = provenance(a.ckpt, model, qs, a.questions, a.max_new_tokens or 128, a.tokenizer)
    ans = answer_file(model, tok, qs, folder, a.answers, a.batch_size, a.max_new_tokens or 128, dist=dist,
                      record=record, overwrite=a.overwrite)
    if dist and dist.rank != 0:
        return None
    if a.metric:
        scores = METRICS[a.metric](ans, qs)
        print(json.dumps(scores, indent=2))
        return scores


if __name__ == "__main__":
    main(sys.argv[1:])
