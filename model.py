"""
nanoVT model: VT-LMM ("visual tokens") in one file, read top to bottom.

    image ──VE (CLIP ViT, frozen)──► patch features ──AD (adapter)──► X_image ─┐
    text  ──embedding──────────────────────────────────────────────────────────┴─► Φ (decoder) ─► W_MM ─► logits
                                                   X_image ──W_VM (VM head)──► visual logits (Eq. 5)

The decoder reads one sequence in which every image placeholder id is replaced, in order, by
one row of X_image (as in LLaVA). The MM head predicts the next token everywhere; the VM head
turns each patch feature into a distribution over the vocabulary ("visual tokens") that
losses.py uses as the training target at image positions (Eq. 6) or fits (Eq. 9).

Contents: configs (with the released 7B shapes by name) → CLIP vision tower → adapter →
LLaMA/Mistral decoder → VTLMM (embed, forward, pseudo image features (Eq. 8), visual tokens
(Eq. 5), nearest tokens (Eq. 3)) → fresh weights and saving. The losses are in losses.py; decoding
(KV cache, the compiled step, generate) in inference.py; loading and export in weights.py
(docs/weights.md).
"""

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import ConfigError, check_config

IMAGE_TOKEN_ID = -200  # sentinel placeholder id for nanoVT's own models: never looked up in the embedding


def attend(q, k, v, cpu_fp32=True, **kw):
    """F.scaled_dot_product_attention, except when training in bf16 (or fp16) on a CPU with cpu_fp32: then
    in float32, because PyTorch's CPU flash-attention backward is slower in bf16 than in float32 (the
    timings: docs/experiments.md §The speed levers). CPU autocast would cast the inputs back to bf16, so
    it is switched off around the call. Inference (no grad) and GPUs keep the half-precision kernels.
    (Under autocast q and k arrive in float32, RoPE's product with float32 tables promotes them, and v in
    bf16: the autocast state, not q, says what SDPA would run in.) `cpu_fp32` is each attention module's
    setting (VTLMM.set_cpu_attention_fp32)."""
    if cpu_fp32 and q.device.type == "cpu" and torch.is_grad_enabled():
        low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else v.dtype
        if low in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(low)
    return F.scaled_dot_product_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------------------------
# Configs


@dataclass
class VisionConfig:
    """CLIP ViT (HF CLIPVisionConfig)."""
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    eps: float = 1e-5
    select_layer: int = -2  # as HF hidden_states[-2]: the output of the second-to-last block

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class DecoderConfig:
    """LLaMA / Mistral decoder (HF LlamaConfig / MistralConfig)."""
    vocab_size: int = 32000
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    hidden: int = 11008
    eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None  # Mistral v0.1: 4096; None = full causal attention
    max_seq_len: int = 4096
    head_dim: Optional[int] = None  # None = dim // heads
    kind: str = "llama"  # "llama" or "mistral": only decides the model_type written on export

    @property
    def hd(self):
        return self.head_dim or self.dim // self.heads


@dataclass
class VTLMMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int = IMAGE_TOKEN_ID
    pseudo_image_features: bool = False  # Eq. 8: feed X_p = softmax(W_VM X_image) E instead of X_image
    template: str = "vicuna_v1"  # chat template the model was trained with (conversation.TEMPLATES)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where="the model config", check=True):
        """A config from its dict (config.json's "nanovt", a train config's `model`): every key known, every
        size within CONFIG_BOUNDS (check_config, unless check=False: the caller checks it, with the weight
        files' size); else a ConfigError naming `where` and the key."""
        parts = {}
        for name, kind, value in (("", cls, d), ("vision.", VisionConfig, (d or {}).get("vision", {}) if
                                                 isinstance(d, dict) else None),
                                  ("decoder.", DecoderConfig, (d or {}).get("decoder", {}) if isinstance(d, dict)
                                   else None)):
            if not isinstance(value, dict):
                got = "a JSON " + {list: "list", str: "string"}.get(type(value), type(value).__name__)
                raise ConfigError(f"{where}: {name.rstrip('.') or 'the config'} must be an object of fields, "
                                  f"got {got}")
            known = {f.name for f in fields(kind)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"{where}: unknown key {name}{unknown[0]} (known: {', '.join(sorted(known))})")
            parts[name] = value
        cfg = cls(**{**d, "vision": VisionConfig(**parts["vision."]), "decoder": DecoderConfig(**parts["decoder."])})
        if check:
            check_config(cfg, where)
        return cfg


# The released shapes, by name. Parameter counts are checked by tests/test_model.py.
PRESETS = {
    "clip-vit-l14-336": VisionConfig(),  # 303,507,456 parameters, all kept (post-norm and last block unused)
    "vicuna-7b-v1.5": DecoderConfig(),   # LLaMA-2-7B shapes: 6,738,415,616 with the head
    "mistral-7b-v0.1": DecoderConfig(hidden=14336, kv_heads=8, sliding_window=4096, max_seq_len=32768,
                                     kind="mistral"),  # 7,241,732,096 with the head
    "mistral-7b-instruct-v0.2": DecoderConfig(hidden=14336, kv_heads=8, rope_theta=1e6, max_seq_len=32768,
                                              kind="mistral"),
}


# ----------------------------------------------------------------------------------------------
# VE: CLIP vision tower (mirrors HF CLIPVisionTransformer)


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.cpu_fp32 = True  # attend's setting

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = attend(q, k, v, self.cpu_fp32)  # (B, heads, T, head_dim), no mask
        return self.o(y.transpose(1, 2).reshape(B, T, W))


class CLIPBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = CLIPAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.fc1(self.norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches + 1, cfg.width))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # HF "pre_layrnorm"
        self.blocks = nn.ModuleList(CLIPBlock(cfg) for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # kept so released files load strictly; unused

    def forward(self, pixel_values):
        """(N, 3, H, W) -> (N, num_patches, width): the select_layer hidden state, class token dropped."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (N, width, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (N, num_patches, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.pos_embed)
        # hidden_states[i] is the output of block i (hidden_states[0] = embeddings): run only what is used
        n_run = self.cfg.select_layer % (self.cfg.layers + 1)
        for block in self.blocks[:n_run]:
            x = block(x)
        return x[:, 1:]


# ----------------------------------------------------------------------------------------------
# AD: the adapter (LLaVA-1.5's mlp2x_gelu projector)


class Adapter(nn.Module):
    def __init__(self, d_vision, d):
        super().__init__()
        self.fc1 = nn.Linear(d_vision, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # erf GELU


# ----------------------------------------------------------------------------------------------
# Φ: the LLaMA / Mistral decoder (mirrors HF LlamaModel / MistralModel)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in float32 (HF rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.hd
        self.q = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)
        self.cpu_fp32 = True  # attend's setting

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slot=None):
        """x (B, T, dim). cache: an inference.KVCache to write this layer's keys and values into (at its
        filled length, or with `slot` at that one index: inference.decode_step) and attend over."""
        B, T, _ = x.shape
        hd = self.cfg.hd
        q = self.q(x).view(B, T, self.cfg.heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        k = self.k(x).view(B, T, self.cfg.kv_heads, hd).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = self.v(x).view(B, T, self.cfg.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.cfg.heads != self.cfg.kv_heads
        if slot is not None:  # static cache (inference.decode_step): write at slot, attend every slot under the mask
            cache.k[layer].index_copy_(2, slot, k)
            cache.v[layer].index_copy_(2, slot, v)
            y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask, enable_gqa=gqa)
            return self.o(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            s = cache.len
            cache.k[layer][:, :, s:s + T] = k
            cache.v[layer][:, :, s:s + T] = v
            k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]
        # decoding: the key length changes every step; cuDNN's attention would build a new plan per
        # length (milliseconds of host time each, measured on an H200), the other kernels need none
        with sdpa_kernel(DECODE_SDPA) if cache is not None and q.is_cuda else contextlib.nullcontext():
            if mask is None:  # plain causal attention from position 0, no padding, no binding window
                y = attend(q, k, v, self.cpu_fp32, is_causal=cache is None or T > 1, enable_gqa=gqa)
            else:
                y = attend(q, k, v, self.cpu_fp32, attn_mask=mask, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)
        self.checkpoint = False  # activation checkpointing: keep only the input, recompute in backward

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slot=None):
        if self.checkpoint and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache, layer, slot)

    def _forward(self, x, cos, sin, mask, cache=None, layer=0, slot=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, slot)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def attention_mask(self, B, T, key_valid, start, device):
        """Boolean (B, 1, T, start+T) mask, or None when plain causal attention is exact.

        Query i sits at cache index start+i; it sees key j when j <= start+i, j is not padding,
        and (with a sliding window w) start+i - j < w, as HF Mistral does.
        """
        L = start + T
        window = self.cfg.sliding_window
        if key_valid is None and start == 0 and (window is None or window >= T):
            return None
        if key_valid is None and T == 1 and (window is None or window >= L):
            return None
        qi = torch.arange(start, L, device=device)[:, None]
        kj = torch.arange(L, device=device)[None, :]
        m = kj <= qi
        if window is not None:
            m = m & (qi - kj < window)
        m = m[None, None].expand(B, 1, T, L)
        if key_valid is not None:
            m = m & key_valid[:, None, None, :L]
            m = m | ~m.any(-1, keepdim=True)  # a padding query sees everything; its output is never used
        return m

    def forward(self, x, attention_mask=None, cache=None):
        """x: input embeddings (B, T, dim) -> final-norm hidden states (B, T, dim)."""
        B, T, _ = x.shape
        start = cache.len if cache is not None else 0
        if cache is not None:
            valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                        device=x.device)
            cache.valid[:, start:start + T] = valid
            positions = cache.pos[:, None] + valid.long().cumsum(-1) - 1
            cache.pos += valid.long().sum(-1)
            key_valid = cache.valid if (attention_mask is not None or not bool(cache.valid[:, :start].all())) else None
        elif attention_mask is not None:
            key_valid = attention_mask.bool()
            positions = key_valid.long().cumsum(-1) - 1
        else:
            key_valid = None
            positions = torch.arange(T, device=x.device)[None].expand(B, T)
        positions = positions.clamp(min=0)
        cos, sin = rope_cos_sin(positions, self.cfg.hd, self.cfg.rope_theta, x.dtype)
        mask = self.attention_mask(B, T, key_valid, start, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len = start + T
            cache.index.fill_(start + T)
        return self.norm(x)

# ----------------------------------------------------------------------------------------------
# VT-LMM


# ----------------------------------------------------------------------------------------------
# Fresh weights: the one initialisation, for a new model, the modules a checkpoint does not hold
# (weights.py) and the modules a training stage re-initialises (train.py's `reinit`)


@torch.no_grad()
def init_weights(module, std=0.02, names=None):
    """Norm weights 1, biases 0, every other weight (Linear, Conv2d, Embedding, CLIP's class and position
    embeddings) drawn from N(0, std^2); `names` limits it to those parameters of `module`.

    Each tensor is drawn whole from torch's CPU generator in the parameter's dtype, and a sharded (FSDP
    DTensor) or non-CPU parameter keeps its rows of it, so a model gets the same values whatever its
    device or sharding. Layers' weights are drawn in parameter order, then the free parameters (the
    class and position embeddings): the order nanoVT has always used, so seeded runs keep their values."""
    def owner(name):
        return module.get_submodule(name.rpartition(".")[0])

    params = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    params.sort(key=lambda np: any(True for _ in owner(np[0]).children()))  # free parameters last (stable)
    for name, p in params:
        in_place = p.device.type == "cpu" and not hasattr(p, "to_local")
        t = p.data if in_place else torch.empty(p.shape, dtype=p.dtype)
        if name.endswith("bias"):
            nn.init.zeros_(t)
        elif isinstance(owner(name), (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(t)
        else:
            nn.init.normal_(t, std=std)
        if not in_place:
            assign_full(p, t)


def local_rows(p):
    """(local tensor, first row) of a parameter: its shard when FSDP2 sharded it (dim 0, torch.chunk
    sizes over the mesh), else the whole tensor."""
    if not hasattr(p, "to_local"):
        return p.data, 0
    local = p.to_local()
    rank, world = p.device_mesh.get_local_rank(), p.device_mesh.size()
    rows = -(-p.shape[0] // world)  # ceil
    start = min(rank * rows, p.shape[0])
    assert local.shape[0] == min(p.shape[0], start + rows) - start, (p.shape, local.shape, rank)
    return local, start


@torch.no_grad()
def assign_full(p, full):
    """Copy this rank's rows of a full tensor into a (possibly sharded) parameter."""
    local, start = local_rows(p)
    local.copy_(full[start:start + local.shape[0]])


@dataclass
class VTLMMOutput:
    logits: Optional[torch.Tensor] = None         # (B, T, C) from the MM head, or None when not asked for
    hidden: Optional[torch.Tensor] = None         # (B, T, d) final-norm decoder output
    image_mask: Optional[torch.Tensor] = None     # (B, T) bool, True at image positions
    image_features: Optional[torch.Tensor] = None  # (N, d) X_image, the adapter outputs, row-major


class VTLMM(nn.Module):
    def __init__(self, cfg: VTLMMConfig):
        super().__init__()
        self.cfg = cfg
        d, C = cfg.decoder.dim, cfg.decoder.vocab_size
        self.vision = VisionEncoder(cfg.vision)               # VE, frozen
        self.adapter = Adapter(cfg.vision.width, d)           # AD
        self.decoder = Decoder(cfg.decoder)                   # Φ
        self.mm_head = nn.Linear(d, C, bias=False)            # W_MM, next-token logits
        self.vm_head = nn.Linear(d, C, bias=False)            # W_VM, visual-token logits of X_image
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # -- construction ---------------------------------------------------------------------------

    def init_weights(self, std=0.02):
        """Fresh random weights for the whole model (init_weights below: the one rule)."""
        init_weights(self, std)

    def set_checkpointing(self, on=True):
        """Per-block activation checkpointing of the decoder (train.py switches it on)."""
        for block in self.decoder.blocks:
            block.checkpoint = on

    def set_cpu_attention_fp32(self, on=True):
        """Whether attention trains in float32 under bf16 on a CPU (`attend`; on by default)."""
        for mod in self.modules():
            if isinstance(mod, (Attention, CLIPAttention)):
                mod.cpu_fp32 = on

    def num_params(self, part=None, non_embedding=False):
        mod = getattr(self, part) if part else self
        n = sum(p.numel() for p in mod.parameters())
        if non_embedding and part in (None, "decoder"):
            n -= self.decoder.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per decoder token: 6 N (non-embedding weights incl. the MM head) + attention."""
        c = self.cfg.decoder
        n = self.num_params("decoder", non_embedding=True) + self.mm_head.weight.numel()
        return 6 * n + 12 * c.layers * c.heads * c.hd * seq_len

    # -- the forward pass -----------------------------------------------------------------------

    def image_features(self, pixel_values):
        """X_image = AD(VE(image)): (N_img, 3, H, W) -> (N_img, num_patches, d). VE is frozen in every
        stage of the paper: it runs without gradients unless its weights are set to train (toy stage 0)."""
        train_ve = torch.is_grad_enabled() and self.vision.patch_embed.weight.requires_grad
        with torch.set_grad_enabled(train_ve):
            feats = self.vision(pixel_values)
        return self.adapter(feats.to(self.adapter.fc1.weight.dtype))

    def pseudo_image_features(self, x_image):
        """Eq. 8: X_p = softmax(W_VM X_image) · E, E the decoder's input embedding matrix (C × d)."""
        p = F.softmax(self.vm_head(x_image).float(), dim=-1)
        return (p @ self.decoder.embed.weight.float()).to(x_image.dtype)

    def embed(self, input_ids, pixel_values=None, image_rows=None):
        """Token embeddings with image placeholders replaced, in order, by X_image (or X_p).
        image_rows: the flat image positions (N,), found on the CPU beforehand (losses.Rows.image), so
        that nothing here waits for the device; without it they come from the placeholder ids."""
        image_mask = input_ids == self.cfg.image_token_id
        x = self.decoder.embed(input_ids.masked_fill(image_mask, 0))  # placeholder: sentinel, masked
        x_image = None
        n_pos = int(image_mask.sum()) if image_rows is None else image_rows.shape[0]
        if pixel_values is not None and pixel_values.shape[0] > 0:
            x_image = self.image_features(pixel_values).flatten(0, 1)  # (N, d), row-major
            if x_image.shape[0] != n_pos:
                raise ValueError(f"{pixel_values.shape[0]} images give {x_image.shape[0]} patch features but "
                                 f"input_ids hold {n_pos} image placeholders (id {self.cfg.image_token_id})")
            x_in = self.pseudo_image_features(x_image) if self.cfg.pseudo_image_features else x_image
            if image_rows is None:
                x = x.masked_scatter(image_mask[..., None], x_in.to(x.dtype))
            else:
                B, T, d = x.shape
                x = x.reshape(B * T, d).index_copy(0, image_rows, x_in.to(x.dtype)).view(B, T, d)
        elif n_pos:
            raise ValueError(f"input_ids hold {n_pos} image placeholders but no pixel_values were given")
        return x, image_mask, x_image

    def forward(self, input_ids, pixel_values=None, attention_mask=None, cache=None, image_rows=None, logits=True):
        """input_ids (B, T), pixel_values (N_img, 3, H, W) for the placeholders in row-major order.

        Returns the decoder's hidden states, where the images went and X_image, and the MM head's
        logits unless logits=False. The training losses take the hidden states and apply the heads
        themselves, chunk by chunk (losses.Objective); the visual logits of Eq. 5 are
        `self.vm_head(out.image_features)`. image_rows: see `embed`.
        """
        x, image_mask, x_image = self.embed(input_ids, pixel_values, image_rows)
        hidden = self.decoder(x, attention_mask, cache)
        return VTLMMOutput(logits=self.mm_head(hidden) if logits else None, hidden=hidden, image_mask=image_mask,
                           image_features=x_image)

    # -- what the visual tokens say -------------------------------------------------------------

    @torch.no_grad()
    def visual_tokens(self, pixel_values, k=1):
        """Top-k tokens of each patch's visual token distribution softmax(W_VM x), Eq. 5 (Fig. 4).

        Returns (ids, probs), each (N_img, num_patches, k).
        """
        p = F.softmax(self.vm_head(self.image_features(pixel_values)).float(), dim=-1)
        probs, ids = p.topk(k, dim=-1)
        return ids, probs

    @torch.no_grad()
    def nearest_tokens(self, pixel_values):
        """Eq. 3: for each patch, the token whose input embedding is most cosine-similar to it.

        (The paper writes argmin of a similarity; it means argmax.) Returns (ids, cos), (N_img, num_patches).
        """
        x = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        e = F.normalize(self.decoder.embed.weight.float(), dim=-1)
        sim, ids = (x @ e.T).max(dim=-1)
        return ids, sim

    # -- loading and saving ---------------------------------------------------------------------

    def save_pretrained(self, out_dir):
        """nanoVT checkpoint: config.json + model.safetensors (plain parameter names)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = os.path.join(out_dir, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"nanovt": self.cfg.to_dict()}, f, indent=2)
