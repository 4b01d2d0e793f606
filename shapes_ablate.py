"""
The ablation of Table 5 on the shapes world: does the VM loss (Eq. 6) help, and is it the VM loss
or just the extra epoch of stage IV?

    python shapes_ablate.py configs/shapes_x2.py     # Table 5 on the x 2 recipe, seeds 0 1 2 -> out/ablate/shapes_x2
    python shapes_ablate.py                          # the demo's config (x 4), seeds 0 1 2 -> out/ablate/shapes/ablation.md
                                                     # (= python shapes_ablate.py configs/shapes.py --seeds=0,1,2 --out_dir=out/ablate/shapes)
    python shapes_ablate.py --tiny --seeds=0         # seconds: the end-to-end test's setting
    python shapes_ablate.py configs/shapes_smollm2.py --seeds=0,1 --variants=lm,control,vtlmm   # on SmolLM2

Stage 0 (the toy stand-in for pretrained CLIP and Vicuna; each of the config's stage-0 entries in
turn: stage0/, stage0_1/, ...) is trained once and shared by every seed, as the paper's runs share
one CLIP and one Vicuna; the shapes world is shared too (world seed 0). A config whose stage I starts
from a pretrained LLM (`llm_path`, e.g. SmolLM2's GGUF in configs/shapes_smollm2.py) has no stage 0:
each seed's stage I starts from that LLM and a fresh tower, which the shapes hook pretrains first (with
that seed), and the stages use the config's own tokenizer.
Per seed (the seed of initialisation and data order) stages I, II and III are trained once and
stage IV branches from the stage III checkpoint:

  1. lm       stages I-II only: "- visual modeling", the paper's baseline (LLaVA-1.5)
  2. control  stage IV with the VM term off (LM loss only, same data and steps). It starts from the
              stage III checkpoint, whose only difference from stage II is the VM head, which an
              LM-only stage IV never uses: the same start as VT-LMM's stage IV. It separates the VM
              loss from the extra epoch, which the paper's comparison does not.
  3. vtlmm    stage IV with Eq. 7 (LM + VM): VT-LMM
  4. pif      stage IV with pseudo image features X_p (Eq. 8), which it also answers from

Each variant answers the held-out short-answer and POPE sets, and the share of object patches whose
top-1 visual token names the object is counted (shapes.held_out_report, visual_token_naming); what the
runs so far gave is in docs/experiments.md §Table 5 on the shapes world. --variants=lm,control,vtlmm
trains and scores only those (the Table 5 of issue 31 needs no pif, and each stage IV costs minutes on
a real LLM). Everything lands in OUT_DIR:
stage0/, seed{k}/stage{1,2,3}/, seed{k}/stage4_{control,vtlmm,pif}/, seed{k}/eval/{variant}/,
times.json (seconds per job), results.json, and ablation.md (mean ± std over seeds). It resumes:
finished stages and evaluations are skipped, an interrupted stage continues from its last step
checkpoint. Other --key=value arguments override TrainConfig fields (train.py) for every stage;
--hook.KEY=value sets an entry of the shapes world's settings (shapes.ShapesConfig), e.g.
--hook.dir=DIR for another world or --hook.report_limit=N for the first N questions of each set.
"""

import dataclasses
import json
import os
import statistics
import sys
import time

import shapes
import train
from errors import InputError

ROOT = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name: (row label, stage IV overrides; None = the stage II checkpoint itself)
    "lm": ("1. LM only, I-II (- visual modeling)", None),
    "control": ("2. control: I-III, IV with the VM term off", dict(vm_loss=False)),
    "vtlmm": ("3. VT-LMM: I-IV", dict()),
    "pif": ("4. VT-LMM, pseudo image features (Eq. 8)", dict(pseudo_image_features=True)),
}
METRICS = [  # column, report section, key, as a percentage
    ("short-answer acc. (%)", "short", "accuracy", True),
    ("POPE acc. (%)", "pope", "accuracy", True),
    ("POPE F1", "pope", "f1", False),
    ("yes-ratio", "pope", "yes_ratio", False),
    ("object patches named (%)", "naming", "named", True),  # shapes.visual_token_naming
]
DIFFERENCES = [("vtlmm", "control", "VM loss: VT-LMM - control"), ("control", "lm", "extra epoch: control - LM only"),
               ("pif", "vtlmm", "pseudo image features: pif - VT-LMM")]


def parse_args(argv):
    """[CONFIG] [--seeds=0,1,2] [--tiny] [--key=value ...] -> (TrainConfig, seeds)."""
    default = os.path.join(ROOT, "configs", "shapes.py")  # the demo's world, model and schedule
    seeds, variants, rest, config = [0, 1, 2], list(VARIANTS), [], default
    for a in argv:
        if a.startswith("--seeds="):
            seeds = [int(s) for s in a.split("=", 1)[1].split(",") if s.strip()]
        elif a.startswith("--variants="):
            variants = [v.strip() for v in a.split("=", 1)[1].split(",") if v.strip()]
            unknown = [v for v in variants if v not in VARIANTS]
            if unknown or not variants:
                raise InputError(f"--variants: {', '.join(unknown) or 'none given'}; choose from {', '.join(VARIANTS)}")
        elif a == "--tiny":
            config = os.path.join(ROOT, "configs", "ablate_tiny.py")
        elif not a.startswith("--"):
            config = a
        else:
            rest.append(a)
    if not any(a.startswith("--out_dir=") for a in rest):
        # never the config's own out_dir, where train.py's stages of the same names (stage0, stage1, ...)
        # would be mistaken for the ablation's or resumed by it: out/ablate/<config name>, however the
        # config's path is spelled (configs/shapes.py, ./configs/shapes.py -> out/ablate/shapes)
        rest.append("--out_dir=" + os.path.join("out", "ablate", os.path.splitext(os.path.basename(config))[0]))
    cfg = train.load_config([config] + rest)
    stages = {s["stage"] for s in cfg.stages}
    need = {1, 2, 3, 4} if cfg.llm_path else {0, 1, 2, 3, 4}  # a pretrained LLM needs no toy stage 0
    if not need <= stages:
        raise ValueError(f"{config}: the ablation needs `stages` entries for stages {min(need)}-4, found {sorted(stages)}")
    if cfg.hook.get("module") != "shapes":
        raise ValueError(f"{config}: the ablation runs on the shapes world: set hook = dict(module=\"shapes\", ...)")
    return cfg, seeds, variants


class Jobs:
    """Runs named jobs once, remembering each one's seconds in times.json (resumed runs keep old times)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "times.json")
        self.times = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def run(self, name, done, fn):
        if not done():
            t = time.perf_counter()
            fn()
            self.times[name] = round(time.perf_counter() - t, 1)
            with open(self.path, "w") as f:
                json.dump(self.times, f, indent=1)


def stage_config(cfg, stage, out_dir, which=0, **over):
    """One stage's TrainConfig: the base, the config's entry for that stage (its `which`-th, for a
    stage with several entries such as the demo's stage 0), the ablation's choices."""
    entry = {k: v for k, v in [s for s in cfg.stages if s["stage"] == stage][which].items()
             if k not in ("out_dir", "init_from")}
    world = shapes.settings(cfg).dir
    default = os.path.join(world, "instruct.json" if stage in (2, 4) else "stage1_captions.json")
    data_path = entry.pop("data_path", default)  # the config's choice, e.g. stage 0 on instruct.json
    # the toy world's own tokenizer (in --hook.dir's world), or a pretrained LLM's (SmolLM2's GGUF)
    tokenizer = cfg.tokenizer if cfg.llm_path else os.path.join(world, "tokenizer.model")
    return dataclasses.replace(cfg, stages=[], resume=True, tokenizer=tokenizer,
                               data_path=data_path, image_folder="", out_dir=out_dir, **{**entry, **over})


def run(cfg, seeds, variants=tuple(VARIANTS), argv=()):
    t_start = time.perf_counter()
    toy = shapes.settings(cfg)
    root, world = cfg.out_dir, toy.dir
    os.makedirs(root, exist_ok=True)
    shapes.ensure_shapes_world(world, version=toy.version, n_images=toy.images, image_size=toy.image_size, seed=0,
                               workers=2, mix=toy.mix)
    d = train.setup_distributed(cfg)
    if d.world > 1:
        raise ValueError("shapes_ablate.py runs in one process")
    jobs = Jobs(root)
    final = lambda path: os.path.join(path, "final")  # noqa: E731
    exists = lambda path: lambda: os.path.exists(os.path.join(path, "config.json"))  # noqa: E731

    def train_job(name, scfg):
        jobs.run(name, exists(final(scfg.out_dir)), lambda: train.train_stage(scfg, d))
        return final(scfg.out_dir)

    prev = None
    for k in range(sum(s["stage"] == 0 for s in cfg.stages)):  # the toy stage 0 may have several steps
        name = "stage0" if k == 0 else f"stage0_{k}"
        over = {"init_from": prev} if prev else {}
        prev = train_job(name, stage_config(cfg, 0, os.path.join(root, name), which=k, seed=0, **over))
    results = {v: {} for v in variants}
    for seed in seeds:
        sdir = os.path.join(root, f"seed{seed}")
        ckpt = prev or ""  # no stage 0: stage I starts from the config's LLM
        for stage in (1, 2, 3):
            ckpt = train_job(f"seed{seed}/stage{stage}",
                             stage_config(cfg, stage, os.path.join(sdir, f"stage{stage}"), seed=seed, init_from=ckpt))
            if stage == 2:
                stage2 = ckpt
        for v in variants:
            over = VARIANTS[v][1]
            model = stage2 if over is None else train_job(
                f"seed{seed}/stage4_{v}", stage_config(cfg, 4, os.path.join(sdir, f"stage4_{v}"), seed=seed,
                                                       init_from=ckpt, **over))
            report = os.path.join(sdir, "eval", v, "report.json")
            jobs.run(f"seed{seed}/eval_{v}", lambda: os.path.exists(report),
                     lambda: shapes.held_out_report(model, world, limit=toy.report_limit, out_path=report,
                                                    progress=False, naming_images=toy.naming_images))
            with open(report) as f:
                results[v][seed] = json.load(f)
    summary = write_results(root, cfg, seeds, results, jobs.times, time.perf_counter() - t_start, argv)
    print(open(os.path.join(root, "ablation.md")).read())
    return summary


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def fmt(m, s, pct):
    k = 100 if pct else 1
    mean = f"{k * m:.1f}" if pct else f"{m:.3f}"
    return mean + ("" if s != s else f" ± {k * s:.1f}" if pct else f" ± {s:.3f}")


def write_results(root, cfg, seeds, results, times, seconds, argv):
    value = lambda r, sec, key: r.get(sec, {}).get(key, float("nan"))  # noqa: E731  (an older report has no "naming")
    summary = {v: {col: mean_std([value(results[v][s], sec, key) for s in seeds]) for col, sec, key, _ in METRICS}
               for v in results}
    pairs = [(a, b, name) for a, b, name in DIFFERENCES if a in results and b in results]  # of the variants run
    diffs = {name: {col: mean_std([value(results[a][s], sec, key) - value(results[b][s], sec, key) for s in seeds])
                    for col, sec, key, _ in METRICS} for a, b, name in pairs}
    first = next(iter(results.values()))[seeds[0]]
    command = " ".join(["python", "shapes_ablate.py", *argv]) if argv else "python shapes_ablate.py"
    lines = [f"Table 5 on the shapes world: mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             f"each model answers {first['short']['n']} held-out short-answer and {first['pope']['n']} POPE questions.",
             "", "| variant | " + " | ".join(col for col, *_ in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for v in results:
        label = VARIANTS[v][0]
        lines.append(f"| {label} | " + " | ".join(fmt(*summary[v][col], pct) for col, _, _, pct in METRICS) + " |")
    lines += ["", "Paired differences (same seed, same stage I-III), mean ± std over seeds:", "",
              "| difference | " + " | ".join(col for col, *_ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for _, _, name in pairs:
        lines.append(f"| {name} | " + " | ".join(fmt(*diffs[name][col], pct) for col, _, _, pct in METRICS) + " |")
    total = sum(times.values())
    lines += ["", f"Produced by `{command}`: {total / 60:.1f} min of training and evaluation "
              f"(this invocation {seconds / 60:.1f} min wall-clock, {os.cpu_count()} CPU cores)."]
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump({"command": command, "seeds": seeds, "config": dataclasses.asdict(cfg), "per_seed": results,
                   "summary": summary, "paired_differences": diffs, "seconds": times}, f, indent=1, default=str)
    return summary


if __name__ == "__main__":
    run(*parse_args(sys.argv[1:]), argv=sys.argv[1:])
