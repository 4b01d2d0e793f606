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
LLaMA/Mistral decoder with a KV cache → VTLMM (forward, pseudo image features, nearest
tokens, generate) → loading (every layout of docs/weights.md) and saving / export to llava-hf.
"""

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_TOKEN_ID = -200  # sentinel placeholder id for nanoVT's own models: never looked up in the embedding


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
    template: str = "vicuna_v1"  # chat template the model was trained with (data.py)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VTLMMConfig keys: {sorted(unknown)}")
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["decoder"] = DecoderConfig(**d.get("decoder", {}))
        return cls(**d)


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

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim), no mask
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


class KVCache:
    """Preallocated keys/values for every layer, (B, kv_heads, max_len, head_dim) each.

    `valid` (B, max_len) marks real (non-padding) keys; `pos` (B,) is the next RoPE position per row.
    """

    def __init__(self, cfg: DecoderConfig, batch, max_len, dtype, device):
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0  # filled length, the same for every row (left padding keeps rows aligned)
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.hd
        self.q = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        hd = self.cfg.hd
        q = self.q(x).view(B, T, self.cfg.heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        k = self.k(x).view(B, T, self.cfg.kv_heads, hd).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = self.v(x).view(B, T, self.cfg.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            s = cache.len
            cache.k[layer, :, :, s:s + T] = k
            cache.v[layer, :, :, s:s + T] = v
            k, v = cache.k[layer, :, :, :s + T], cache.v[layer, :, :, :s + T]
        gqa = self.cfg.heads != self.cfg.kv_heads
        if mask is None:  # plain causal attention from position 0, no padding, no binding window
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
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

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        if self.checkpoint and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache, layer)

    def _forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
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

    def forward(self, x, attention_mask=None, cache: Optional[KVCache] = None):
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
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# VT-LMM


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

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Fresh random weights (only used for modules that no checkpoint provides)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision.class_embedding, std=std)
        nn.init.normal_(self.vision.pos_embed, std=std)

    def set_checkpointing(self, on=True):
        """Per-block activation checkpointing of the decoder (train.py switches it on)."""
        for block in self.decoder.blocks:
            block.checkpoint = on

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
        """Top-k tokens of each patch's visual token distribution softmax(W_VM x) (Fig. 4).

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

    # -- decoding -------------------------------------------------------------------------------

    def new_cache(self, batch, max_len):
        p = self.mm_head.weight
        return KVCache(self.cfg.decoder, batch, max_len, p.dtype, p.device)

    @torch.no_grad()
    def generate_stream(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=128,
                        temperature=0.0, top_k=None, top_p=None, stop_ids=(), generator=None):
        """Yields the next token of every row, (B,), one step at a time, with a KV cache.

        Batches are left-padded (attention_mask 0 on the left). temperature 0 = greedy. Rows that
        produced a stop id keep yielding that id; the stream ends when every row has stopped.
        """
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        out = self(input_ids, pixel_values, attention_mask, cache=cache, logits=False)
        logits = self.mm_head(out.hidden[:, -1])
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            tok = torch.where(done, stop[0] if len(stop) else tok, tok)
            yield tok
            done |= torch.isin(tok, stop)
            if bool(done.all()) or i == max_new_tokens - 1:  # no forward pass for a token never asked for
                return
            hidden = self.decoder(self.decoder.embed(tok[:, None]), None, cache)
            logits = self.mm_head(hidden[:, -1])

    def generate(self, input_ids, pixel_values=None, max_new_tokens=128, **kw):
        """Returns (B, T + n) with the new tokens appended (rows that stopped early repeat their stop id)."""
        steps = list(self.generate_stream(input_ids, pixel_values, max_new_tokens=max_new_tokens, **kw))
        if not steps:
            return input_ids
        return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", vision_path=None, **overrides):
        """Load a nanoVT checkpoint, a llava-hf directory (old or new layout), an original LLaVA /
        VW-LMM directory (CLIP tower from `vision_path` or config's mm_vision_tower), each a single
        file or a sharded index. Strict: every parameter filled, every key consumed, every shape
        checked. The model is built on the meta device and filled in `dtype`, no random copy first.
        """
        return load_pretrained(cls, path, dtype, device, vision_path, overrides)

    @classmethod
    def from_clip_and_llm(cls, clip_path, llm_path, dtype=torch.float32, device="cpu", **overrides):
        """Stage I start: CLIP weights + LLaMA/Mistral weights; adapter and VM head fresh."""
        return load_clip_and_llm(cls, clip_path, llm_path, dtype, device, overrides)

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

    def export_llava_hf(self, out_dir):
        """Write a directory that transformers' LlavaForConditionalGeneration loads (new layout),
        with the VM head beside it in vm_head.safetensors (which from_pretrained picks up)."""
        export_llava_hf(self, out_dir)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, C) -> next ids (B,). Greedy at temperature 0; else top-k, then nucleus (top-p)."""
    if not temperature:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Weight files: names. Each source layout maps onto nanoVT's names by the tables below.

_CLIP_NAMES = [  # HF CLIPVisionTransformer suffix <-> nanoVT VisionEncoder suffix
    ("embeddings.patch_embedding.weight", "patch_embed.weight"),
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("pre_layrnorm.{w}", "pre_norm.{w}"),
    ("post_layernorm.{w}", "post_norm.{w}"),
    ("encoder.layers.{i}.layer_norm1.{w}", "blocks.{i}.norm1.{w}"),
    ("encoder.layers.{i}.layer_norm2.{w}", "blocks.{i}.norm2.{w}"),
    ("encoder.layers.{i}.self_attn.{qkv}_proj.{w}", "blocks.{i}.attn.{qkv}.{w}"),
    ("encoder.layers.{i}.self_attn.out_proj.{w}", "blocks.{i}.attn.o.{w}"),
    ("encoder.layers.{i}.mlp.{fc}.{w}", "blocks.{i}.{fc}.{w}"),
]
_LLM_NAMES = [  # HF LlamaModel / MistralModel suffix <-> nanoVT Decoder suffix
    ("embed_tokens.weight", "embed.weight"),
    ("norm.weight", "norm.weight"),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("layers.{i}.self_attn.{qkvo}_proj.weight", "blocks.{i}.attn.{qkvo}.weight"),
    ("layers.{i}.mlp.{glu}_proj.weight", "blocks.{i}.mlp.{glu}.weight"),
]
_ADAPTER_NAMES = [
    ("linear_1.{w}", "fc1.{w}"), ("linear_2.{w}", "fc2.{w}"),  # llava-hf multi_modal_projector
    ("0.{w}", "fc1.{w}"), ("2.{w}", "fc2.{w}"),                # original LLaVA mm_projector
]
_SLOTS = dict(i=r"\d+", w="weight|bias", qkv="q|k|v", qkvo="q|k|v|o", fc="fc1|fc2", glu="gate|up|down")


def _match(template, name):
    """Match `name` against a template like 'layers.{i}.mlp.{glu}_proj.weight'; dict of slots or None."""
    pat = re.escape(template)
    for slot, alt in _SLOTS.items():
        pat = pat.replace(re.escape("{%s}" % slot), f"(?P<{slot}>{alt})")
    m = re.fullmatch(pat, name)
    return m.groupdict() if m else None


# (source prefix, nanoVT prefix, suffix table) per layout; the first matching prefix wins.
LAYOUTS = {
    "llava-hf-new": [("model.vision_tower.vision_model.", "vision.", _CLIP_NAMES),
                     ("model.vision_tower.", "vision.", _CLIP_NAMES),  # transformers 5 in memory
                     ("model.multi_modal_projector.", "adapter.", _ADAPTER_NAMES),
                     ("model.language_model.", "decoder.", _LLM_NAMES),
                     ("lm_head.weight", "mm_head.weight", None)],
    "llava-hf-old": [("vision_tower.vision_model.", "vision.", _CLIP_NAMES),
                     ("vision_tower.", "vision.", _CLIP_NAMES),  # as transformers 5 saves it
                     ("multi_modal_projector.", "adapter.", _ADAPTER_NAMES),
                     ("language_model.model.", "decoder.", _LLM_NAMES),
                     ("language_model.lm_head.weight", "mm_head.weight", None)],
    "llava": [("model.vision_tower.vision_tower.vision_model.", "vision.", _CLIP_NAMES),
              ("model.mm_projector.", "adapter.", _ADAPTER_NAMES),
              ("model.", "decoder.", _LLM_NAMES),
              ("lm_head.weight", "mm_head.weight", None),
              ("vm_head.weight", "vm_head.weight", None)],
    "clip": [("vision_model.", "vision.", _CLIP_NAMES),  # CLIPModel / CLIPVisionModel files as released
             ("", "vision.", _CLIP_NAMES)],  # CLIPVisionModel as transformers 5 saves it
    "llm": [("model.", "decoder.", _LLM_NAMES), ("lm_head.weight", "mm_head.weight", None)],
    "vm_head": [("vm_head.weight", "vm_head.weight", None), ("weight", "vm_head.weight", None)],
}
# Keys some files carry that hold no parameter of this model (buffers, CLIP's text half).
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|.*position_ids|text_model\..*|text_projection\..*|"
                      r"visual_projection\..*|logit_scale)$")


def rename(key, layout, reverse=False):
    """Source key -> nanoVT key (reverse: nanoVT key -> source key), or None if no rule fits."""
    if layout == "nanovt":  # our own checkpoints use our own names
        return key
    for src, dst, table in LAYOUTS[layout]:
        if reverse:
            src, dst = dst, src
        if table is None:
            if key == src:
                return dst
        elif key.startswith(src):
            for a, b in table:
                a, b = (b, a) if reverse else (a, b)
                slots = _match(a, key[len(src):])
                if slots is not None:
                    return dst + b.format(**slots)
            return None
    return None


class WeightFiles:
    """The tensors of a checkpoint directory or file: single safetensors, a sharded index, or .bin."""

    def __init__(self, path, prefix="model"):
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
                        raise FileNotFoundError(f"{ipath} names shard {fname}, which is missing")
                files = []
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path)
                               if f.endswith(".safetensors") and f.startswith(prefix))
                if not files:
                    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                                   if f.endswith(".bin") and f.startswith("pytorch_model"))
                if not files:
                    raise FileNotFoundError(f"no {prefix}*.safetensors, index or pytorch_model*.bin in {path}")
        for fpath in files:
            for key in self._keys(fpath):
                self.where[key] = fpath
        self._open = {}

    @staticmethod
    def _keys(fpath):
        if fpath.endswith(".bin"):
            return list(torch.load(fpath, map_location="cpu", weights_only=True, mmap=True).keys())
        from safetensors import safe_open
        try:
            with safe_open(fpath, "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise ValueError(f"cannot read {fpath}: {e} (truncated or not a safetensors file?)") from e

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
            raise ValueError(f"cannot read tensor {key} from {fpath}: {e} (truncated file?)") from e

    def read_rows(self, key, start, end):
        """Rows start:end (dim 0) of a tensor, reading only those bytes from a safetensors file."""
        fpath = self.where[key]
        if fpath.endswith(".bin"):  # memory-mapped: only the rows touched are paged in
            return torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)[key][start:end]
        from safetensors import safe_open
        with safe_open(fpath, "pt") as f:
            sl = f.get_slice(key)
            return sl[start:end] if len(sl.get_shape()) else sl[:]


def fill(model, files, layout, dtype):
    """Copy every tensor of `files` into the matching parameter of `model` (on meta), strictly.

    Returns the set of nanoVT names filled. Raises on an unknown key, a shape mismatch, or a
    parameter filled twice.
    """
    params = dict(model.named_parameters())
    filled = set()
    for key in sorted(files.where):
        name = rename(key, layout)
        if name is None:
            if _IGNORED.fullmatch(key):
                continue
            raise KeyError(f"unexpected key '{key}' in {files.where[key]} (layout {layout})")
        if name not in params:
            raise KeyError(f"key '{key}' in {files.where[key]} maps to '{name}', which this model has not "
                           f"(a config mismatch: more layers than config.json says?)")
        if name in filled:
            raise KeyError(f"'{name}' is given twice (second time by '{key}' in {files.where[key]})")
        t = files.get(key)
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"shape mismatch for '{key}' in {files.where[key]}: file {tuple(t.shape)}, "
                             f"model '{name}' expects {tuple(p.shape)}")
        _set_param(model, name, t.to(dtype))
        filled.add(name)
        if _LAZY is not None:
            _LAZY.where[name] = (files, key)
    return filled


def _set_param(model, name, tensor):
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, pname, nn.Parameter(tensor, requires_grad=getattr(mod, pname).requires_grad))


def _finish(model, filled, dtype, device, where, fresh=("vm_head.",)):
    """Check every parameter was filled; initialise the ones allowed to start fresh; move to device."""
    missing = [n for n, p in model.named_parameters() if n not in filled and not n.startswith(fresh)]
    if missing:
        raise KeyError(f"{where}: missing {len(missing)} parameter(s), e.g. {missing[:5]}")
    if _LAZY is not None:  # lazy_loading: fresh parameters are drawn later, by load_shards, from this RNG state
        _LAZY.rng, _LAZY.dtype = torch.get_rng_state(), dtype
        return model
    for n, p in list(model.named_parameters()):
        if n not in filled:  # a fresh module: random init as VTLMM.init_weights does
            t = torch.empty(p.shape, dtype=dtype)
            nn.init.zeros_(t) if n.endswith("bias") else nn.init.normal_(t, std=0.02)
            _set_param(model, n, t)
    return model.to(device)


# -----------------------------------------------------------------------------
# Sharded loading: each rank reads only its own rows of each tensor (never a whole model per rank)


class ShardSources:
    """What `lazy_loading` records: parameter name -> (WeightFiles, key), and the RNG state and dtype
    that the fresh (not loaded) parameters are to be drawn with, as a full load would."""

    def __init__(self):
        self.where, self.rng, self.dtype = {}, None, torch.float32


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


def _local_rows(p):
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
    local, start = _local_rows(p)
    local.copy_(full[start:start + local.shape[0]])


@torch.no_grad()
def load_shards(model, sources: ShardSources):
    """Fill a model built under `lazy_loading`, sharded and materialised (to_empty): each rank reads the
    rows of its shard of each tensor (safetensors slices), cast to the dtype on the way; fresh
    parameters are drawn whole, one at a time, from the recorded RNG state (as `_finish` draws them),
    so the result is bit-equal to a full load."""
    if sources.rng is not None:
        torch.set_rng_state(sources.rng)
    for name, p in model.named_parameters():
        local, start = _local_rows(p)
        if name in sources.where:
            files, key = sources.where[name]
            local.copy_(files.read_rows(key, start, start + local.shape[0]) if p.dim() else files.get(key))
        else:  # fresh: random init as _finish does (the whole tensor, so the RNG stream is the same)
            t = torch.empty(p.shape, dtype=sources.dtype)
            nn.init.zeros_(t) if name.endswith("bias") else nn.init.normal_(t, std=0.02)
            local.copy_(t[start:start + local.shape[0]])
            del t
    return model


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


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
    kind = "mistral" if _is_mistral(c) else "llama"
    c = {**_HF_DEFAULTS[kind], **c}
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{where}: rope scaling {rope} is not supported")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ValueError(f"{where}: attention/MLP biases are not supported")
    if c.get("tie_word_embeddings"):
        raise ValueError(f"{where}: tied input/output embeddings are not supported")
    heads = c["num_attention_heads"]
    return DecoderConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], layers=c["num_hidden_layers"],
                         heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                         hidden=c["intermediate_size"], eps=c["rms_norm_eps"], rope_theta=float(theta),
                         sliding_window=c.get("sliding_window") if kind == "mistral" else None,
                         max_seq_len=c["max_position_embeddings"], kind=kind,
                         head_dim=c.get("head_dim") if c.get("head_dim") not in (None, c["hidden_size"] // heads)
                         else None)


def vision_config_from_hf(c, where, select_layer=-2, defaults="clip_vision_model"):
    c = {**_HF_DEFAULTS[defaults], **c}
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{where}: vision hidden_act {c['hidden_act']!r} is not supported (quick_gelu only)")
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


def _clip_config(path):
    """Vision config from a CLIPModel or CLIPVisionModel directory's config.json."""
    c = _read_json(os.path.join(path, "config.json"))
    return vision_config_from_hf(c.get("vision_config", c), os.path.join(path, "config.json"))


def load_pretrained(cls, path, dtype, device, vision_path, overrides):
    cpath = os.path.join(path, "config.json")
    c = _read_json(cpath)
    if "nanovt" in c:  # our own checkpoint
        cfg = replace(VTLMMConfig.from_dict(c["nanovt"]), **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        filled = fill(model, WeightFiles(path), "nanovt", dtype)
        return _finish(model, filled, dtype, device, path, fresh=())

    files = WeightFiles(path)
    if c.get("text_config") is not None or any(k.startswith(("model.language_model.", "language_model."))
                                               for k in files.where):
        # llava-hf: both layouts carry text_config / vision_config
        if c.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError(f"{cpath}: vision_feature_select_strategy must be 'default' (class token dropped)")
        layer = c.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"{cpath}: vision_feature_layer {layer} (several layers) is not supported")
        dec = decoder_config_from_hf(c.get("text_config") or {}, cpath)
        vis = vision_config_from_hf(c.get("vision_config") or {}, cpath, layer, defaults="llava_vision")
        image_token = c.get("image_token_index", c.get("image_token_id", 32000))
        layout = "llava-hf-new" if any(k.startswith("model.language_model.") for k in files.where) else "llava-hf-old"
        extras = c.get("nanovt_extras", {})  # written by export_llava_hf
        cfg = VTLMMConfig(vision=vis, decoder=dec, image_token_id=image_token,
                          template=extras.get("template", _template_for(dec)),
                          pseudo_image_features=extras.get("pseudo_image_features", False))
        vision_files = None
    else:
        # original LLaVA / VW-LMM: LLaMA or Mistral fields at the top, the tower maybe elsewhere
        dec = decoder_config_from_hf(c, cpath)
        layer = c.get("mm_vision_select_layer", -2)
        if c.get("mm_vision_select_feature", "patch") != "patch":
            raise ValueError(f"{cpath}: mm_vision_select_feature must be 'patch'")
        if c.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"{cpath}: mm_projector_type {c.get('mm_projector_type')!r} is not supported")
        layout = "llava"
        vision_files = None
        if not any(k.startswith("model.vision_tower.") for k in files.where):
            vpath = vision_path or c.get("mm_vision_tower")
            if not vpath or not os.path.isdir(vpath):
                raise FileNotFoundError(
                    f"{path} holds no vision tower and its config names {c.get('mm_vision_tower')!r}; "
                    f"download that CLIP model and pass vision_path=DIR")
            vis = replace(_clip_config(vpath), select_layer=layer)
            vision_files = WeightFiles(vpath)
        else:
            vis = vision_config_from_hf(c.get("vision_config") or {}, cpath, layer, defaults="llava_vision")
        cfg = VTLMMConfig(vision=vis, decoder=dec, image_token_id=c.get("image_token_index", IMAGE_TOKEN_ID),
                          template=_template_for(dec, c), pseudo_image_features=_is_pif(c, path))
    cfg = replace(cfg, **overrides)
    with torch.device("meta"):
        model = cls(cfg)
    filled = fill(model, files, layout, dtype)
    if vision_files is not None:
        filled |= fill(model, vision_files, "clip", dtype)
    vm_path = os.path.join(path, "vm_head.safetensors")
    if os.path.exists(vm_path) and "vm_head.weight" not in filled:
        filled |= fill(model, WeightFiles(vm_path), "vm_head", dtype)
    if "vm_head.weight" not in filled:
        print(f"note: {path} has no VM head; it starts from random weights (train it in stage III)")
    return _finish(model, filled, dtype, device, path)


def load_clip_and_llm(cls, clip_path, llm_path, dtype, device, overrides):
    dec = decoder_config_from_hf(_read_json(os.path.join(llm_path, "config.json")), llm_path)
    cfg = replace(VTLMMConfig(vision=_clip_config(clip_path), decoder=dec, template=_template_for(dec)), **overrides)
    with torch.device("meta"):
        model = cls(cfg)
    filled = fill(model, WeightFiles(clip_path), "clip", dtype)
    filled |= fill(model, WeightFiles(llm_path), "llm", dtype)
    return _finish(model, filled, dtype, device, f"{clip_path} + {llm_path}", fresh=("vm_head.", "adapter."))


def export_llava_hf(model: VTLMM, out_dir):
    from safetensors.torch import save_file
    cfg = model.cfg
    dec, vis = cfg.decoder, cfg.vision
    os.makedirs(out_dir, exist_ok=True)
    sd = {}
    for name, p in model.named_parameters():
        if name == "vm_head.weight":
            continue
        sd[rename(name, "llava-hf-new", reverse=True)] = p.detach().cpu().contiguous()
    vocab, image_token = dec.vocab_size, cfg.image_token_id
    if not 0 <= image_token < vocab:
        # transformers looks the placeholder up in the embedding: give it one extra (zero) row.
        # Its logit column is then 0; compare logits over the first `vocab` columns.
        image_token, vocab = vocab, vocab + 1
        for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], sd[k].new_zeros(1, sd[k].shape[1])])
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file({"vm_head.weight": model.vm_head.weight.detach().cpu().contiguous()},
              os.path.join(out_dir, "vm_head.safetensors"), metadata={"format": "pt"})
    text = dict(model_type=dec.kind, vocab_size=vocab, hidden_size=dec.dim, intermediate_size=dec.hidden,
                num_hidden_layers=dec.layers, num_attention_heads=dec.heads, num_key_value_heads=dec.kv_heads,
                head_dim=dec.hd, rms_norm_eps=dec.eps, rope_theta=dec.rope_theta,
                max_position_embeddings=dec.max_seq_len, hidden_act="silu", tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False)
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
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
