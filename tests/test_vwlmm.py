"""The VW-LMM authors' released checkpoints (github pengts/VW-LMM) as they are written: original
LLaVA layout, vm_head.weight beside lm_head.weight, the CLIP tower in its own directory named by
mm_vision_tower, and config.json from their LlavaConfig (model_type "llava", a subclass of
LlamaConfig or MistralConfig). Tiny random models; transformers is the reference for the logits."""

import json
import os

import pytest
import torch
from hf_tiny import IMAGE_TOKEN, save_original_llava, tiny_llava

import conversation
from conversation import render_conversation
import weights


def vw_config(hf, clip_dir, architecture):
    """config.json as the authors' release writes it (their LlavaConfig's to_dict plus LLaVA's mm_* fields)."""
    tc = hf.config.text_config.to_dict()
    cfg = {k: tc[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                              "hidden_act", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    cfg.update(_name_or_path="./checkpoints/vw-lmm-stage4", architectures=[architecture], model_type="llava",
               rope_theta=tc["rope_parameters"]["rope_theta"], torch_dtype="bfloat16", use_cache=True,
               transformers_version="4.34.0", freeze_mm_mlp_adapter=False, image_aspect_ratio="pad",
               mm_hidden_size=hf.config.vision_config.hidden_size, mm_projector_lr=None,
               mm_projector_type="mlp2x_gelu", mm_use_im_patch_token=False, mm_use_im_start_end=False,
               mm_vision_select_feature="patch", mm_vision_select_layer=-2, mm_vision_tower=clip_dir,
               tune_mm_mlp_adapter=False, use_mm_proj=True)
    if tc["model_type"] == "mistral":
        cfg["sliding_window"] = tc["sliding_window"]
    else:
        cfg.update(pretraining_tp=1, rope_scaling=None)
    return cfg


def vw_dir(tmp_path, hf, name, architecture):
    clip = str(tmp_path / "clip-vit-large-patch14-336")
    vm = torch.randn(hf.config.text_config.vocab_size, hf.config.text_config.hidden_size)
    d = save_original_llava(hf, str(tmp_path / name), clip, vm_head=vm)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(vw_config(hf, clip, architecture), f)
    return d, vm


def test_vw_mistral_loads_as_mistral_with_window_theta_gqa_and_template(tmp_path):
    hf = tiny_llava("mistral", sliding_window=7)
    d, vm = vw_dir(tmp_path, hf, "VW-LMM-Mistral-7b", "vwMistralForCausalLM")
    m = weights.from_pretrained(d).eval()
    dec = m.cfg.decoder
    assert (dec.kind, dec.sliding_window, dec.rope_theta, dec.kv_heads, dec.heads) == ("mistral", 7, 1e6, 2, 4)
    assert m.cfg.template == "vw_mistral" and not m.cfg.pseudo_image_features
    assert torch.equal(m.vm_head.weight, vm)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 30), generator=g)
    ids[:, 3:3 + 16] = IMAGE_TOKEN
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():  # the window (7 < 30 positions), theta and GQA all change these logits
        got = m(ids.masked_fill(ids == IMAGE_TOKEN, -200), px).logits
        want = hf(input_ids=ids, pixel_values=px).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("name,architecture,pif", [
    ("VW-LMM-Vicuna-pif-7b", "vwPifLlamaForCausalLM", True),
    ("vw-pif-checkpoint", "vwLlamaForCausalLM", True),   # the authors' loader keys on "pif" in the name
    ("VW-LMM-Vicuna-7b", "vwLlamaForCausalLM", False),
    ("renamed", "vwPifLlamaForCausalLM", True),
])
def test_pif_checkpoint_turns_pseudo_image_features_on(tmp_path, name, architecture, pif):
    hf = tiny_llava("llama")
    d, _ = vw_dir(tmp_path, hf, name, architecture)
    m = weights.from_pretrained(d)
    assert m.cfg.pseudo_image_features is pif
    assert m.cfg.decoder.kind == "llama" and m.cfg.template == "vicuna_v1"


def test_vw_mistral_template_renders_the_authors_style():
    turns = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}]
    assert render_conversation(turns, "vw_mistral") == \
        "[INST] <image>\nWhat is it? [/INST]A cat.</s>[INST] How many? [/INST]2</s>"
    assert render_conversation(turns[:3], "vw_mistral").endswith("</s>[INST] How many? [/INST]")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tiny_ckpt import make_checkpoint, make_world
    world = make_world(tmp_path_factory.mktemp("world"), n_images=20)
    return make_checkpoint(world, tmp_path_factory.mktemp("ckpt") / "c"), os.path.join(world, "images", "000019.png")


@pytest.mark.parametrize("script", ["sample", "eval"])
def test_template_can_be_overridden(ckpt, tmp_path, monkeypatch, script):
    import eval as evaluate
    import sample
    path, image = ckpt
    used = []
    real = render_conversation
    monkeypatch.setattr(conversation, "render_conversation", lambda turns, template, **kw: used.append(template) or
                        real(turns, template, **kw))
    for template in (None, "vw_mistral", "mistral_instruct"):
        used.clear()
        extra = ["--template", template] if template else []
        if script == "sample":
            sample.main(["--ckpt", path, "--image", image, "--prompt", "Hi?", "--max-new-tokens", "2", *extra])
        else:
            q = tmp_path / "q.jsonl"
            q.write_text(json.dumps({"question_id": 0, "image": image, "text": "Hi?"}) + "\n")
            evaluate.main(["--ckpt", path, "--questions", str(q), "--answers", str(tmp_path / f"a{template}.jsonl"),
                           "--max-new-tokens", "2", "--device", "cpu", *extra])
        assert used and set(used) == {template or "vicuna_v1"}  # configs/tiny.py trains vicuna_v1
