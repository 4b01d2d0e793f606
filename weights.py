"""
nanoVT weights: every checkpoint layout of docs/weights.md, read and written through explicit name maps.

A name map is an ordered dict {checkpoint name: nanoVT name} listing every tensor of one file for one
VTLMMConfig, block by block. Loading is strict by set difference: the names a map expects but a file
lacks are missing, the names a file holds but its map lacks are unexpected, and either stops the load
with an error that names both sets and the file. Export writes `invert(map)`. No tensor is permuted,
split or fused on the way in (HF's LLaMA stores q and k in the rotate-half order nanoVT's rope uses);
the one transform is on export, `placeholder_row`.

Print a map (one tensor a line):
    python weights.py --layout llava-hf --preset vicuna-7b-v1.5      # a layout, for a released shape
    python weights.py CHECKPOINT_DIR [--vision_path CLIP_DIR]       # what from_pretrained reads there

Contents: name maps → weight files → strict filling → sharded loading → configs from HF config.json →
from_pretrained / from_clip_and_llm / export_llava_hf → the print command. model.py does not import this
module (no circle): loading is `weights.from_pretrained(path)`, saving `model.save_pretrained(dir)`.
"""

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn

from configurator import check_config
from errors import InputError, InputKeyError
from model import IMAGE_TOKEN_ID, PRESETS, VTLMM, DecoderConfig, VisionConfig, VTLMMConfig, init_weights, local_rows

# ----------------------------------------------------------------------------------------------
# Name maps: {checkpoint name: nanoVT name}, every tensor written out, per layer


def clip_names(vis: VisionConfig, src="vision_model."):
    """HF CLIP's vision transformer, its names under `src` -> nanoVT's VisionEncoder (vision.*)."""
    names = {src + "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
             src + "embeddings.class_embedding": "vision.class_embedding",
             src + "embeddings.position_embedding.weight": "vision.pos_embed",
             src + "pre_layrnorm.weight": "vision.pre_norm.weight",  # sic: HF spells it "layrnorm"
             src + "pre_layrnorm.bias": "vision.pre_norm.bias"}
    for i in range(vis.layers):
        a, b = f"{src}encoder.layers.{i}.", f"vision.blocks.{i}."
        for w in ("weight", "bias"):
            names.update({a + "layer_norm1." + w: b + "norm1." + w,
                          a + "self_attn.q_proj." + w: b + "attn.q." + w,
                          a + "self_attn.k_proj." + w: b + "attn.k." + w,
                          a + "self_attn.v_proj." + w: b + "attn.v." + w,
                          a + "self_attn.out_proj." + w: b + "attn.o." + w,
                          a + "layer_norm2." + w: b + "norm2." + w,
                          a + "mlp.fc1." + w: b + "fc1." + w,
                          a + "mlp.fc2." + w: b + "fc2." + w})
    names.update({src + "post_layernorm.weight": "vision.post_norm.weight",  # loaded, unused (docs/weights.md)
                  src + "post_layernorm.bias": "vision.post_norm.bias"})
    return names


def llm_names(dec: DecoderConfig, src="model.", head="lm_head.weight"):
    """HF LlamaForCausalLM / MistralForCausalLM, the model under `src` and the head at `head` -> nanoVT's
    Decoder (decoder.*) and MM head."""
    names = {src + "embed_tokens.weight": "decoder.embed.weight"}
    for i in range(dec.layers):
        a, b = f"{src}layers.{i}.", f"decoder.blocks.{i}."
        names.update({a + "input_layernorm.weight": b + "attn_norm.weight",
                      a + "self_attn.q_proj.weight": b + "attn.q.weight",
                      a + "self_attn.k_proj.weight": b + "attn.k.weight",
                      a + "self_attn.v_proj.weight": b + "attn.v.weight",
                      a + "self_attn.o_proj.weight": b + "attn.o.weight",
                      a + "post_attention_layernorm.weight": b + "mlp_norm.weight",
                      a + "mlp.gate_proj.weight": b + "mlp.gate.weight",
                      a + "mlp.up_proj.weight": b + "mlp.up.weight",
                      a + "mlp.down_proj.weight": b + "mlp.down.weight"})
    names.update({src + "norm.weight": "decoder.norm.weight", head: "mm_head.weight"})
    return names


def adapter_names(src, fc1, fc2):
    """The two Linear layers of LLaVA-1.5's mlp2x_gelu projector, named `fc1` and `fc2` under `src`."""
    return {f"{src}{fc1}.weight": "adapter.fc1.weight", f"{src}{fc1}.bias": "adapter.fc1.bias",
            f"{src}{fc2}.weight": "adapter.fc2.weight", f"{src}{fc2}.bias": "adapter.fc2.bias"}


def llava_hf_names(cfg: VTLMMConfig, tower="model.vision_tower.vision_model."):
    """transformers' LlavaForConditionalGeneration, new layout (transformers >= 4.52). The tower sits under
    model.vision_tower.vision_model. as 4.52-4.57 saved it, model.vision_tower. in transformers 5."""
    return {**clip_names(cfg.vision, tower),
            **adapter_names("model.multi_modal_projector.", "linear_1", "linear_2"),
            **llm_names(cfg.decoder, "model.language_model.", "lm_head.weight")}


def llava_hf_old_names(cfg: VTLMMConfig, tower="vision_tower.vision_model."):
    """LlavaForConditionalGeneration, old layout: llava-hf's released files (tower under
    vision_tower.vision_model.) and what transformers 5 saves (under vision_tower.)."""
    return {**clip_names(cfg.vision, tower),
            **adapter_names("multi_modal_projector.", "linear_1", "linear_2"),
            **llm_names(cfg.decoder, "language_model.model.", "language_model.lm_head.weight")}


def llava_names(cfg: VTLMMConfig, tower=False, vm_head=True):
    """Original LLaVA-1.5 (LlavaLlamaForCausalLM: a LLaMA with model.mm_projector, an nn.Sequential whose
    Linear layers are 0 and 2) and the VW-LMM checkpoints, which add vm_head.weight. The CLIP tower is in
    the file only if it was saved (`tower`); the releases name a CLIP directory instead."""
    names = {**llm_names(cfg.decoder, "model.", "lm_head.weight"), **adapter_names("model.mm_projector.", "0", "2")}
    if tower:
        names.update(clip_names(cfg.vision, "model.vision_tower.vision_tower.vision_model."))
    if vm_head:
        names["vm_head.weight"] = "vm_head.weight"
    return names


def nanovt_names(cfg: VTLMMConfig):
    """nanoVT's own checkpoints: every parameter under its own name."""
    with torch.device("meta"):
        return {n: n for n, _ in VTLMM(cfg).named_parameters()}


LAYOUTS = {  # the layouts the print command knows, each for a whole config
    "llava-hf": llava_hf_names,
    "llava-hf-old": llava_hf_old_names,
    "llava": llava_names,  # original LLaVA-1.5 and VW-LMM (printed as VW-LMM releases it: no tower, a VM head)
    "clip": lambda cfg: clip_names(cfg.vision),
    "llm": lambda cfg: llm_names(cfg.decoder),
    "nanovt": nanovt_names,
}

VM_HEAD_FILE = {"vm_head.weight": "vm_head.weight"}  # vm_head.safetensors, written beside an export


def invert(names):
    """{checkpoint name: nanoVT name} -> {nanoVT name: checkpoint name}, the direction export writes."""
    inverse = {b: a for a, b in names.items()}
    if len(inverse) != len(names):
        raise ValueError("a name map sends two checkpoint names to one nanoVT name: it cannot be inverted")
    return inverse


def tower_prefix(keys, base):
    """Where a CLIP tower's names start in a file: `base` + "vision_model." (as released, and as
    transformers < 5 saves it) or `base` alone (transformers 5 drops the inner vision_model.)."""
    return base + "vision_model." if any(k.startswith(base + "vision_model.") for k in keys) else base


def ignored(key):
    """Keys some released files carry that hold no parameter: buffers (rotary inverse frequencies, CLIP's
    position ids) and the text half of a CLIPModel."""
    return (key.endswith(("rotary_emb.inv_freq", "position_ids")) or key == "logit_scale"
            or key.startswith(("text_model.", "text_projection.", "visual_projection.")))


# What a load may leave to init_weights, by where it reads from (every other parameter must be in a file):
ADAPTER = ("adapter.fc1.weight", "adapter.fc1.bias", "adapter.fc2.weight", "adapter.fc2.bias")
MAY_START_FRESH = {
    "nanovt": (),                          # our own checkpoints hold every parameter
    "released": ("vm_head.weight",),       # a LLaVA checkpoint has no VM head: stage III trains it
    "clip+llm": ADAPTER + ("vm_head.weight",),  # stage I starts from CLIP and an LLM
    "llm": ("vision.",) + ADAPTER + ("vm_head.weight",),  # an LLM alone (a GGUF file): no tower in it
}


# ----------------------------------------------------------------------------------------------
# Weight files


class WeightFiles:
    """The tensors of a checkpoint directory or file: single safetensors, a sharded index, or .bin."""

    def __init__(self, path, prefix="model"):
        self.path = path
        self.where = {}  # key -> file
        if os.path.isfile(path):
            files = [path]
        else:
            index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")] or \
                    [f for f in os.listdir(path) if f.endswith(".bin.index.json")]
            if index:
                ipath = os.path.join(path, sorted(index)[0])
                with open(ipath) as f:
                    wmap = json.load(f)["weight_map"]
                for key, fname in wmap.items():
                    self.where[key] = os.path.join(path, fname)
                for fname in sorted(set(wmap.values())):
                    if not os.path.exists(os.path.join(path, fname)):
                        raise InputError(f"{ipath} names shard {fname}, which is missing")
                files = []
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path)
                               if f.endswith(".safetensors") and f.startswith(prefix))
                if not files:
                    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                                   if f.endswith(".bin") and f.startswith("pytorch_model"))
                if not files:
                    raise InputError(f"no {prefix}*.safetensors, index or pytorch_model*.bin in {path}")
        for fpath in files:
            for key in self._keys(fpath):
                self.where[key] = fpath
        self._open = {}

    def size(self):
        """The bytes of the files the tensors are in."""
        return sum(os.path.getsize(f) for f in set(self.where.values()))

    @staticmethod
    def _keys(fpath):
        if fpath.endswith(".bin"):
            return list(torch.load(fpath, map_location="cpu", weights_only=True, mmap=True).keys())
        from safetensors import safe_open
        try:
            with safe_open(fpath, "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise InputError(f"cannot read {fpath}: {e} (truncated or not a safetensors file?)") from e

    def get(self, key):
        fpath = self.where[key]
        if _LAZY is not None:  # lazy_loading: the shape only, nothing read
            if fpath.endswith(".bin"):
                return torch.empty(torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)[key].shape,
                                   device="meta")
            from safetensors import safe_open
            with safe_open(fpath, "pt") as f:
                return torch.empty(f.get_slice(key).get_shape(), device="meta")
        if fpath not in self._open:
            if fpath.endswith(".bin"):
                self._open[fpath] = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
            else:
                from safetensors import safe_open
                self._open[fpath] = safe_open(fpath, "pt")
        try:
            h = self._open[fpath]
            return h[key] if isinstance(h, dict) else h.get_tensor(key)
        except Exception as e:
            raise InputError(f"cannot read tensor {key} from {fpath}: {e} (truncated file?)") from e

    def read_rows(self, key, start, end):
        """Rows start:end (dim 0) of a tensor, reading only those bytes from a safetensors file."""
        fpath = self.where[key]
        if fpath.endswith(".bin"):  # memory-mapped: only the rows touched are paged in
            return torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)[key][start:end]
        from safetensors import safe_open
        with safe_open(fpath, "pt") as f:
            sl = f.get_slice(key)
            return sl[start:end] if len(sl.get_shape()) else sl[:]


# ----------------------------------------------------------------------------------------------
# Strict filling


def _few(keys, names=None, n=5):
    """The first n of a set of keys, quoted, each with its nanoVT name when `names` maps it."""
    shown = [f"'{k}'" + (f" (nanoVT {names[k]})" if names and k in names else "") for k in sorted(keys)[:n]]
    return ", ".join(shown) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _count(keys, what):
    return f"{len(keys)} {what} key" + ("" if len(keys) == 1 else "s")


def check_names(names, files: WeightFiles):
    """Strictness as a set difference: the file must hold exactly the tensors its map lists (keys that
    hold no parameter, `ignored`, aside). Raises KeyError naming the missing and the unexpected keys."""
    found = {k for k in files.where if not ignored(k)}
    missing, unexpected = set(names) - found, found - set(names)
    if missing or unexpected:
        raise InputKeyError(f"{files.path} does not hold the tensors this config expects: {_count(missing, 'missing')} "
                       f"{_few(missing, names)}; {_count(unexpected, 'unexpected')} {_few(unexpected)} (a "
                       f"config.json that does not describe these files: another number of layers, another layout?)")


def fill(model, files: WeightFiles, names, dtype):
    """Copy each tensor `names` lists from `files` into the nanoVT parameter it names, in `dtype` (the
    model is on the meta device: nothing else is allocated). The names are checked first (check_names),
    each shape before its tensor is copied. Returns the set of nanoVT names filled."""
    check_names(names, files)
    params = dict(model.named_parameters())
    for key, name in names.items():
        if name not in params:
            raise KeyError(f"the name map sends '{key}' to '{name}', which this model has not")
        t, p = files.get(key), params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise InputError(f"shape mismatch for '{key}' in {files.where[key]}: file {tuple(t.shape)}, "
                             f"model '{name}' expects {tuple(p.shape)}")
        _set_param(model, name, t.to(dtype))
        if _LAZY is not None:
            _LAZY.where[name] = (files, key)
    return set(names.values())


def _set_param(model, name, tensor):
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, pname, nn.Parameter(tensor, requires_grad=getattr(mod, pname).requires_grad))


def _finish(model, filled, dtype, device, where, fresh_ok):
    """Every parameter filled, or one `fresh_ok` allows: those are drawn by init_weights (lazy loading:
    later, by load_shards, from the RNG state recorded now). Then to `device`."""
    params = dict(model.named_parameters())
    fresh = [n for n in params if n not in filled]
    prefixes = tuple(p for p in fresh_ok if p.endswith("."))  # "vision.": the whole module
    missing = [n for n in fresh if n not in fresh_ok and not n.startswith(prefixes)]
    if missing:
        raise InputKeyError(f"{where}: missing {len(missing)} parameter(s), e.g. {missing[:5]}")
    for n in fresh:
        _set_param(model, n, torch.empty(params[n].shape, dtype=dtype, device="meta" if _LAZY else "cpu"))
    if _LAZY is not None:
        _LAZY.rng = torch.get_rng_state()
        return model
    init_weights(model, names=set(fresh))
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# Sharded loading: each rank reads only its own rows of each tensor (never a whole model per rank)


class ShardSources:
    """What `lazy_loading` records: parameter name -> (WeightFiles, key), and the RNG state that the
    fresh (not loaded) parameters are to be drawn with, as a full load would."""

    def __init__(self):
        self.where, self.rng = {}, None


_LAZY: Optional[ShardSources] = None


@contextlib.contextmanager
def lazy_loading():
    """Inside it, from_pretrained / from_clip_and_llm read no tensor: they check every key and shape as
    usual and return the model on the meta device; the ShardSources this yields says where each
    parameter lives. Shard the model (fully_shard), `to_empty` it, then `load_shards` fills it."""
    global _LAZY
    _LAZY = ShardSources()
    try:
        yield _LAZY
    finally:
        _LAZY = None


@torch.no_grad()
def load_shards(model, sources: ShardSources):
    """Fill a model built under `lazy_loading`, sharded and materialised (to_empty): each rank reads the
    rows of its shard of each tensor (safetensors slices); fresh parameters are drawn by init_weights from
    the recorded RNG state (each whole, then cut to this rank's rows), so the result is bit-equal to a
    full load."""
    for name, p in model.named_parameters():
        if name in sources.where:
            files, key = sources.where[name]
            local, start = local_rows(p)
            local.copy_(files.read_rows(key, start, start + local.shape[0]) if p.dim() else files.get(key))
    if sources.rng is not None:
        torch.set_rng_state(sources.rng)
    init_weights(model, names={n for n, _ in model.named_parameters() if n not in sources.where})
    return model


# ----------------------------------------------------------------------------------------------
# Configs from HF config.json


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


# HF defaults for fields a config.json may leave out (transformers writes only non-defaults).
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                  sliding_window=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32, layer_norm_eps=1e-5),
    "llava_vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, layer_norm_eps=1e-5),  # LlavaConfig's default tower
}


def _is_mistral(c):
    """A Mistral decoder: model_type "mistral" / "llava_mistral", or (VW-LMM's release: model_type
    "llava", a LlavaConfig subclassing MistralConfig) an architecture named Mistral."""
    archs = c.get("architectures") or []
    return "mistral" in str(c.get("model_type", "llama")) or any("mistral" in str(a).lower() for a in archs)


def decoder_config_from_hf(c, where):
    if not isinstance(c, dict):
        raise InputError(f"{where}: the decoder's settings must be a JSON object, got a JSON {type(c).__name__}")
    kind = "mistral" if _is_mistral(c) else "llama"
    c = {**_HF_DEFAULTS[kind], **c}
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise InputError(f"{where}: rope scaling {rope} is not supported")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise InputError(f"{where}: attention/MLP biases are not supported")
    if c.get("tie_word_embeddings"):
        raise InputError(f"{where}: tied input/output embeddings are not supported")
    heads = c["num_attention_heads"]
    return DecoderConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], layers=c["num_hidden_layers"],
                         heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                         hidden=c["intermediate_size"], eps=c["rms_norm_eps"], rope_theta=float(theta),
                         sliding_window=c.get("sliding_window") if kind == "mistral" else None,
                         max_seq_len=c["max_position_embeddings"], kind=kind,
                         head_dim=c.get("head_dim") if c.get("head_dim") not in (None, c["hidden_size"] // heads)
                         else None)


def vision_config_from_hf(c, where, select_layer=-2, defaults="clip_vision_model"):
    if not isinstance(c, dict):
        raise InputError(f"{where}: the vision tower's settings must be a JSON object, got a JSON {type(c).__name__}")
    c = {**_HF_DEFAULTS[defaults], **c}
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise InputError(f"{where}: vision hidden_act {c['hidden_act']!r} is not supported (quick_gelu only)")
    return VisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp=c["intermediate_size"],
                        eps=c["layer_norm_eps"], select_layer=select_layer)


def _template_for(dec: DecoderConfig, c=None):
    """The chat template a checkpoint was trained with: the VW-LMM authors' Mistral model
    (vwMistralForCausalLM) uses their own "mistral" style (vw_mistral), other Mistral decoders
    LLaVA's mistral_instruct, LLaMA / Vicuna decoders vicuna_v1 (docs/data.md §Templates, docs/weights.md §VW-LMM)."""
    if any(str(a).startswith("vwMistral") for a in (c or {}).get("architectures") or []):
        return "vw_mistral"
    return "mistral_instruct" if dec.kind == "mistral" else "vicuna_v1"


def _is_pif(c, path):
    """VW-LMM's pif checkpoint (pseudo image features, Eq. 8): architectures vwPifLlamaForCausalLM,
    or a VW-LMM checkpoint (a vw* architecture) with "pif" in its directory's name, which is what
    the authors' loader keys on."""
    archs = [str(a) for a in c.get("architectures") or []]
    name = os.path.basename(os.path.normpath(path))
    return any(a.startswith("vwPif") for a in archs) or (any(a.startswith("vw") for a in archs) and "pif" in name)


def _hf_dict(path):
    """A Hugging Face config.json that must hold a JSON object."""
    c = _read_json(path)
    if not isinstance(c, dict):
        raise InputError(f"{path}: expected a JSON object of settings, got a JSON {type(c).__name__}")
    return c


def _clip_config(path):
    """Vision config from a CLIPModel or CLIPVisionModel directory's config.json."""
    c = _hf_dict(os.path.join(path, "config.json"))
    return vision_config_from_hf(c.get("vision_config", c), os.path.join(path, "config.json"))


def _llava_hf_config(c, cpath):
    """VTLMMConfig of a llava-hf directory (both layouts carry text_config / vision_config)."""
    if c.get("vision_feature_select_strategy", "default") != "default":
        raise InputError(f"{cpath}: vision_feature_select_strategy must be 'default' (class token dropped)")
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise InputError(f"{cpath}: vision_feature_layer {layer} (several layers) is not supported")
    dec = decoder_config_from_hf(c.get("text_config") or {}, cpath)
    vis = vision_config_from_hf(c.get("vision_config") or {}, cpath, layer, defaults="llava_vision")
    extras = c.get("nanovt_extras", {})  # written by export_llava_hf
    image_token = c.get("image_token_index", c.get("image_token_id", 32000))
    return VTLMMConfig(vision=vis, decoder=dec, image_token_id=image_token,
                       template=extras.get("template", _template_for(dec)),
                       pseudo_image_features=extras.get("pseudo_image_features", False))


def _llava_config(c, cpath, path, vision_path, tower_inside):
    """(VTLMMConfig, CLIP directory or None) of an original LLaVA / VW-LMM directory: LLaMA or Mistral
    fields at the top, LLaVA's mm_* fields beside them, the tower usually in the CLIP directory that
    mm_vision_tower (or `vision_path`) names."""
    dec = decoder_config_from_hf(c, cpath)
    layer = c.get("mm_vision_select_layer", -2)
    if c.get("mm_vision_select_feature", "patch") != "patch":
        raise InputError(f"{cpath}: mm_vision_select_feature must be 'patch'")
    if c.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise InputError(f"{cpath}: mm_projector_type {c.get('mm_projector_type')!r} is not supported")
    vpath = None
    if tower_inside:
        vis = vision_config_from_hf(c.get("vision_config") or {}, cpath, layer, defaults="llava_vision")
    else:
        vpath = vision_path or c.get("mm_vision_tower")
        if not vpath or not os.path.isdir(vpath):
            raise InputError(f"{path} holds no vision tower and its config names {c.get('mm_vision_tower')!r}; "
                                    f"download that CLIP model and pass vision_path=DIR")
        vis = replace(_clip_config(vpath), select_layer=layer)
    cfg = VTLMMConfig(vision=vis, decoder=dec, image_token_id=c.get("image_token_index", IMAGE_TOKEN_ID),
                      template=_template_for(dec, c), pseudo_image_features=_is_pif(c, path))
    return cfg, vpath


# ----------------------------------------------------------------------------------------------
# GGUF LLMs: llama.cpp's single-file format (SmolLM2, Vicuna, Mistral), docs/weights.md §GGUF


def gguf_names(dec: DecoderConfig):
    """A GGUF LLaMA-architecture file's tensors -> nanoVT's Decoder and MM head. `output.weight` is the head;
    a file with tied embeddings has none, and GGUFWeights then serves token_embd under that name."""
    names = {"token_embd.weight": "decoder.embed.weight"}
    for i in range(dec.layers):
        a, b = f"blk.{i}.", f"decoder.blocks.{i}."
        names.update({a + "attn_norm.weight": b + "attn_norm.weight",
                      a + "attn_q.weight": b + "attn.q.weight",
                      a + "attn_k.weight": b + "attn.k.weight",
                      a + "attn_v.weight": b + "attn.v.weight",
                      a + "attn_output.weight": b + "attn.o.weight",
                      a + "ffn_norm.weight": b + "mlp_norm.weight",
                      a + "ffn_gate.weight": b + "mlp.gate.weight",
                      a + "ffn_up.weight": b + "mlp.up.weight",
                      a + "ffn_down.weight": b + "mlp.down.weight"})
    names.update({"output_norm.weight": "decoder.norm.weight", "output.weight": "mm_head.weight"})
    return names


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's converter, which reorders the rows of q and k in each head from the rotate-half
    layout (first half of the rotary pairs, then the second) to interleaved pairs. Back to rotate-half,
    the layout of HF's LLaMA and nanoVT's apply_rope."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


class GGUFWeights:
    """A GGUF file's tensors behind WeightFiles' interface (where, get, read_rows): dequantized to float32
    on reading, q and k un-permuted, `output.weight` served from token_embd when the file ties them."""

    def __init__(self, path, dec: DecoderConfig, gfile=None):
        from gguf_file import read_gguf
        self.path, self.file = path, gfile or read_gguf(path)
        self.where = {k: path for k in self.file.tensors}
        self.alias = {}
        if "output.weight" not in self.where and "token_embd.weight" in self.where:
            self.where["output.weight"] = path
            self.alias["output.weight"] = "token_embd.weight"
        self.heads = {"attn_q": dec.heads, "attn_k": dec.kv_heads}

    def get(self, key):
        name = self.alias.get(key, key)
        if _LAZY is not None:
            return torch.empty(self.file.tensors[name].shape, device="meta")
        w = torch.from_numpy(self.file.tensor(name))
        kind = key.split(".")[-2] if key.count(".") >= 2 else ""
        return unpermute_qk(w, self.heads[kind]) if kind in self.heads else w

    def read_rows(self, key, start, end):
        return self.get(key)[start:end]


def _gguf_value(meta, key, where, kind=int, default=None):
    v = meta.get(key, default)
    if v is None:
        raise InputKeyError(f"{where}: the metadata has no {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v <= 0:
        raise InputError(f"{where}: {key} = {v!r} is not a positive number")
    return kind(v)


def decoder_config_from_gguf(g, where=None):
    """DecoderConfig of a GGUF LLM (a gguf_file.GGUFFile) from its `llama.*` metadata; anything nanoVT's
    decoder does not compute (another architecture, rope scaling, partial rotary) is refused by name."""
    m, where = g.meta, where or g.path
    arch = m.get("general.architecture")
    if arch != "llama":
        raise InputError(f"{where}: general.architecture {arch!r} is not supported (only 'llama': LLaMA, "
                         f"Vicuna, Mistral and SmolLM2 files say so)")
    scaling = m.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise InputError(f"{where}: llama.rope.scaling.type {scaling!r} is not supported")
    dim, heads = _gguf_value(m, "llama.embedding_length", where), _gguf_value(m, "llama.attention.head_count", where)
    kv = _gguf_value(m, "llama.attention.head_count_kv", where, default=heads)
    hd = _gguf_value(m, "llama.attention.key_length", where, default=dim // heads)
    if heads % kv or _gguf_value(m, "llama.rope.dimension_count", where, default=hd) != hd:
        raise InputError(f"{where}: {heads} heads over {kv} KV heads, or a rotary dimension other than the "
                         f"head's ({hd}): not supported")
    emb = g.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise InputKeyError(f"{where}: no 2-d tensor 'token_embd.weight'")
    name = f"{m.get('general.name', '')} {m.get('general.basename', '')}".lower()
    return DecoderConfig(vocab_size=emb.shape[0], dim=dim, layers=_gguf_value(m, "llama.block_count", where),
                         heads=heads, kv_heads=kv, hidden=_gguf_value(m, "llama.feed_forward_length", where),
                         eps=_gguf_value(m, "llama.attention.layer_norm_rms_epsilon", where, float),
                         rope_theta=_gguf_value(m, "llama.rope.freq_base", where, float, 10000.0),
                         max_seq_len=_gguf_value(m, "llama.context_length", where, default=4096),
                         head_dim=hd if hd != dim // heads else None,
                         kind="mistral" if "mistral" in name else "llama")


def template_from_gguf(meta):
    """nanoVT's name for the chat template a GGUF carries: ChatML (SmolLM2), Mistral's [INST], else Vicuna's."""
    t = meta.get("tokenizer.chat_template") or ""
    if "<|im_start|>" in t:
        return "chatml"
    return "mistral_instruct" if "[INST]" in t else "vicuna_v1"


# A GGUF holds a language model only. Loaded alone (sample.py --ckpt FILE.gguf) the VTLMM gets this
# token-sized tower, which no image may go through (`llm_only`); stage I gives it CLIP or a trained tower.
NO_TOWER = VisionConfig(image_size=14, patch_size=14, width=8, layers=1, heads=1, mlp=8)


def _gguf_llm(path):
    """(DecoderConfig, template, GGUFWeights) of a GGUF LLM file; the name map waits for check_config."""
    from gguf_file import read_gguf
    g = read_gguf(path)
    dec = decoder_config_from_gguf(g)
    return dec, template_from_gguf(g.meta), GGUFWeights(path, dec, g)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint directory, loading, export


def read_checkpoint(path, vision_path=None, overrides=None):
    """What from_pretrained reads in `path`: (config, parts, kind). `parts` lists (WeightFiles, name map),
    one map per file (None for a nanoVT checkpoint: its own names, listed from the model _build makes,
    so a config is built once); the config is checked against sane bounds first (configurator.check_config);
    `kind` keys MAY_START_FRESH. The layout is told by config.json and the file's names, a GGUF LLM by
    its first bytes."""
    overrides = overrides or {}
    from gguf_file import is_gguf
    if is_gguf(path):  # an LLM alone
        dec, template, files = _gguf_llm(path)
        cfg = replace(VTLMMConfig(vision=NO_TOWER, decoder=dec, template=template), **overrides)
        check_config(cfg, path)  # before the name map: it lists every layer
        return cfg, [(files, gguf_names(cfg.decoder))], "llm"
    cpath = os.path.join(path, "config.json")
    c = _read_json(cpath)
    if not isinstance(c, dict):
        raise InputError(f"{cpath}: expected a JSON object of settings, got a JSON {type(c).__name__}")
    if "nanovt" in c:  # our own checkpoint: its names are the model's own, listed once the model is built
        files = WeightFiles(path)
        cfg = replace(VTLMMConfig.from_dict(c["nanovt"], f"{cpath}: nanovt", check=False), **overrides)
        check_config(cfg, f"{cpath}: nanovt", files.size())
        return cfg, [(files, None)], "nanovt"
    files = WeightFiles(path)
    keys = files.where
    llava_hf = any(k.startswith(("model.language_model.", "language_model.")) for k in keys)
    if c.get("text_config") is not None or llava_hf:
        cfg = replace(_llava_hf_config(c, cpath), **overrides)
        check_config(cfg, cpath)  # before the name maps: they list every layer
        if any(k.startswith("model.language_model.") for k in keys):
            parts = [(files, llava_hf_names(cfg, tower_prefix(keys, "model.vision_tower.")))]
        else:
            parts = [(files, llava_hf_old_names(cfg, tower_prefix(keys, "vision_tower.")))]
    else:  # original LLaVA / VW-LMM
        tower_inside = any(k.startswith("model.vision_tower.") for k in keys)
        cfg, vpath = _llava_config(c, cpath, path, vision_path, tower_inside)
        cfg = replace(cfg, **overrides)
        check_config(cfg, cpath)
        parts = [(files, llava_names(cfg, tower=tower_inside, vm_head="vm_head.weight" in keys))]
        if vpath:
            clip = WeightFiles(vpath)
            parts.append((clip, clip_names(cfg.vision, tower_prefix(clip.where, ""))))
    vm_path = os.path.join(path, "vm_head.safetensors")
    if os.path.exists(vm_path) and not any("vm_head.weight" in names.values() for _, names in parts):
        parts.append((WeightFiles(vm_path), VM_HEAD_FILE))
    return cfg, parts, "released"


def _build(cls, cfg, parts, dtype, device, where, kind):
    with torch.device("meta"):
        model = cls(cfg)
    filled = set()
    for files, names in parts:
        if names is None:  # a nanoVT checkpoint: every parameter under its own name (nanovt_names), from this model
            names = {n: n for n, _ in model.named_parameters()}
        filled |= fill(model, files, names, dtype)
    if kind == "released" and "vm_head.weight" not in filled:
        print(f"note: {where} has no VM head; it starts from random weights (train it in stage III)")
    model = _finish(model, filled, dtype, device, where, MAY_START_FRESH[kind])
    model.llm_only = kind == "llm"  # no trained vision tower: sample.py refuses images
    return model


def from_pretrained(path, dtype=torch.float32, device="cpu", vision_path=None, cls=VTLMM, **overrides):
    """A VTLMM from a nanoVT checkpoint, a llava-hf directory (old or new layout), an original LLaVA /
    VW-LMM directory (CLIP tower from `vision_path` or config's mm_vision_tower), each a single file or a
    sharded index, through the name maps above. Strict: every parameter filled, every key consumed, every
    shape checked. The model is built on the meta device and filled in `dtype`, no random copy first.
    `overrides`: VTLMMConfig fields to set (pseudo_image_features, template)."""
    cfg, parts, kind = read_checkpoint(path, vision_path, overrides)
    return _build(cls, cfg, parts, dtype, device, path, kind)


def from_clip_and_llm(clip_path, llm_path, dtype=torch.float32, device="cpu", vision=None, cls=VTLMM, **overrides):
    """Stage I start: CLIP's directory and an LLM (an HF directory or a GGUF file); adapter and VM head fresh.
    Without `clip_path` the tower is a fresh one of shape `vision` (a VisionConfig: the toy world's,
    pretrained by its hook)."""
    from gguf_file import is_gguf
    if is_gguf(llm_path):
        dec, template, llm = _gguf_llm(llm_path)
    else:
        dec = decoder_config_from_hf(_hf_dict(os.path.join(llm_path, "config.json")), llm_path)
        template, llm = _template_for(dec), WeightFiles(llm_path)
    if not clip_path and vision is None:
        raise InputError(f"{llm_path} is an LLM alone: give clip_path (a CLIP directory) or the tower's shape")
    vis = _clip_config(clip_path) if clip_path else vision
    cfg = replace(VTLMMConfig(vision=vis, decoder=dec, template=template), **overrides)
    where = f"{clip_path} + {llm_path}" if clip_path else llm_path
    check_config(cfg, where)
    parts = [(llm, gguf_names(cfg.decoder) if is_gguf(llm_path) else llm_names(cfg.decoder))]
    if clip_path:
        clip = WeightFiles(clip_path)
        parts.insert(0, (clip, clip_names(cfg.vision, tower_prefix(clip.where, ""))))
    model = _build(cls, cfg, parts, dtype, device, where, "clip+llm" if clip_path else "llm")
    model.llm_only = False  # the tower is the caller's to train (the toy world's hook pretrains it)
    return model


def placeholder_row(sd, cfg: VTLMMConfig):
    """Export's one tensor transform. transformers looks the image placeholder up in the embedding; nanoVT's
    sentinel (-200) is no row of it, so the export gives the embedding, the MM head and the VM head one
    extra, all-zero row for it (its logit is then 0: compare logits and visual-token distributions over
    the first C columns), and the model loads back with a vocabulary of C + 1. Returns (placeholder id,
    vocabulary size) as written."""
    vocab, image_token = cfg.decoder.vocab_size, cfg.image_token_id
    if 0 <= image_token < vocab:
        return image_token, vocab
    for k in ("model.language_model.embed_tokens.weight", "lm_head.weight", "vm_head.weight"):
        if k in sd:
            sd[k] = torch.cat([sd[k], sd[k].new_zeros(1, sd[k].shape[1])])
    return vocab, vocab + 1


def export_llava_hf(model, out_dir, tokenizer=None):
    """A Hugging Face repository of `model` (docs/weights.md §Export): the new llava-hf layout through
    invert(llava_hf_names) with config.json and generation_config.json, vm_head.safetensors beside it,
    and, given `tokenizer` (a tokenizer.model file, the directory holding one, or a loaded tokenizer),
    what AutoProcessor reads: the tokenizer files, the chat template, the image processor's and the
    processor's configs. Returns the names of the files written."""
    from safetensors.torch import save_file
    cfg = model.cfg
    dec, vis = cfg.decoder, cfg.vision
    tok = _checked_tokenizer(tokenizer, cfg) if tokenizer is not None else None  # before anything is written
    os.makedirs(out_dir, exist_ok=True)
    params = dict(model.named_parameters())
    sd = {hf: params[name].detach().cpu().contiguous() for name, hf in invert(llava_hf_names(cfg)).items()}
    sd["vm_head.weight"] = model.vm_head.weight.detach().cpu().contiguous()
    image_token, vocab = placeholder_row(sd, cfg)
    save_file({"vm_head.weight": sd.pop("vm_head.weight")}, os.path.join(out_dir, "vm_head.safetensors"),
              metadata={"format": "pt"})
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    written = ["model.safetensors", "vm_head.safetensors"]
    if tok is not None:
        _export_tokenizer(tok, cfg, out_dir, written)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad")} if tok else {}
    text = dict(model_type=dec.kind, vocab_size=vocab, hidden_size=dec.dim, intermediate_size=dec.hidden,
                num_hidden_layers=dec.layers, num_attention_heads=dec.heads, num_key_value_heads=dec.kv_heads,
                head_dim=dec.hd, rms_norm_eps=dec.eps, rope_theta=dec.rope_theta,
                max_position_embeddings=dec.max_seq_len, hidden_act="silu", tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, **ids)
    if dec.kind == "mistral":
        text["sliding_window"] = dec.sliding_window
    config = dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        image_token_index=image_token, image_seq_length=vis.num_patches, projector_hidden_act="gelu",
        multimodal_projector_bias=True, vision_feature_layer=vis.select_layer,
        vision_feature_select_strategy="default", tie_word_embeddings=False, text_config=text,
        vision_config=dict(model_type="clip_vision_model", hidden_size=vis.width, intermediate_size=vis.mlp,
                           num_hidden_layers=vis.layers, num_attention_heads=vis.heads, image_size=vis.image_size,
                           patch_size=vis.patch_size, layer_norm_eps=vis.eps, hidden_act="quick_gelu",
                           num_channels=3),
        nanovt_extras=dict(template=cfg.template, pseudo_image_features=cfg.pseudo_image_features),
    )
    _write_json(out_dir, "config.json", config, written)
    if tok is not None:  # what generate() stops at and pads with; greedy, as eval.py and sample.py decode
        _write_json(out_dir, "generation_config.json", dict(**ids, do_sample=False), written)
    return written


def _write_json(out_dir, name, obj, written):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    written.append(name)


def hf_processor_configs(vis: VisionConfig):
    """(preprocessor_config.json, processor_config.json) of an export, as dicts.

    The image processor is transformers' LlavaImageProcessor set to data.process_image's steps:
    pad to a square with the CLIP mean colour (do_pad), resize the shortest edge bicubic, centre crop,
    rescale by 1/255, normalise with CLIP's mean and std. LlavaProcessor expands <image> into
    (image_size / patch_size)² + num_additional_image_tokens - 1 placeholders under the "default"
    strategy (the class token dropped): with 1 additional token, the model's num_patches."""
    import data
    from tokenizer import IMAGE_TAG_HF
    size = vis.image_size
    image = dict(
        image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor",
        do_convert_rgb=True, do_pad=True, do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD))
    processor = dict(processor_class="LlavaProcessor", image_token=IMAGE_TAG_HF, patch_size=vis.patch_size,
                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return image, processor


def _checked_tokenizer(tokenizer, cfg: VTLMMConfig):
    """The tokenizer (a path or a loaded one), refused if it cannot be this model's."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if tok.vocab_size > cfg.decoder.vocab_size:
        raise InputError(f"{tok.path}: {tok.vocab_size} tokens, more than the model's vocabulary "
                         f"({cfg.decoder.vocab_size}): not this model's tokenizer")
    if 0 <= cfg.image_token_id < tok.vocab_size:
        raise InputError(f"the model's image placeholder id {cfg.image_token_id} is token "
                         f"{tok.piece(cfg.image_token_id)!r} of {tok.path}; it needs a row of its own")
    return tok


def _export_tokenizer(tok, cfg: VTLMMConfig, out_dir, written):
    """The tokenizer, chat template and processor files of an export."""
    import shutil

    import conversation
    from tokenizer import hf_tokenizer_files
    image_token = cfg.image_token_id if 0 <= cfg.image_token_id < cfg.decoder.vocab_size else cfg.decoder.vocab_size
    from gguf_file import copy_tokenizer, is_gguf
    src = os.path.abspath(tok.path)
    if src != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
        if is_gguf(src):  # a GGUF LLM's tokenizer: its tokenizer entries, not its weights
            copy_tokenizer(src, os.path.join(out_dir, "tokenizer.model"))
        else:
            shutil.copyfile(src, os.path.join(out_dir, "tokenizer.model"))
    written.append("tokenizer.model")
    files = hf_tokenizer_files(tok, image_token, cfg.decoder.max_seq_len)
    template = conversation.hf_chat_template(cfg.template, tok.legacy)
    files["tokenizer_config.json"]["chat_template"] = template
    for name, obj in files.items():
        _write_json(out_dir, name, obj, written)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    written.append("chat_template.jinja")
    image, processor = hf_processor_configs(cfg.vision)
    _write_json(out_dir, "preprocessor_config.json", image, written)
    _write_json(out_dir, "processor_config.json", processor, written)


# ----------------------------------------------------------------------------------------------
# The print command


def main(argv=None):
    """The command; a user's error (a bad config.json, missing or mismatched tensors, a read-only or full
    disk) is one line and exit status 1 (errors.one_line), a programming error keeps its traceback."""
    import errors
    try:
        return _main(argv)
    except (InputError, OSError) as e:
        line = errors.one_line(e)
        if line is None:
            raise
        sys.exit(f"weights.py: {line}")


def _main(argv=None):
    decoders = [k for k, v in PRESETS.items() if isinstance(v, DecoderConfig)]
    ap = argparse.ArgumentParser(description="Print name maps, one tensor a line: checkpoint name, nanoVT name; "
                                             "or export a checkpoint as a Hugging Face repository (--export).")
    ap.add_argument("path", nargs="?", help="a checkpoint directory: the maps from_pretrained reads it with")
    ap.add_argument("--vision_path", default=None, help="the CLIP directory of an original LLaVA / VW-LMM checkpoint")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), help="a layout, for --preset's shapes")
    ap.add_argument("--preset", choices=decoders, default="vicuna-7b-v1.5",
                    help="the decoder's released shapes (the tower is CLIP ViT-L/14-336)")
    ap.add_argument("--invert", action="store_true", help="nanoVT name first (the direction export writes)")
    ap.add_argument("--export", metavar="OUT_DIR", help="write `path` as a llava-hf repository with its tokenizer, "
                                                        "chat template and processor files (docs/weights.md §Export)")
    ap.add_argument("--tokenizer", default=None, help="with --export: the tokenizer.model (default: the one in path)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="with --export: weights' dtype")
    args = ap.parse_args(argv)
    if args.export:
        if not args.path:
            ap.error("--export needs the checkpoint directory to export")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        tokenizer = args.tokenizer or os.path.join(args.path, "tokenizer.model")
        if not os.path.exists(tokenizer):
            ap.error(f"no {tokenizer}: name the model's tokenizer.model with --tokenizer")
        model = from_pretrained(args.path, dtype=dtype, vision_path=args.vision_path)
        files = export_llava_hf(model, args.export, tokenizer)
        print(f"wrote {args.export}: {', '.join(files)}")
        if model.cfg.pseudo_image_features:
            print("note: this model answers from pseudo image features (Eq. 8), which transformers' "
                  "LlavaForConditionalGeneration does not compute: evaluate it with eval.py")
        return
    if args.path:
        cfg, parts, _ = read_checkpoint(args.path, args.vision_path)
        maps = [(files.path, names if names is not None else nanovt_names(cfg)) for files, names in parts]
    elif args.layout:
        cfg = VTLMMConfig(vision=PRESETS["clip-vit-l14-336"], decoder=PRESETS[args.preset])
        maps = [(f"layout {args.layout}, {args.preset}", LAYOUTS[args.layout](cfg))]
    else:
        ap.error("give a checkpoint directory or --layout")
    try:
        for title, names in maps:
            names = invert(names) if args.invert else names
            print(f"# {title}: {len(names)} tensors")
            width = max(len(k) for k in names)
            for a, b in names.items():
                print(f"{a:<{width}}  {b}")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): end quietly, as a pipe's writer should
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush finds no pipe
        sys.exit(1)


if __name__ == "__main__":
    main()
