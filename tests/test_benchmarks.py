"""eval_scorers.py: each scorer against cases computed by hand from the official definitions; eval_benchmarks.py: the
readers on files laid out as LLaVA-1.5's eval data, each benchmark's prompt, and the submission files."""

import base64
import io
import json
import zipfile

import pytest
from PIL import Image

import eval_benchmarks as B
import eval_scorers as S


# ---- VQA accuracy (VQAv2, VizWiz, TextVQA) ---------------------------------------------------


def leave_one_out(pred, humans):
    """The definition, literally: for each of the ten humans left out, min(#others equal to pred / 3, 1)."""
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1:]
        scores.append(min(sum(o == pred for o in others) / 3, 1))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("k, by_hand", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(k, by_hand):
    # k of ten humans said "red": leaving out one of them leaves k-1 matches, any other leaves k
    humans = ["red"] * k + ["blue"] * (10 - k)
    assert S.vqa_accuracy("red", humans) == pytest.approx(by_hand)
    assert leave_one_out("red", humans) == pytest.approx(by_hand)


def test_vqa_accuracy_is_not_match_any():
    humans = ["two"] + ["3"] * 9
    assert S.vqa_accuracy("2", humans) == pytest.approx(0.3)  # one annotator: 0.3, not 1
    answers = [{"question_id": 1, "text": "Two"}, {"question_id": 2, "text": "3"}]
    qs = [{"question_id": 1, "answers": humans}, {"question_id": 2, "answers": humans}]
    assert S.score_vqa(answers, qs) == {"accuracy": pytest.approx((0.3 + 1.0) / 2), "n": 2}
    with pytest.raises(ValueError, match="ten human answers"):
        S.vqa_accuracy("2", ["2", "3"])


@pytest.mark.parametrize("raw, normalised", [
    ("The man's hat", "man 's hat"),       # "'s" split off, article out
    ("Two.", "2"), ("3.5", "3.5"),         # number word; a period before a digit stays
    ("Black-and-white", "black and white"),  # a mark inside a word becomes a space
    ("yes - it is", "yes it is"),           # a mark next to a space is dropped
    ("Yes, it is!", "yes it is"),           # commas out; '!' at the end becomes a space
    ("1,000", "1000"), ("What?", "what"),
    ("dont", "don't"), ("an apple", "apple"), ("None", "0"), ("ten", "10"),
    ("U.S.A.", "usa"), ("\tred\n", "red"),
])
def test_evalai_normalisation(raw, normalised):
    assert S.normalize_answer(raw) == normalised


# ---- GQA ------------------------------------------------------------------------------------------


def test_gqa_exact_match():
    texts = ["Yes.", "Left", "the left", "left side", "No"]
    gold = ["yes", "left", "left", "left", "no"]
    answers = [{"question_id": str(i), "text": t} for i, t in enumerate(texts)]
    qs = [{"question_id": str(i), "answer": g} for i, g in enumerate(gold)]
    assert S.score_gqa(answers, qs) == {"accuracy": 3 / 5, "n": 5}  # "the left" and "left side" are wrong


# ---- ScienceQA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. cat", "B"), ("The answer is B.", "B"), ("So. The answer is C, clearly", "C"),
    ("B)", None), ("(B)", None), ("B.", None), ("B: cat", None), ("The answer is (B).", None),
    ("The answer is A. The answer is B.", None), ("b", None), ("", None), ("AB", None),
])
def test_sqa_parse_as_llava(text, letter):
    assert S.sqa_letter(text) == letter


def test_sqa_score_divides_by_all_questions():
    choices3 = ["x", "y", "z"]
    qs = [{"question_id": "1", "image": "1/image.png", "answer": 1, "choices": choices3},  # B, right
          {"question_id": "2", "image": "2/image.png", "answer": 0, "choices": choices3},  # "(A)": fails
          {"question_id": "3", "image": "3/image.png", "answer": 2, "choices": choices3},  # not answered
          {"question_id": "4", "answer": 0, "choices": ["p", "q"]},                        # text-only, right
          {"question_id": "5", "answer": 1, "choices": ["p", "q"]}]                        # "C" beyond 2 choices
    answers = [{"question_id": "1", "text": "B"}, {"question_id": "2", "text": "(A)"},
               {"question_id": "4", "text": "A. p"}, {"question_id": "5", "text": "C"}]
    r = S.score_sqa(answers, qs)
    assert r == {"accuracy": 2 / 5, "img_accuracy": 1 / 3, "n": 5, "n_img": 3}


# ---- POPE -------------------------------------------------------------------------------------------


def test_pope_per_category_and_mean_f1():
    rows = [  # (category, gold, answer) -> outcome
        ("random", "yes", "Yes, there is a red circle."),  # TP
        ("random", "yes", "No."),                         # FN
        ("random", "yes", "yes"),                         # TP
        ("random", "no", "No, there is not."),            # TN
        ("random", "no", "There is not a cat."),          # TN ('not')
        ("adversarial", "no", "Yes"),                     # FP
        ("adversarial", "yes", "Yes. No."),               # TP (only the first sentence counts)
        ("adversarial", "no", "Nope, I don't see one"),   # FP (no No / not / no word)
        ("adversarial", "no", "NO"),                      # FP (case-sensitive)
        ("adversarial", "yes", "There is no doubt. Yes."),  # FN
    ]
    qs = [{"question_id": i, "category": c, "label": g} for i, (c, g, _) in enumerate(rows)]
    answers = [{"question_id": i, "text": t} for i, (_, _, t) in enumerate(rows)]
    r = S.score_pope(answers, qs)
    rand, adv = r["categories"]["random"], r["categories"]["adversarial"]
    # random: TP 2 FN 1 TN 2 FP 0 -> P 1, R 2/3, F1 0.8; adversarial: TP 1 FN 1 TN 0 FP 3 -> P 1/4, R 1/2, F1 1/3
    assert (rand["accuracy"], rand["precision"], rand["recall"], rand["f1"], rand["yes_ratio"]) == pytest.approx(
        (0.8, 1.0, 2 / 3, 0.8, 0.4))
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"], adv["yes_ratio"]) == pytest.approx(
        (0.2, 0.25, 0.5, 1 / 3, 0.8))
    assert r["mean_f1"] == pytest.approx((0.8 + 1 / 3) / 2)  # the paper's figure: mean of the categories' F1
    assert r["f1"] == pytest.approx(0.6 / 1.1)  # pooled: TP 3 FP 3 FN 2, not the headline
    assert S.pope_yes("No\nthere is none")  # words are split at spaces only, as LLaVA's script does


# ---- MMBench ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. cat", "B"), ("(C)", "C"), ("The answer is C", "C"), ("A cat", "A"),
    ("A dog is on a sofa", "A"),  # 'A' may be an article here: the letter rule refuses, the option text decides
    ("I think B or C", None), ("a cat", "B"), ("Z", None), ("fish or bird", None),
])
def test_mmbench_letter(text, letter):
    assert S.mmbench_letter(text, ["dog", "cat", "bird", "fish"]) == letter


def test_mmbench_circular_by_hand():
    def group(g, golds, texts):
        qs = [{"question_id": g + k * 1_000_000, "group": g, "options": ["dog", "cat", "bird", "fish"][:len(golds)],
               "answer": a} for k, a in enumerate(golds)]
        return qs, [{"question_id": q["question_id"], "text": t} for q, t in zip(qs, texts)]
    q1, a1 = group(1, "ABCD", ["A", "B", "C", "D"])   # every rotation right
    q2, a2 = group(2, "BCA", ["B", "C", "B"])         # one rotation wrong
    q3, a3 = group(3, "AB", ["dog", "cat"])           # right by option text
    q4, a4 = group(4, "AB", ["A"])                    # a rotation not answered
    r = S.score_mmbench(a1 + a2 + a3 + a4, q1 + q2 + q3 + q4)
    assert r["accuracy"] == 2 / 4 and r["n"] == 4
    assert r["single_pass_accuracy"] == 9 / 11


def _tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, img if c == "image" else "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_mmbench_reader_rotates_options(tmp_path):
    path = _tsv(tmp_path / "dev.tsv", [{"index": 7, "question": "What animal?", "hint": "A farm.", "A": "dog",
                                        "B": "cat", "C": "cow", "D": "nan", "answer": "C", "split": "dev"}])
    rows = B.read_mmbench(path)
    assert [r["question_id"] for r in rows] == [7, 1_000_007, 2_000_007] and {r["group"] for r in rows} == {7}
    assert rows[0]["text"] == ("A farm.\nWhat animal?\nA. dog\nB. cat\nC. cow\n"
                               "Answer with the option's letter from the given choices directly.")
    assert [r["options"] for r in rows] == [["dog", "cat", "cow"], ["cat", "cow", "dog"], ["cow", "dog", "cat"]]
    assert [r["answer"] for r in rows] == ["C", "B", "A"]  # "cow" wherever it moved
    assert B.image_of(rows[0], "").getpixel((0, 0)) == (200, 10, 10)
    cn = B.read_mmbench(path, lang="cn")
    assert cn[0]["text"].endswith("\nC. cow\n请直接回答选项字母。")
    # the submission sheet: the tsv's rows with a prediction column after the options
    out = tmp_path / "sub.xlsx"
    B.write_mmbench_submission([{"question_id": 7, "text": "C"}], rows, str(out))
    sheet = zipfile.ZipFile(out).read("xl/worksheets/sheet1.xml").decode()
    cells = [c.split("</t>")[0] for c in sheet.split('xml:space="preserve">')[1:]]
    assert cells == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split",
                     "7", "What animal?", "dog", "cat", "cow", "nan", "C", "C", "dev"]


# ---- prompts, readers and submissions on LLaVA's file forms ----------------------------------------


SHORT = "Answer the question using a single word or phrase."


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompts_per_benchmark(tmp_path):
    # as LLaVA's files carry them, kept as they are; a bare question gets the benchmark's lines appended
    q = [{"question_id": 1, "image": "a.jpg", "text": "What color is it?\n" + SHORT},
         {"question_id": 2, "image": "b.jpg", "text": "What color is it?"}]
    for reader in (B.read_vqa, B.read_gqa, B.read_pope):
        assert [r["text"] for r in reader(_jsonl(tmp_path / "q.jsonl", q))] == ["What color is it?\n" + SHORT] * 2
    viz = B.read_vqa(_jsonl(tmp_path / "v.jsonl", q[1:]), (B.UNANSWERABLE, SHORT))
    assert viz[0]["text"] == ("What color is it?\nWhen the provided information is insufficient, respond with "
                              "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    ocr = [{"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
            "text": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL\n" + SHORT},
           {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": "What does it say?\n" + SHORT}]
    ann = {"data": [{"image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
                     "answers": ["dakota"] * 10},
                    {"image_id": "003a8ae2ef43b901", "question": "What does it say?", "answers": ["digital"] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    tv = B.read_textvqa(_jsonl(tmp_path / "t.jsonl", ocr), str(tmp_path / "ann.json"))
    assert tv[0]["text"] == ocr[0]["text"] and [r["answers"][0] for r in tv] == ["dakota", "digital"]
    assert not B.duplicates(tv)  # one image id, two questions: keyed by (id, question) as LLaVA's scorer
    sqa = [{"id": "12", "image": "image.png", "conversations": [
        {"from": "human", "value": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) trout\n<image>"},
        {"from": "gpt", "value": "A"}]}]
    (tmp_path / "sqa.json").write_text(json.dumps(sqa))
    (tmp_path / "problems.json").write_text(json.dumps({"12": {"answer": 0, "choices": ["cat", "trout"]}}))
    s = B.read_sqa(str(tmp_path / "sqa.json"), str(tmp_path / "problems.json"))
    assert s[0]["text"] == ("Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) trout\n"
                            "Answer with the option's letter from the given choices directly.")
    assert (s[0]["answer"], s[0]["image"]) == (0, "image.png")
    mmvet = B.read_mmvet(_jsonl(tmp_path / "m.jsonl", [{"question_id": 0, "image": "v1_0.png",
                                                         "text": "What is x in the equation?"}]))
    assert mmvet[0]["text"] == "What is x in the equation?"  # MM-Vet: no prompt added


def test_pope_labels_pair_in_order(tmp_path):
    qs = [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "category": "random"},
          {"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "category": "popular"},
          {"question_id": 3, "image": "b.jpg", "text": "Is there a cow in the image?", "category": "random"}]
    (tmp_path / "coco").mkdir()
    _jsonl(tmp_path / "coco" / "coco_pope_random.json", [{"question_id": 1, "label": "yes"},
                                                         {"question_id": 2, "label": "no"}])
    _jsonl(tmp_path / "coco" / "coco_pope_popular.json", [{"question_id": 1, "label": "no"}])
    rows = B.read_pope(_jsonl(tmp_path / "p.jsonl", qs), str(tmp_path / "coco"))
    assert [r["label"] for r in rows] == ["yes", "no", "no"]
    assert rows[0]["text"] == "Is there a cat in the image?\n" + SHORT


def test_submission_files(tmp_path):
    answers = [{"question_id": 1, "text": "Two dogs."}, {"question_id": 2, "text": "unanswerable"}]
    qs = [{"question_id": 1, "image": "VizWiz_test_00000001.jpg"}, {"question_id": 2, "image": "VizWiz_test_02.jpg"},
          {"question_id": 3, "image": "x.jpg"}]
    B.write_vqav2_submission(answers, qs, str(tmp_path / "vqa.json"))
    assert json.loads((tmp_path / "vqa.json").read_text()) == [
        {"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": "unanswerable"},
        {"question_id": 3, "answer": ""}]
    B.write_vizwiz_submission(answers, qs[:2], str(tmp_path / "viz.json"))
    assert json.loads((tmp_path / "viz.json").read_text()) == [
        {"image": "VizWiz_test_00000001.jpg", "answer": "2 dogs"}, {"image": "VizWiz_test_02.jpg",
                                                                   "answer": "unanswerable"}]
    B.write_mmvet_submission(answers, qs, str(tmp_path / "mmvet.json"))
    assert json.loads((tmp_path / "mmvet.json").read_text()) == {"v1_1": "Two dogs.", "v1_2": "unanswerable"}
    B.write_gqa_predictions([{"question_id": "201", "text": "Yes."}], [], str(tmp_path / "gqa.json"))
    assert json.loads((tmp_path / "gqa.json").read_text()) == [{"questionId": "201", "prediction": "yes"}]


def test_table1_row():
    head, row = B.table1_row({"pope": 0.8591, "sqa": 0.668})
    assert head.split(" | ") == ["VQAv2", "GQA", "VizWiz", "SQA-I", "TextVQA", "POPE", "MMB", "MMB-CN", "MM-Vet"]
    assert [c.strip() for c in row.split(" | ")] == ["-", "-", "-", "66.8", "-", "85.9", "-", "-", "-"]
