"""eval.py: the metrics on hand-made answer sets (numbers computed by hand), resumable answering, bad input,
batch-invariant greedy answers, and one benchmark end to end on files laid out as LLaVA-1.5's eval data."""

import json
import os

import pytest

import eval as evaluate
from tiny_ckpt import make_checkpoint, make_world


def qa(golds, texts, key="answer", **extra):
    qs = [{"question_id": k, "text": "q", key: g, **{n: v[k] for n, v in extra.items()}} for k, g in enumerate(golds)]
    return [{"question_id": k, "text": t} for k, t in enumerate(texts)], qs


def test_pope_by_hand():
    answers, qs = qa(
        ["yes", "yes", "yes", "no", "no", "no", "yes", "no", "no", "yes"],
        ["Yes, there is a red circle.",  # TP
         "No.",                          # FN
         "yes",                          # TP
         "No, there is not.",            # TN
         "There is not a cat.",          # TN ('not')
         "Yes",                          # FP
         "Yes. No.",                     # TP (only the first sentence counts)
         "Nope, I don't see one",        # FP (no No / not / no word)
         "NO",                           # FP (LLaVA's rule is case-sensitive)
         "There is no doubt. Yes."],     # FN
        key="label", category=["random"] * 5 + ["adversarial"] * 5)
    r = evaluate.score_pope(answers, qs)
    assert r["mean_f1"] == pytest.approx((0.8 + 1 / 3) / 2)  # Table 1's POPE figure: the categories' mean F1
    # TP 3, FN 2, TN 2, FP 3
    assert r["n"] == 10 and r["accuracy"] == 0.5 and r["precision"] == 0.5 and r["recall"] == 0.6
    assert r["f1"] == pytest.approx(0.6 / 1.1) and r["yes_ratio"] == 0.6
    rand, adv = r["categories"]["random"], r["categories"]["adversarial"]  # TP 2 FN 1 TN 2 | TP 1 FP 3 FN 1
    assert (rand["accuracy"], rand["precision"], rand["recall"], rand["yes_ratio"]) == (0.8, 1.0, pytest.approx(2 / 3), 0.4)
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.2, 0.25, 0.5, 0.8)
    assert adv["f1"] == pytest.approx(1 / 3)


def test_vqa_metric_is_vqa_accuracy():
    # a gold string counts as ten annotators agreeing; a list is the ten human answers (VQA accuracy)
    answers, qs = qa(["2", "black and white", "red", "circle", ["red"] * 2 + ["blue"] * 8],
                     ["Two.", "Black-and-white", "The red.", "circles", "red"])
    r = evaluate.score_vqa(answers, qs)
    assert r == {"accuracy": pytest.approx((1 + 1 + 1 + 0 + 0.6) / 5), "n": 5}  # 2 of 10 humans: 0.6


def test_multiple_choice_is_llava_scienceqa_rule():
    # gold: ScienceQA's integer index (a letter is read as its index); parsed as LLaVA's scorer does
    answers, qs = qa([1, 2, 0, 3, 0, 1, 1, 4, "C"],
                     ["B", "C. Paris", "(A)", "The answer is D.", "A cat sat", "b",
                      "The answer is A. The answer is B.", "E", "C"],
                     choices=[None] * 7 + [["w", "x", "y", "z"], None])
    r = evaluate.score_sqa(answers, qs)
    assert r["accuracy"] == 4 / 9 and r["n"] == 9  # "(A)" fails; "E" is not one of 4 choices


def test_duplicate_question_ids_are_refused(setup, tmp_path):
    world, ckpt, _, qs = setup
    model, tok = evaluate.load_model(ckpt)
    dup = qs[:3] + [dict(qs[1], text="Is there a square?")]
    with pytest.raises(ValueError, match=rf"question_id.*\[{qs[1]['question_id']}\]"):
        evaluate.answer_file(model, tok, dup, world, str(tmp_path / "a.jsonl"), progress=False)
    assert not (tmp_path / "a.jsonl").exists()


def test_missing_image_is_reported_and_the_batch_answered(setup, tmp_path, capsys):
    world, ckpt, _, qs = setup
    model, tok = evaluate.load_model(ckpt)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = [dict(qs[0], question_id=100, image="images/nothing.png"),
           dict(qs[1], question_id=101, image=str(tmp_path / "broken.png"))]
    batch = [qs[2], bad[0], qs[3], bad[1], qs[4]]
    failed = []
    got = evaluate.answer_file(model, tok, batch, world, str(tmp_path / "a.jsonl"), batch_size=8,
                               max_new_tokens=6, progress=False, failed=failed)
    assert [f[:2] for f in failed] == [(100, "images/nothing.png"), (101, str(tmp_path / "broken.png"))]
    err = capsys.readouterr().err
    assert "question 100: cannot read image images/nothing.png" in err and "question 101" in err
    alone = evaluate.answer_file(model, tok, [qs[2], qs[3], qs[4]], world, str(tmp_path / "b.jsonl"), batch_size=1,
                                 max_new_tokens=6, progress=False)
    assert [r["question_id"] for r in got] == [qs[k]["question_id"] for k in (2, 3, 4)]
    assert [r["text"] for r in got] == [r["text"] for r in alone]  # the rest of the batch, answered as alone


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    ckpt = make_checkpoint(world, tmp_path_factory.mktemp("ckpt") / "tiny")
    qs = [json.loads(line) for line in open(os.path.join(world, "eval_pope.jsonl"))][:6]
    qfile = tmp_path_factory.mktemp("q") / "pope.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return world, ckpt, str(qfile), qs


def test_resume_asks_only_the_rest(setup, tmp_path, monkeypatch):
    world, ckpt, qfile, qs = setup
    answers = tmp_path / "answers.jsonl"
    # ids 0 and 3 answered; a run killed while writing id 4 left half a line
    answers.write_text(json.dumps({"question_id": 0, "prompt": "", "text": "Yes"}) + "\n"
                       + json.dumps({"question_id": 3, "prompt": "", "text": "No"}) + "\n" + '{"question_id": 4, "te')
    asked = []
    real = evaluate.answer_batch

    def counting(model, tok, prompts, images, max_new_tokens=32):
        asked.append(len(prompts))
        return real(model, tok, prompts, images, max_new_tokens)

    monkeypatch.setattr(evaluate, "answer_batch", counting)
    argv = ["--ckpt", ckpt, "--questions", qfile, "--image-folder", world, "--answers", str(answers),
            "--metric", "pope", "--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu"]
    scores = evaluate.main(argv)
    assert asked == [3, 1]  # questions 1, 2, 4, then 5
    rows = evaluate.read_jsonl(str(answers))
    assert sorted(r["question_id"] for r in rows) == list(range(6))
    assert [r["text"] for r in rows[:2]] == ["Yes", "No"]  # the old answers are kept, not asked again
    assert scores["n"] == 6
    asked.clear()
    assert evaluate.main(argv) == scores and asked == []  # all answered: nothing asked


def test_batched_answers_equal_one_by_one(setup, tmp_path):
    world, ckpt, _, qs = setup
    model, tok = evaluate.load_model(ckpt)
    a = evaluate.answer_file(model, tok, qs, world, str(tmp_path / "a.jsonl"), batch_size=4, max_new_tokens=6,
                             progress=False)
    b = evaluate.answer_file(model, tok, qs, world, str(tmp_path / "b.jsonl"), batch_size=1, max_new_tokens=6,
                             progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_batched_answers_equal_one_by_one_with_text_only_questions(setup, tmp_path):
    # prompts of different lengths (left padding) and questions without an image in the same batch
    world, ckpt, _, qs = setup
    model, tok = evaluate.load_model(ckpt)
    mixed = [qs[0], {"question_id": "t1", "text": "Say something about circles."}, qs[1],
             {"question_id": "t2", "text": "Hi"}, qs[2]]
    a = evaluate.answer_file(model, tok, mixed, world, str(tmp_path / "a.jsonl"), batch_size=5, max_new_tokens=8,
                             progress=False)
    b = evaluate.answer_file(model, tok, mixed, world, str(tmp_path / "b.jsonl"), batch_size=1, max_new_tokens=8,
                             progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b] and len(a) == 5


def _pope_mean_f1(answers, qs):
    """Reference written from LLaVA's eval_pope.py: per category, first sentence, 'no' if No/not/no."""
    cat = {q["question_id"]: (q["category"], q["label"] == "yes") for q in qs}
    f1s = []
    for c in sorted({v[0] for v in cat.values()}):
        tp = fp = fn = 0
        for a in answers:
            if cat[a["question_id"]][0] != c:
                continue
            words = a["text"].split(".")[0].replace(",", "").split(" ")
            pred = not any(w in words for w in ("No", "not", "no"))
            gold = cat[a["question_id"]][1]
            tp, fp, fn = tp + (pred and gold), fp + (pred and not gold), fn + (not pred and gold)
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(f1s) / len(f1s)


def pope_layout(root, world, qs):
    """POPE laid out as LLaVA-1.5's playground/data/eval: pope/llava_pope_test.jsonl, its images in
    pope/val2014 and the labels in pope/coco/coco_pope_<category>.json."""
    (root / "pope" / "coco").mkdir(parents=True)
    os.symlink(world, root / "pope" / "val2014")
    (root / "pope" / "llava_pope_test.jsonl").write_text(
        "".join(json.dumps({k: q[k] for k in ("question_id", "image", "text", "category")}) + "\n" for q in qs))
    for c in ("random", "popular", "adversarial"):
        (root / "pope" / "coco" / f"coco_pope_{c}.json").write_text(
            "".join(json.dumps({"label": q["label"]}) + "\n" for q in qs if q["category"] == c))


def test_benchmark_command_on_llava_layout(setup, tmp_path, capsys):
    # POPE and VQAv2 laid out as LLaVA-1.5's playground/data/eval: pope/llava_pope_test.jsonl with its
    # images in pope/val2014 and labels in pope/coco/coco_pope_<category>.json; vqav2 without answers (test-dev)
    world, ckpt, _, _ = setup
    qs = [json.loads(line) for line in open(os.path.join(world, "eval_pope.jsonl"))][:9]
    root = tmp_path / "eval"
    pope_layout(root, world, qs)
    (root / "vqav2").mkdir()
    os.symlink(world, root / "vqav2" / "test2015")
    (root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text(
        "".join(json.dumps({"question_id": q["question_id"], "image": q["image"], "text": q["text"]}) + "\n"
                for q in qs[:3]))
    out = tmp_path / "out"
    base = ["--ckpt", ckpt, "--data", str(root), "--out", str(out), "--max-new-tokens", "4", "--device", "cpu",
            "--batch-size", "4"]
    r = evaluate.main(base + ["--benchmark", "pope"])
    answers = evaluate.read_jsonl(str(out / "pope" / "answers.jsonl"))
    assert len(answers) == 9 and r["headline"] == pytest.approx(_pope_mean_f1(answers, qs))
    assert json.load(open(out / "pope" / "result.json"))["headline"] == r["headline"]
    v = evaluate.main(base + ["--benchmark", "vqav2"])
    assert "headline" not in v  # test-dev: scored by the server, from the submission file
    sub = json.load(open(out / "vqav2" / "vqav2_test-dev_submission.json"))
    assert [s["question_id"] for s in sub] == [q["question_id"] for q in qs[:3]]
    capsys.readouterr()
    evaluate.main(["--summary", str(out)])
    head, row = capsys.readouterr().out.splitlines()
    cells = dict(zip([h.strip() for h in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["POPE"] == f"{100 * r['headline']:.1f}" and cells["VQAv2"] == "-" and cells["GQA"] == "-"


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_decoding_answers_as_eager(setup, tmp_path):
    world, ckpt, _, qs = setup
    model, tok = evaluate.load_model(ckpt)
    fast, _ = evaluate.load_model(ckpt, compile="on")
    assert fast.compile_decode and not model.compile_decode
    a = evaluate.answer_file(fast, tok, qs, world, str(tmp_path / "a.jsonl"), batch_size=4, max_new_tokens=6,
                             progress=False)  # batches of 4 and 2: two compiled shapes
    b = evaluate.answer_file(model, tok, qs, world, str(tmp_path / "b.jsonl"), batch_size=4, max_new_tokens=6,
                             progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b] and len(a) == len(qs)


def torchrun_eval(args, n=2):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "eval.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_two_processes_answer_as_one(setup, tmp_path):
    """torchrun with 2 gloo processes: each answers every other question still to answer, the first
    merges and scores once; the answer file and the scores are those of one process."""
    world, ckpt, qfile, qs = setup
    base = ["--ckpt", ckpt, "--questions", qfile, "--image-folder", world, "--metric", "pope", "--batch-size", "2",
            "--max-new-tokens", "4", "--device", "cpu"]
    one = evaluate.main(base + ["--answers", str(tmp_path / "one.jsonl")])
    out = torchrun_eval(base + ["--answers", str(tmp_path / "two.jsonl")])
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert json.loads(out[out.index("{"):]) == one  # printed once, by the first process
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "two.jsonl"]  # the part files are gone
    # resumable: the answer file and a stopped run's part file (torn last line) keep their rows
    ref = evaluate.read_jsonl(str(tmp_path / "one.jsonl"))
    (tmp_path / "r.jsonl").write_text(json.dumps(dict(ref[0], text="kept 0")) + "\n")
    (tmp_path / "r.jsonl.part1").write_text(json.dumps(dict(ref[3], text="kept 3")) + "\n" + '{"question_id": 4, "te')
    torchrun_eval(base + ["--answers", str(tmp_path / "r.jsonl")])
    rows = evaluate.read_jsonl(str(tmp_path / "r.jsonl"))
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in qs]
    assert [r["text"] for r in rows] == ["kept 0"] + [r["text"] for r in ref[1:3]] + ["kept 3"] + \
        [r["text"] for r in ref[4:]]
    assert not (tmp_path / "r.jsonl.part1").exists()


def test_benchmark_on_two_processes(setup, tmp_path):
    world, ckpt, qfile, qs = setup
    root = tmp_path / "eval"
    pope_layout(root, world, qs)
    base = ["--ckpt", ckpt, "--data", str(root), "--max-new-tokens", "4", "--device", "cpu", "--batch-size", "2",
            "--benchmark", "pope"]
    one = evaluate.main(base + ["--out", str(tmp_path / "one")])
    torchrun_eval(base + ["--out", str(tmp_path / "two")])
    two = json.load(open(tmp_path / "two" / "pope" / "result.json"))
    assert two["scores"] == one["scores"] and two["n_questions"] == len(qs)
    assert (tmp_path / "two" / "pope" / "answers.jsonl").read_text() == \
        (tmp_path / "one" / "pope" / "answers.jsonl").read_text()
