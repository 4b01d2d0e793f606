"""Tiny GGUF files written with the gguf package's GGUFWriter from tiny random transformers LLaMA / Mistral
models, the way llama.cpp's converter lays them out (its q/k row permutation, `llama.*` metadata, blk.N
tensor names). The expected weights are what transformers' own GGUF loader reads back from these
files, never nanoVT's output. Only tests import this."""

import numpy as np
import torch

VOCAB = 96  # a multiple of 32: every row of every matrix is a whole number of quantization blocks


def tiny_llm(kind="llama", seed=0, tied=False, vocab=VOCAB):
    """A random LlamaForCausalLM (4 heads, 4 KV heads) or MistralForCausalLM (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, rope_theta=10000.0, **common))
    else:
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, rope_theta=1e6, sliding_window=None, **common))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf reorders each head's q / k rows: (n_head, 2, half, d_in) -> swap."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model):
    """{GGUF name: float32 numpy array} of a transformers LLaMA-architecture model."""
    c, sd = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        a = f"model.layers.{i}."
        out.update({f"blk.{i}.attn_norm.weight": sd[a + "input_layernorm.weight"],
                    f"blk.{i}.attn_q.weight": llama_cpp_permute(sd[a + "self_attn.q_proj.weight"], c.num_attention_heads),
                    f"blk.{i}.attn_k.weight": llama_cpp_permute(sd[a + "self_attn.k_proj.weight"], c.num_key_value_heads),
                    f"blk.{i}.attn_v.weight": sd[a + "self_attn.v_proj.weight"],
                    f"blk.{i}.attn_output.weight": sd[a + "self_attn.o_proj.weight"],
                    f"blk.{i}.ffn_norm.weight": sd[a + "post_attention_layernorm.weight"],
                    f"blk.{i}.ffn_gate.weight": sd[a + "mlp.gate_proj.weight"],
                    f"blk.{i}.ffn_up.weight": sd[a + "mlp.up_proj.weight"],
                    f"blk.{i}.ffn_down.weight": sd[a + "mlp.down_proj.weight"]})
    return out


# ChatML as SmolLM2's file writes it, reduced to what the tiny tokenizer below needs
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def add_byte_tokenizer(w):
    """A byte-level BPE with no merges: the three control tokens (ids 0-2; bos <|im_start|>, eos and pad
    <|im_end|>) and one token per byte, in GPT-2's byte alphabet. Any text encodes, byte by byte."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    chars = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(SPECIALS + chars)
    w.add_token_types([3] * len(SPECIALS) + [1] * 256)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    return len(SPECIALS) + 256


def write_gguf(path, model, qtype="Q8_0", drop=(), extra=None, arch="llama", meta=None, name="tiny", tokenizer=False):
    """Write `model` as a GGUF file: matrices in `qtype`, norms in F32, as llama.cpp's quantizer leaves
    them. `drop` leaves tensors out, `extra` adds some, `meta` overrides metadata (None deletes a key);
    `tokenizer` adds add_byte_tokenizer's (the model's vocabulary must hold its 259 tokens)."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    fields = {f"{arch}.context_length": (c.max_position_embeddings, "uint32"),
              f"{arch}.embedding_length": (c.hidden_size, "uint32"),
              f"{arch}.block_count": (c.num_hidden_layers, "uint32"),
              f"{arch}.feed_forward_length": (c.intermediate_size, "uint32"),
              f"{arch}.rope.dimension_count": (c.hidden_size // c.num_attention_heads, "uint32"),
              f"{arch}.attention.head_count": (c.num_attention_heads, "uint32"),
              f"{arch}.attention.head_count_kv": (c.num_key_value_heads, "uint32"),
              f"{arch}.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, "float32"),
              f"{arch}.rope.freq_base": (float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
                                         "float32"),
              f"{arch}.vocab_size": (c.vocab_size, "uint32")}
    w.add_name(name)
    for k, v in (meta or {}).items():
        if v is None:
            fields.pop(k, None)
        else:
            fields[k] = v
    for k, (v, t) in fields.items():
        {"uint32": w.add_uint32, "float32": w.add_float32, "string": w.add_string}[t](k, v)
    if tokenizer:
        assert add_byte_tokenizer(w) <= c.vocab_size
    q = gguf.GGMLQuantizationType[qtype]
    tensors = {**gguf_tensors(model), **(extra or {})}
    for n, a in tensors.items():
        if n in drop:
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(n, a)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(n, a.astype(np.float16))
        else:
            data = gguf.quants.quantize(a, q)
            w.add_tensor(n, data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
