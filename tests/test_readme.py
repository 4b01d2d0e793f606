"""The README's claims that code produces: kept in step by these checks."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_memory_table_is_what_bench_memory_budget_prints():
    out = subprocess.run([sys.executable, os.path.join("bench", "memory_budget.py")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    training = open(os.path.join(ROOT, "docs", "training.md")).read()  # the README links it
    block = training.split("<!-- memory-table")[1].split("<!-- end memory-table")[0]
    table = "\n".join(line for line in block.splitlines()[1:] if line.strip())
    assert table == out
    peak = max(float(line.split("|")[-2]) for line in out.splitlines()[2:])  # the README quotes the largest
    assert f"at most\n{peak:.1f} GiB" in README or f"at most {peak:.1f} GiB" in README


def test_files_and_commands_named_in_readme_exist():
    for path in re.findall(r"`((?:configs/)?[\w/]+\.py)`", README):  # top-level files and configs
        assert any(os.path.exists(os.path.join(ROOT, d, path)) for d in ("", "configs")), path
    for cfg in re.findall(r"train\.py (configs/\S+\.py)", README):
        assert os.path.exists(os.path.join(ROOT, cfg)), cfg
    ci = open(os.path.join(ROOT, ".ci/run")).read()
    test_cmd = "python -m pytest -q tests"
    assert test_cmd in README and test_cmd in ci  # CI runs exactly the README's test command


def test_demo_table_and_transcript_are_the_demo_runs_own():
    """The README's demo results are docs/demo/results.md, which the demo's report wrote
    (shapes.held_out_report -> out/shapes/results.md, copied): the table and the transcript, verbatim."""
    results = open(os.path.join(ROOT, "docs", "demo", "results.md")).read()
    block = README.split("<!-- demo-results")[1].split("<!-- end demo-results")[0]
    lines = [line for line in block.splitlines()[1:] if line.strip()]
    assert lines, "no demo results in the README"
    for line in lines:
        assert line in results, line
    table = [line for line in results.splitlines() if line.startswith("| question set")]
    assert table and table[0] in lines  # the table's header at least, so the README shows the table


def test_real_llm_section_quotes_its_runs_report():
    """The README's SmolLM2 table (and any transcript line it quotes) and naming share are docs/smollm2/results.md's, which
    `python train.py configs/shapes_smollm2.py` wrote (out/shapes_smollm2/results.md)."""
    section = README.split("## A real LLM")[1].split("\n## ")[0]
    report = open(os.path.join(ROOT, "docs", "smollm2", "results.md")).read()
    quoted = [line for line in section.splitlines() if line.startswith(("| held-out", "  Q: ", "images/"))]
    assert len(quoted) >= 2  # both held-out sets' rows
    for line in quoted:
        assert line in report.splitlines(), line
    named = re.search(r"on ([\d.]+%) of object patches the top-1", section.replace("\n", " ")).group(1)
    assert f"visual tokens of 100 held-out images: {named} of" in report
