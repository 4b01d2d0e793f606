"""shapes_ablate.py end to end on the tiny setting: four variants per seed, a table, and a resume that trains nothing."""

import json
import os

import shapes_ablate as ablate
import train
from tiny_ckpt import make_world


def test_tiny_ablation_end_to_end(tmp_path, capsys):
    world = make_world(tmp_path / "world", n_images=160)
    out = tmp_path / "ablate"
    argv = ["--tiny", "--seeds=0", f"--hook.dir={world}", f"--out_dir={out}", "--hook.report_limit=6"]
    ablate.run(*ablate.parse_args(argv), argv=argv)
    table = (out / "ablation.md").read_text()
    for label, _ in ablate.VARIANTS.values():
        assert f"| {label} |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]) == set(ablate.VARIANTS)
    assert results["per_seed"]["vtlmm"]["0"]["pope"]["n"] == 6
    for v in ("control", "vtlmm", "pif"):
        assert os.path.exists(out / "seed0" / f"stage4_{v}" / "final" / "model.safetensors")
    cfg = json.loads((out / "seed0" / "stage4_pif" / "final" / "config.json").read_text())["nanovt"]
    assert cfg["pseudo_image_features"] is True  # pif answers from X_p too
    train_cfg = json.loads((out / "seed0" / "stage4_control" / "train_config.json").read_text())
    assert train_cfg["vm_loss"] is False and train_cfg["init_from"].endswith(os.path.join("stage3", "final"))
    times = json.loads((out / "times.json").read_text())
    assert len(times) == 1 + 3 + 3 + 4  # stage 0, I-III, three stage IVs, four evaluations
    capsys.readouterr()
    ablate.run(*ablate.parse_args(argv), argv=argv)  # resumed: nothing left to do
    assert " steps -> " not in capsys.readouterr().out  # no stage trained again
    assert json.loads((out / "times.json").read_text()) == times


def test_demo_config_never_writes_into_the_demos_out_dir(monkeypatch, tmp_path):
    """`python shapes_ablate.py configs/shapes.py` (a relative path) goes to out/ablate/shapes, as the bare
    `python shapes_ablate.py` does, not into train.py's out/shapes; any other config to out/ablate/<its name>."""
    monkeypatch.chdir(ablate.ROOT)
    for argv in ([], ["configs/shapes.py"], ["./configs/shapes.py"], [os.path.join(ablate.ROOT, "configs", "shapes.py")]):
        cfg, seeds = ablate.parse_args(argv + ["--seeds=0"])
        assert cfg.out_dir == os.path.join("out", "ablate", "shapes"), argv
        assert seeds == [0]
    for name in ("shapes_x2", "shapes_v3"):  # train.py writes these to out/<name>
        cfg, _ = ablate.parse_args([f"configs/{name}.py"])
        assert cfg.out_dir == os.path.join("out", "ablate", name) != train.load_config([f"configs/{name}.py"]).out_dir
    cfg, _ = ablate.parse_args(["configs/shapes.py", f"--out_dir={tmp_path}"])
    assert cfg.out_dir == str(tmp_path)
