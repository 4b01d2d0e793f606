"""Tiny random reference models built with transformers (the reference implementation), saved as
safetensors in the layouts nanoVT reads. Only tests and bench/vs_transformers.py import this."""

import json
import os

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = 250  # inside the tiny vocabulary, as llava-hf's <image> is


def tiny_llava_config(text="llama", vocab=256, image_size=32, patch=8, sliding_window=None, layers=2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if text == "llama":
        tc = LlamaConfig(num_key_value_heads=4, rope_theta=10000.0, **common)
    else:  # grouped-query attention and a sliding window, as Mistral v0.1
        tc = MistralConfig(num_key_value_heads=2, rope_theta=1e6, sliding_window=sliding_window, **common)
    vc = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=patch, projection_dim=32)
    return LlavaConfig(text_config=tc, vision_config=vc, image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=False)


def tiny_llava(text="llama", seed=0, **kw):
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = tiny_llava_config(text, **kw)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so parity tests see them
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_new_layout(model, path, max_shard_size=None):
    """transformers 5 writes the new layout (model.language_model.*, lm_head)."""
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def save_old_layout(model, path):
    """The layout llava-hf checkpoints had before transformers 4.52 (language_model.model.* ...)."""
    save_new_layout(model, path)
    sd = load_file(os.path.join(path, "model.safetensors"))
    old = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model."):
            k = k[len("model."):]
        old[k] = v
    save_file(old, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def save_original_llava(model, path, clip_dir, vm_head=None):
    """Original LLaVA / VW-LMM layout: LLaMA keys at the top, mm_projector.0/2, CLIP tower elsewhere."""
    from transformers import CLIPVisionModel
    os.makedirs(path, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            out["model.mm_projector.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2."):
            out["model.mm_projector.2." + k.rsplit(".", 1)[1]] = v
        elif k == "lm_head.weight":
            out[k] = v
    if vm_head is not None:
        out["vm_head.weight"] = vm_head
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    tc = model.config.text_config.to_dict()
    cfg = {k: tc[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                              "max_position_embeddings", "hidden_act")}
    cfg.update(model_type="llava_" + tc["model_type"], architectures=["LlavaLlamaForCausalLM"],
               rope_theta=tc["rope_parameters"]["rope_theta"], sliding_window=tc.get("sliding_window"),
               mm_vision_tower=clip_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    # the CLIP tower as its own CLIPVisionModel directory
    # as the released openai/clip-vit-large-patch14-336 (a CLIPModel): vision_model.* beside text_model.*
    clip = CLIPVisionModel(model.config.vision_config)
    clip.save_pretrained(clip_dir)  # for its config.json
    tower = {"vision_model." + k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    tower["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    tower["logit_scale"] = torch.zeros(())
    save_file(tower, os.path.join(clip_dir, "model.safetensors"), metadata={"format": "pt"})
    return path
