"""weights.py's name maps against the names transformers gives the same models (the reference), strictness
by set difference, invert, the print command, and the one weight initialisation. Tiny configs, CPU."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import weights
from hf_tiny import save_new_layout, save_original_llava, tiny_llava, tiny_llava_config
from model import PRESETS, VTLMM, DecoderConfig, VisionConfig, VTLMMConfig, init_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nanovt_cfg(text):
    """The VTLMMConfig of hf_tiny's models, written out by hand from tiny_llava_config's numbers."""
    return VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=3, heads=4, mlp=96),
                       decoder=DecoderConfig(vocab_size=256, dim=64, layers=2, heads=4,
                                             kv_heads=4 if text == "llama" else 2, hidden=128))


def vtlmm_names(cfg):
    with torch.device("meta"):
        return {n for n, _ in VTLMM(cfg).named_parameters()}


def clip_model_keys():
    """transformers' CLIPModel (the layout openai/clip-vit-large-patch14-336 is released in): every key."""
    from transformers import CLIPConfig, CLIPModel
    vc = tiny_llava_config().vision_config.to_dict()
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return set(CLIPModel(CLIPConfig(vision_config=vc, text_config=tc, projection_dim=16)).state_dict())


def check_map(names, reference, nanovt):
    """A map is right when its checkpoint names are the reference's, its nanoVT names are the model's
    and no two checkpoint names share a nanoVT name."""
    assert set(names) == set(reference), (sorted(set(names) ^ set(reference))[:5])
    assert set(names.values()) == set(nanovt), (sorted(set(names.values()) ^ set(nanovt))[:5])
    assert len(set(names.values())) == len(names)


@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_llava_hf_maps_are_transformers_names(text, tmp_path):
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(tiny_llava_config(text)).eval()
    cfg = nanovt_cfg(text)
    ours = vtlmm_names(cfg) - {"vm_head.weight"}  # transformers' model has no VM head
    # new layout, as transformers 5 holds it in memory (the tower without vision_model.)
    check_map(weights.llava_hf_names(cfg, tower="model.vision_tower."), hf.state_dict(), ours)
    # old layout, as transformers 5 saves it
    saved = load_file(os.path.join(save_new_layout(hf, str(tmp_path / "saved")), "model.safetensors"))
    check_map(weights.llava_hf_old_names(cfg, tower="vision_tower."), saved, ours)
    # the default towers (llava-hf's releases, transformers 4.52-4.57): CLIPModel's vision_model.* names
    clip = {k for k in clip_model_keys() if k.startswith("vision_model.")}
    old = {k for k in saved if not k.startswith("vision_tower.")} | {"vision_tower." + k for k in clip}
    check_map(weights.llava_hf_old_names(cfg), old, ours)
    new = {k for k in hf.state_dict() if not k.startswith("model.vision_tower.")} | \
          {"model.vision_tower." + k for k in clip}
    check_map(weights.llava_hf_names(cfg), new, ours)


def test_clip_maps_are_transformers_names():
    from transformers import CLIPVisionModel
    vis = nanovt_cfg("llama").vision
    ours = {n for n in vtlmm_names(nanovt_cfg("llama")) if n.startswith("vision.")}
    released = clip_model_keys()
    names = weights.clip_names(vis)
    check_map(names, {k for k in released if k.startswith("vision_model.")}, ours)
    # the text half of a CLIPModel is exactly what `ignored` skips
    assert {k for k in released if weights.ignored(k)} == released - set(names)
    check_map(weights.clip_names(vis, ""), CLIPVisionModel(tiny_llava_config().vision_config).state_dict(), ours)


@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_llm_map_is_transformers_names(text):
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_config(tiny_llava_config(text).text_config)
    assert type(llm).__name__ == ("LlamaForCausalLM" if text == "llama" else "MistralForCausalLM")
    cfg = nanovt_cfg(text)
    ours = {n for n in vtlmm_names(cfg) if n.startswith(("decoder.", "mm_head."))}
    check_map(weights.llm_names(cfg.decoder), llm.state_dict(), ours)


def test_original_llava_map_is_its_module_names():
    """LLaVA-1.5's LlavaLlamaForCausalLM is a LlamaForCausalLM whose model holds mm_projector (an
    nn.Sequential(Linear, GELU, Linear)) and vision_tower (a wrapper whose .vision_tower is a CLIPVisionModel,
    named vision_model.* as released); VW-LMM adds vm_head, an nn.Linear, at the top."""
    from transformers import AutoModelForCausalLM
    cfg = nanovt_cfg("llama")
    llm = set(AutoModelForCausalLM.from_config(tiny_llava_config("llama").text_config).state_dict())
    projector = {"model.mm_projector." + k for k in torch.nn.Sequential(
        torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).state_dict()}
    tower = {"model.vision_tower.vision_tower." + k for k in clip_model_keys() if k.startswith("vision_model.")}
    ours = vtlmm_names(cfg)
    check_map(weights.llava_names(cfg), llm | projector | {"vm_head.weight"},
              {n for n in ours if not n.startswith("vision.")})
    check_map(weights.llava_names(cfg, tower=True, vm_head=False), llm | projector | tower, ours - {"vm_head.weight"})


def test_nanovt_map_is_what_save_pretrained_writes(tmp_path):
    cfg = nanovt_cfg("mistral")
    torch.manual_seed(0)
    VTLMM(cfg).save_pretrained(str(tmp_path))
    check_map(weights.nanovt_names(cfg), load_file(str(tmp_path / "model.safetensors")), vtlmm_names(cfg))


def test_invert_round_trips_every_layout():
    cfg = VTLMMConfig(vision=PRESETS["clip-vit-l14-336"], decoder=PRESETS["mistral-7b-v0.1"])
    for layout, make in weights.LAYOUTS.items():
        names = make(cfg)
        inverse = weights.invert(names)
        assert weights.invert(inverse) == names, layout
        assert all(names[inverse[n]] == n for n in inverse), layout
    with pytest.raises(ValueError, match="cannot be inverted"):
        weights.invert({"a.weight": "x", "b.weight": "x"})


def test_missing_and_unexpected_keys_are_both_named(tmp_path):
    hf = tiny_llava("llama", layers=1)
    src = save_new_layout(hf, str(tmp_path / "src"))
    sd = load_file(os.path.join(src, "model.safetensors"))
    gone = "language_model.model.layers.0.self_attn.v_proj.weight"
    del sd[gone]
    sd["language_model.model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    bad = tmp_path / "bad"
    os.makedirs(bad)
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(KeyError) as e:
        weights.from_pretrained(str(bad))
    msg = str(e.value)
    assert "1 missing key 'language_model.model.layers.0.self_attn.v_proj.weight'" in msg
    assert "decoder.blocks.0.attn.v.weight" in msg  # the parameter it would have filled
    assert "1 unexpected key 'language_model.model.layers.0.self_attn.rotary.weight'" in msg
    assert str(bad) in msg
    # a config that says more layers than the file holds: every key of the missing block is counted
    names = weights.llava_hf_old_names(nanovt_cfg("llama"), tower="vision_tower.")  # 2 decoder layers
    with pytest.raises(KeyError, match=r"9 missing keys 'language_model\.model\.layers\.1\..*and 4 more; "
                                       r"0 unexpected keys"):
        weights.check_names(names, weights.WeightFiles(src))


def run_print(*args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "weights.py"), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def main_lines(capsys, *args):
    """The print command run in this process (run_print starts a new one: slower on 2 cores)."""
    weights.main(list(args))
    return capsys.readouterr().out.splitlines()


def test_print_command_for_a_layout(capsys):
    lines = run_print("--layout", "llava-hf", "--preset", "vicuna-7b-v1.5")
    n = len(vtlmm_names(VTLMMConfig(vision=PRESETS["clip-vit-l14-336"], decoder=PRESETS["vicuna-7b-v1.5"]))) - 1
    assert lines[0] == f"# layout llava-hf, vicuna-7b-v1.5: {n} tensors" and len(lines) == n + 1
    rows = [line.split() for line in lines[1:]]
    assert ["model.language_model.layers.31.mlp.down_proj.weight", "decoder.blocks.31.mlp.down.weight"] in rows
    assert ["model.vision_tower.vision_model.encoder.layers.23.self_attn.out_proj.bias",
            "vision.blocks.23.attn.o.bias"] in rows
    inverted = [line.split() for line in main_lines(capsys, "--layout", "llava-hf", "--invert")[1:]]
    assert sorted(inverted) == sorted([b, a] for a, b in rows)


def test_print_command_for_a_checkpoint(tmp_path, capsys):
    """An original-LLaVA directory with its CLIP tower elsewhere: two files, two maps, every tensor listed."""
    hf = tiny_llava("llama", layers=1)
    clip = str(tmp_path / "clip")
    d = save_original_llava(hf, str(tmp_path / "llava"), clip)
    lines = main_lines(capsys, d)
    heads = [i for i, line in enumerate(lines) if line.startswith("# ")]
    assert len(heads) == 2 and lines[heads[1]].startswith(f"# {clip}")
    listed = {line.split()[0] for line in lines if not line.startswith("# ")}
    in_files = set(load_file(os.path.join(d, "model.safetensors"))) | \
        {k for k in load_file(os.path.join(clip, "model.safetensors")) if not weights.ignored(k)}
    assert listed == in_files


def test_one_initialisation_rule():
    """Norm weights 1, biases 0, all else N(0, 0.02^2); `names` touches only those parameters."""
    torch.manual_seed(0)
    m = VTLMM(nanovt_cfg("llama"))
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            assert torch.all(p == 0), n
        elif "norm" in n:
            assert torch.all(p == 1), n
        elif p.numel() > 1000:
            assert 0.017 < p.std().item() < 0.023, n
    before = {n: p.clone() for n, p in m.named_parameters()}
    init_weights(m, std=1.0, names={"adapter.fc1.weight", "adapter.fc1.bias"})
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"adapter.fc1.weight"}  # the bias was 0 and is drawn as 0 again
    assert 0.9 < m.adapter.fc1.weight.std().item() < 1.1
