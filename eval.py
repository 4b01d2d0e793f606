"""
Answer LLaVA-style question files with batched greedy decoding, and score the answers as the official
scorers do (the rules: scorers.py; the benchmarks' files and prompts: benchmarks.py). One command per
benchmark of the paper's Table 1, on LLaVA-1.5's eval data:

    python eval.py --ckpt DIR --benchmark textvqa --data playground/data/eval --out out/eval/mymodel

(benchmarks: vqav2 gqa vizwiz sqa textvqa pope mmbench mmbench_cn mmvet; data layout: docs/eval.md).
Answers, scores and submission files go to OUT/<benchmark>/; every run prints the row of Table 1 from
the scores cached in OUT (`python eval.py --summary OUT` prints it alone). Any question file works too:

    python eval.py --ckpt DIR --questions q.jsonl --image-folder IMAGES --answers a.jsonl --metric pope

Question files are jsonl: {"question_id", "image", "text", and "answer"/"answers" or "label"}.
Answers are written one line per question as soon as a batch is done, so an interrupted run
continues where it stopped (questions already in the answer file are not asked again). Decoding is
greedy with up to 128 new tokens (1024 for ScienceQA, MMBench and MM-Vet, as LLaVA's scripts), and a
batch answers exactly as one question at a time. A checkpoint trained with pseudo image features
answers from X_p by itself; --pseudo-image-features switches any model to X_p (Eq. 8).
"""

import argparse
import json
import os
import sys

import torch

import benchmarks
import data
import inference
from scorers import (_key, normalize_answer, pope_yes, score_gqa, score_mmbench, score_pope,  # noqa: F401
                     score_sqa, score_vqa)
from inference import InputError, add_args, check_prompt_length, load_model, prompt_ids, stop_ids  # noqa: F401


def read_jsonl(path, allow_torn_tail=False):
    """Rows of a jsonl file. allow_torn_tail: a last line without its newline that does not parse
    (a run killed mid-write) is dropped instead of raising."""
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
    return rows


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
    steps = list(model.generate_stream(ids.to(device), images, attention_mask=mask.to(device),
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
                progress=True, failed=None, dist=None):
    """Answer every question not yet in `answers_path`, appending as it goes. Returns the answers, in
    question order. A question whose image cannot be read is reported (question id and file), left
    unanswered and appended to `failed` as (question_id, file, reason); the rest of its batch is answered.

    dist: a Dist (several processes, eval.py under torchrun). Each process reads what is answered so far
    (the answer file and every process's part file: a run stopped with another process count resumes
    too), takes every world-th question still to answer, and appends to its own part file; then the
    first process merges the parts into the answer file, in question order after the rows it already
    held, as one process would have written it, and every process returns all the answers. `failed`
    gets every process's failures."""
    check_unique(questions)
    key = _key
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
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
                    try:
                        img = benchmarks.image_of(q, image_folder)
                    except Exception as e:  # missing, truncated, not an image, too large
                        where = q.get("image") or "its base64 image"
                        mine_failed.append((q["question_id"], where, f"{type(e).__name__}: {e}"))
                        print(f"question {q['question_id']}: cannot read image {where} "
                              f"({type(e).__name__}: {e}); not answered", file=sys.stderr)
                        continue
                    images.append(data.process_image(img, size))
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
            _merge_parts(answers_path, questions)
        dist.barrier()
        done = {key(row): row for row in read_jsonl(answers_path)}
    elif _part_files(answers_path):  # a multi-process run stopped before its merge: fold its parts in now
        _merge_parts(answers_path, questions)
    failed.extend(mine_failed)
    if failed and rank == 0:
        print(f"{len(failed)} question(s) not answered: an image that could not be read or a prompt over the "
              f"context length", file=sys.stderr)
    return [done[key(q)] for q in questions if key(q) in done]


def _merge_parts(answers_path, questions):
    """The answer file's own rows as they are, then the part files' rows in question order (what one
    process answering the rest in order appends), written to a temporary file and moved into place;
    then the part files go."""
    key = _key
    own = read_jsonl(answers_path, allow_torn_tail=True) if os.path.exists(answers_path) else []
    have = {key(r) for r in own}
    new = {}
    parts = _part_files(answers_path)
    for path in parts:
        for row in read_jsonl(path, allow_torn_tail=True):
            if key(row) not in have:
                new[key(row)] = row
    rows = own + [new[key(q)] for q in questions if key(q) in new]
    rows += [r for k, r in new.items() if k not in {key(q) for q in questions}]  # answers of other question sets
    tmp = answers_path + ".merging"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, answers_path)
    for path in parts:
        os.remove(path)


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
# scoring: the official rules live in scorers.py


# "mc" is the old name of the ScienceQA rule, kept for existing commands
METRICS = {"pope": score_pope, "vqa": score_vqa, "gqa": score_gqa, "sqa": score_sqa, "mc": score_sqa,
           "mmbench": score_mmbench}


def run_benchmark(model, tok, name, data_dir, out_dir, questions=None, image_folder=None, batch_size=16,
                  max_new_tokens=None, limit=0, progress=True, dist=None):
    """Answer and score one benchmark; writes OUT/<name>/answers.jsonl, result.json and, for server or
    judge benchmarks, the submission file. Returns the result dict. With `dist` (several processes)
    each answers its share and the first one scores and writes the files; the others return None."""
    column, qfile, ifolder, reader, scorer, headline, submission = benchmarks.BENCHMARKS[name]
    qpath = questions or os.path.join(data_dir, qfile)
    if not os.path.exists(qpath):
        raise InputError(f"{name}: no question file {qpath} (data layout: docs/eval.md)")
    qs = reader(qpath, data_dir)
    check_unique(qs, qpath)
    qs = qs[: limit or None]
    folder = image_folder or (os.path.join(data_dir, ifolder) if ifolder else "")
    bdir = os.path.join(out_dir, name)
    failed = []
    long = name in ("sqa", "mmbench", "mmbench_cn", "mmvet")  # LLaVA's model_vqa(_science/_mmbench): 1024
    ans = answer_file(model, tok, qs, folder, os.path.join(bdir, "answers.jsonl"), batch_size,
                      max_new_tokens or (1024 if long else 128), progress, failed, dist)
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
    except InputError as e:  # one line, no traceback
        sys.exit(f"eval.py: {e}")
    finally:
        if dist:
            dist.close()


def _run(a, dist):
    device = dist.device(a.device) if dist else a.device
    model, tok = load_model(a.ckpt, a.tokenizer, device, a.dtype, a.pseudo_image_features, a.template, a.compile)
    if a.benchmark:
        out = a.out or os.path.join(a.ckpt, "eval")
        r = run_benchmark(model, tok, a.benchmark, a.data, out, a.questions, a.image_folder or None, a.batch_size,
                          a.max_new_tokens, a.limit, dist=dist)
        if r is None:  # not the first process: it scores
            return None
        if "scores" in r:
            print(json.dumps(r["scores"], indent=2))
        print(summary(out))
        return r
    qs = read_jsonl(a.questions)[: a.limit or None]
    folder = a.image_folder or os.path.dirname(os.path.abspath(a.questions))
    ans = answer_file(model, tok, qs, folder, a.answers, a.batch_size, a.max_new_tokens or 128, dist=dist)
    if dist and dist.rank != 0:
        return None
    if a.metric:
        scores = METRICS[a.metric](ans, qs)
        print(json.dumps(scores, indent=2))
        return scores


if __name__ == "__main__":
    main(sys.argv[1:])
