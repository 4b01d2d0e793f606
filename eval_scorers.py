"""
The official scoring rules of the paper's benchmarks, as LLaVA-1.5 scores them: VQA accuracy with
EvalAI's answer normalisation (VQAv2, VizWiz, TextVQA), GQA exact match, ScienceQA's letter parse,
POPE per category with the mean F1, MMBench's circular evaluation. Every scorer takes the answer rows
{"question_id", "text"} and the question dicts of eval_benchmarks.py (with their gold fields).
"""

import re


def _key(row):
    """A question's identity: its `key` where ids repeat by design (TextVQA), else its question_id."""
    return row.get("key", row["question_id"])


def _by_key(rows):
    return {_key(r): r for r in rows}


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
