"""The parts of bench/lmms_eval_check.sh that run in nanoVT's own environment (docs/eval.md §lmms-eval).

    python bench/lmms_eval_check.py task WORLD OUT/tasks [--limit N]     a local lmms-eval task for the shapes
                                                                          world's held-out POPE and short answers
    python bench/lmms_eval_check.py compare OUT WORLD [--limit N]        lmms-eval's answers and scores beside
                                                                          eval.py's, question by question
    python bench/lmms_eval_check.py parity CKPT HF_DIR WORLD [--limit N] the export through AutoProcessor +
                                                                          LlavaForConditionalGeneration only,
                                                                          against nanoVT's greedy tokens

The task (two YAML files and a utils.py for lmms-eval's --include_path) reads local JSON Lines with
absolute image paths, so lmms-eval needs no dataset download. Its scoring is lmms-eval's own: POPE by
lmms_eval.tasks.pope.utils (an answer counts when it equals "yes" / "no" after lower() and strip()), short
answers by lmms-eval's VQAv2 accuracy (EvalAI normalisation; the one gold answer stands for ten humans).
"""

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHORT = "\nAnswer the question using a single word or phrase."  # benchmarks.SHORT, the world's instruction line

UTILS = '''"""lmms-eval task functions for nanoVT's shapes world, written by bench/lmms_eval_check.py."""
from PIL import Image

from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score,  # noqa: F401
                                        pope_aggregate_precision, pope_aggregate_recall, pope_aggregate_yes_ratio,
                                        pope_process_results)
from lmms_eval.tasks.vqav2.utils import vqav2_process_results


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")


def short_process_results(doc, results):
    doc = dict(doc, answers=[{"answer": doc["answer"], "answer_id": i} for i in range(10)])
    return {"exact_match": vqav2_process_results(doc, results)["exact_match"]}
'''

POPE_METRICS = ["accuracy", "precision", "recall", "f1_score", "yes_ratio"]


def task_yaml(name, data_file, process, metrics):
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
             "test_split: test", "output_type: generate_until", "doc_to_visual: !function utils.doc_to_visual",
             "doc_to_text: !function utils.doc_to_text", "doc_to_target: answer",
             "generation_kwargs:", "  max_new_tokens: 128", "  temperature: 0", "  top_p: 1.0", "  num_beams: 1",
             "  do_sample: false", f"process_results: !function utils.{process}", "metric_list:"]
    for metric, aggregation in metrics:
        lines += [f"  - metric: {metric}", f"    aggregation: {aggregation}", "    higher_is_better: true"]
    lines += ["lmms_eval_specific_kwargs:", "  default:", '    pre_prompt: ""', f"    post_prompt: {json.dumps(SHORT)}",
              "metadata:", "  - version: 0.0"]
    return "\n".join(lines) + "\n"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def questions(world, name, limit=0):
    qs = read_jsonl(os.path.join(world, f"eval_{name}.jsonl"))
    return qs[:limit] if limit else qs


def write_task(world, out, limit=0):
    os.makedirs(out, exist_ok=True)
    for name in ("short", "pope"):
        rows = []
        for q in questions(world, name, limit):
            if not q["text"].endswith(SHORT):
                raise ValueError(f"{world}/eval_{name}.jsonl question {q['question_id']}: no short-answer line")
            rows.append({"question_id": q["question_id"], "image": os.path.abspath(os.path.join(world, q["image"])),
                         "question": q["text"][:-len(SHORT)], "answer": q.get("answer") or q["label"],
                         "category": q.get("category", "")})
        with open(os.path.join(out, f"shapes_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    data = lambda n: os.path.abspath(os.path.join(out, f"shapes_{n}.jsonl"))  # noqa: E731
    with open(os.path.join(out, "nanovt_shapes_short.yaml"), "w") as f:
        f.write(task_yaml("nanovt_shapes_short", data("short"), "short_process_results", [("exact_match", "mean")]))
    with open(os.path.join(out, "nanovt_shapes_pope.yaml"), "w") as f:
        f.write(task_yaml("nanovt_shapes_pope", data("pope"), "pope_process_results",
                          [(f"pope_{m}", f"!function utils.pope_aggregate_{m}") for m in POPE_METRICS]))
    with open(os.path.join(out, "utils.py"), "w") as f:
        f.write(UTILS)
    print(f"wrote the lmms-eval tasks nanovt_shapes_short, nanovt_shapes_pope in {out}")


def lmms_answers(out, task, qs):
    """{question_id: answer} from lmms-eval's --log_samples file of `task` (the newest run); its doc_id
    is the row of the task's JSON Lines file, written in the order of `qs`."""
    files = sorted(glob.glob(os.path.join(out, "logs", "**", f"*_samples_{task}.jsonl"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval samples for {task} under {out}/logs (run with --log_samples)")
    answers = {}
    for row in read_jsonl(files[-1]):
        resp = row.get("filtered_resps") or row.get("resps")
        while isinstance(resp, list):
            resp = resp[0] if resp else ""
        answers[qs[row["doc_id"]]["question_id"]] = resp
    return answers, files[-1]


def lmms_scores(path):
    """The metrics lmms-eval wrote in its results file beside the samples."""
    results = sorted(glob.glob(os.path.join(os.path.dirname(path), "*_results.json")), key=os.path.getmtime)
    with open(results[-1]) as f:
        return json.load(f)["results"]


def compare(out, world, limit=0):
    import eval as nanovt_eval
    report = {}
    for name, task, metric in (("short", "nanovt_shapes_short", "vqa"), ("pope", "nanovt_shapes_pope", "pope")):
        qs = questions(world, name, limit)
        ours = {r["question_id"]: r["text"]  # eval.read_jsonl leaves out the answer file's provenance line
                for r in nanovt_eval.read_jsonl(os.path.join(out, "nanovt", f"answers_{name}.jsonl"))}
        theirs, path = lmms_answers(out, task, qs)
        missing = [q["question_id"] for q in qs if q["question_id"] not in theirs]
        if missing:
            raise ValueError(f"lmms-eval answered {len(theirs)} of {len(qs)} {name} questions, e.g. not {missing[:5]}")
        same = sum(ours[q["question_id"]].strip() == theirs[q["question_id"]].strip() for q in qs)
        as_lmms = [{"question_id": q["question_id"], "text": theirs[q["question_id"]]} for q in qs]
        rescored = nanovt_eval.METRICS[metric](as_lmms, qs)  # lmms-eval's answers under eval.py's scoring
        scored = nanovt_eval.METRICS[metric]([{"question_id": q["question_id"], "text": ours[q["question_id"]]}
                                              for q in qs], qs)
        report[name] = {"questions": len(qs), "identical_answers": same, "eval.py": scored,
                        "lmms-eval answers, eval.py scoring": rescored,
                        "lmms-eval": lmms_scores(path).get(task, {})}
        print(f"{name}: {same} of {len(qs)} answers identical; eval.py accuracy {scored['accuracy']:.4f}, "
              f"lmms-eval's answers scored by eval.py {rescored['accuracy']:.4f}; lmms-eval's own scores: "
              + ", ".join(f"{k} {v:.4f}" for k, v in report[name]["lmms-eval"].items()
                           if isinstance(v, float) and "stderr" not in k))
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def parity(ckpt, hf_dir, world, limit=0, max_new_tokens=128):
    """Each question once through nanoVT (inference.prompt_ids, data.process_image, generate_stream) and
    once through transformers driven only by the exported processor; counts identical greedy tokens."""
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import data
    import inference
    model, tok = inference.load_model(ckpt, device="cpu", dtype="fp32")
    processor = AutoProcessor.from_pretrained(hf_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    same = total = 0
    diff = []
    qs = [q for name in ("short", "pope") for q in questions(world, name, limit)]
    for q in tqdm(qs, desc="processor-only vs nanoVT", dynamic_ncols=True):
        image = data.load_image(os.path.join(world, q["image"]))
        ids = inference.prompt_ids(model, tok, q["text"], True)
        px = data.process_image(image, model.cfg.vision.image_size)[None]
        with torch.no_grad():
            mine = [int(s[0]) for s in inference.generate_stream(model, torch.tensor([ids]), px, max_new_tokens=max_new_tokens,
                                                              stop_ids=[tok.eos_id])]
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
            inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                               return_tensors="pt")
            out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        total += 1
        if theirs == mine:
            same += 1
        elif len(diff) < 5:
            diff.append((q["question_id"], tok.decode(mine), tok.decode(theirs)))
    print(f"processor-only path: {same} of {total} questions give nanoVT's greedy tokens"
          + (f"; first differences: {diff}" if diff else ""))
    return same, total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("task")
    t.add_argument("world")
    t.add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.add_argument("world")
    r = sub.add_parser("parity")
    r.add_argument("ckpt")
    r.add_argument("hf_dir")
    r.add_argument("world")
    for s in (t, c, r):
        s.add_argument("--limit", type=int, default=0, help="the first N questions of each file (0: all)")
    a = p.parse_args(argv)
    if a.cmd == "task":
        write_task(a.world, a.out, a.limit)
    elif a.cmd == "compare":
        compare(a.out, a.world, a.limit)
    else:
        parity(a.ckpt, a.hf_dir, a.world, a.limit)


if __name__ == "__main__":
    main()
