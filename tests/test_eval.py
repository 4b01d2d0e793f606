"""eval.py: the metrics on hand-made answer sets (numbers computed by hand), and resumable answering."""

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
    # TP 3, FN 2, TN 2, FP 3
    assert r["n"] == 10 and r["accuracy"] == 0.5 and r["precision"] == 0.5 and r["recall"] == 0.6
    assert r["f1"] == pytest.approx(0.6 / 1.1) and r["yes_ratio"] == 0.6
    rand, adv = r["categories"]["random"], r["categories"]["adversarial"]  # TP 2 FN 1 TN 2 | TP 1 FP 3 FN 1
    assert (rand["accuracy"], rand["precision"], rand["recall"], rand["yes_ratio"]) == (0.8, 1.0, pytest.approx(2 / 3), 0.4)
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.2, 0.25, 0.5, 0.8)
    assert adv["f1"] == pytest.approx(1 / 3)


def test_vqa_normalisation_and_score_by_hand():
    n = evaluate.normalize_answer
    assert n("Two.") == "2" and n("2.") == "2" and n("3.5") == "3.5"
    assert n("Black-and-white") == "black and white"  # a mark inside a word becomes a space
    assert n("yes, it is") == "yes it is" and n("1,000") == "1000"  # next to a space / in a number: dropped
    assert n("The  Red  circle!") == "red circle" and n("isnt") == "isn't" and n("None") == "0"
    answers, qs = qa(["2", "black and white", "red", "1000", "3.5", "circle", ["top left", "upper left"], "yes",
                      "isn't"],
                     ["Two.", "Black-and-white", "The red.", "1,000", "3.5", "circles", "Upper left!", "yes, it is",
                      "isnt"])
    r = evaluate.score_vqa(answers, qs)
    assert r == {"accuracy": 7 / 9, "n": 9}  # misses: "circles", "yes it is"


def test_multiple_choice_by_hand():
    answers, qs = qa(["B", "C", "A", "D", "A", "B", "B", "E", "(C)"],
                     ["B", "C. Paris", "(A)", "The answer is D.", "A cat sat", "b",
                      "The answer is A. The answer is B.", "E", "C"],
                     choices=[None] * 7 + [["w", "x", "y", "z"], None])
    assert [evaluate.mc_letter(a["text"]) for a in answers[:7]] == ["B", "C", "A", "D", None, None, None]
    r = evaluate.score_mc(answers, qs)
    assert r == {"accuracy": 5 / 9, "n": 9}  # "E" is not one of 4 choices


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
