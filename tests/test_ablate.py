"""shapes_ablate.py end to end on the tiny setting: four variants per seed, a table, and a resume that trains nothing."""

import json
import os

import pytest

import shapes_ablate as ablate
import train
from errors import InputError
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
        cfg, seeds, _ = ablate.parse_args(argv + ["--seeds=0"])
        assert cfg.out_dir == os.path.join("out", "ablate", "shapes"), argv
        assert seeds == [0]
    for name in ("shapes_x2", "shapes_v3"):  # train.py writes these to out/<name>
        cfg, *_ = ablate.parse_args([f"configs/{name}.py"])
        assert cfg.out_dir == os.path.join("out", "ablate", name) != train.load_config([f"configs/{name}.py"]).out_dir
    cfg, *_ = ablate.parse_args(["configs/shapes.py", f"--out_dir={tmp_path}"])
    assert cfg.out_dir == str(tmp_path)


def test_ablation_from_a_pretrained_gguf_llm(tmp_path, monkeypatch):
    """The Table 5 of a real LLM (configs/shapes_smollm2.py), on a tiny GGUF: no stage 0, each seed's
    stage I starts from the GGUF and a fresh tower that the hook pretrains with that seed, every stage
    uses the GGUF's tokenizer, and only the variants asked for are trained and scored."""
    import shapes
    from gguf_tiny import tiny_llm, write_gguf
    world = make_world(tmp_path / "world", n_images=160)
    llm = str(write_gguf(tmp_path / "llm.gguf", tiny_llm("llama", vocab=288), "F32", tokenizer=True))
    pretrained = []
    # recorded, not run: the tiny tower's 4 x 4 grid does not pool into the world's 3 x 3 cells
    monkeypatch.setattr(shapes, "pretrain_vision", lambda model, cfg, d: pretrained.append(cfg.seed))
    out = tmp_path / "ablate"
    stages = str([{"stage": k, "lr": 3e-3} for k in (1, 2, 3, 4)])
    argv = ["--tiny", "--seeds=0,1", "--variants=lm,vtlmm", f"--hook.dir={world}", f"--out_dir={out}",
            "--hook.report_limit=4", "--hook.vision_epochs=0.05", "--hook.naming_images=2",
            f"--llm_path={llm}", f"--tokenizer={llm}", f"--stages={stages}"]
    ablate.run(*ablate.parse_args(argv), argv=argv)
    assert pretrained == [0, 1]  # one fresh tower per seed, before its stage I
    assert not (out / "stage0").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]) == {"lm", "vtlmm"} and set(results["per_seed"]["vtlmm"]) == {"0", "1"}
    assert not (out / "seed0" / "stage4_control").exists() and not (out / "seed0" / "stage4_pif").exists()
    for seed in (0, 1):
        s1 = json.loads((out / f"seed{seed}" / "stage1" / "train_config.json").read_text())
        assert s1["init_from"] == "" and s1["llm_path"] == llm and s1["tokenizer"] == llm and s1["seed"] == seed
        s4 = json.loads((out / f"seed{seed}" / "stage4_vtlmm" / "train_config.json").read_text())
        assert s4["tokenizer"] == llm and s4["init_from"].endswith(os.path.join(f"seed{seed}", "stage3", "final"))
    table = (out / "ablation.md").read_text()
    assert "| 3. VT-LMM: I-IV |" in table and "| 2. control" not in table
    assert "VM loss: VT-LMM - control" not in table  # a difference needs both of its variants
    times = json.loads((out / "times.json").read_text())
    assert len(times) == 2 * (3 + 1 + 2)  # per seed: stages I-III, one stage IV, two evaluations


def test_unknown_variant_is_refused():
    with pytest.raises(InputError, match="--variants: ppp; choose from lm, control, vtlmm, pif"):
        ablate.parse_args(["--tiny", "--variants=lm,ppp"])
