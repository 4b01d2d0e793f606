"""
Running a trained model: loading it, building its prompts, and decoding (what sample.py, eval.py and a
server share). model.py holds the architecture; the decoding machinery lives here, as nanochat keeps
its engine apart from its model.

    model, tok = load_model("out/shapes/stage4/final", device="auto", dtype="auto")
    ids = prompt_ids(model, tok, "What shape is in the center?", has_image=True)
    for tok_ids in generate_stream(model, torch.tensor([ids]), pixel_values, stop_ids=stop_ids(tok)):
        ...                                        # (B,) the next token of every row

Decoding: the prompt is one ordinary forward pass (the prefill) that fills a preallocated KVCache;
each new token then goes through `decode_step`, whose shapes are fixed by the cache, so that one
compiled graph (a CUDA graph on a GPU) serves every token (docs/eval.md §Decoding).

dtype "auto" is bfloat16 on a GPU and float32 on a CPU. Weights are converted tensor by tensor as they
are read (model.from_pretrained), so a bf16 checkpoint loaded in bf16 never exists in float32: a 7B
model (about 7.1e9 parameters with its CLIP tower) takes 2 bytes x 7.1e9 = 14.2 GB, which fits one
24 GB GPU with room for the KV cache, where float32 (28.4 GB) does not.
"""

import os
import sys

import torch

import conversation
from errors import InputError  # noqa: F401 (sample.py and eval.py take it from here)
import weights
from model import DecoderConfig, rope_cos_sin
from tokenizer import load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def why(e):
    """A short reason for an exception while reading a file: 'no such file', 'not an image', ..."""
    from PIL import UnidentifiedImageError
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can read"
    if isinstance(e, InputError):  # our own refusals say it all (the image gate's, a config's)
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return f"{type(e).__name__}: {e}"


def read_image(source, max_pixels=None):
    """An image through the gate every reader shares (data.open_image: special files, sizes and the
    padded square refused before decoding), from a path or the file's bytes, with an InputError
    naming the file when it cannot be read. What a server calls with a request's bytes."""
    import data
    try:
        return data.open_image(source, max_pixels or data.MAX_PIXELS)
    except Exception as e:  # missing, a directory, a FIFO, unreadable, not an image, truncated, too large
        where = "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else f"image {source}"
        raise InputError(f"cannot read {where}: {why(e)}") from None


WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
MODEL_FILES = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def weights_fingerprint(ckpt, sample=4096):
    """A fingerprint of the model in a checkpoint directory (blake2b, 16 bytes, hex), quick at any size:
    config.json and the tokenizer whole, and of each weight file its size, its header and the first and
    last `sample` bytes of every tensor (training changes a tensor everywhere, so another checkpoint of
    the same shapes differs there; a 7B checkpoint costs a few MB of reads). .bin files are hashed whole.
    What eval.py's answer file records (docs/eval.md §Which run wrote an answer file)."""
    import hashlib
    import json
    import struct
    h = hashlib.blake2b(digest_size=16)
    if os.path.isfile(ckpt):  # a GGUF LLM: one file, hashed whole
        with open(ckpt, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()
    for name in sorted(os.listdir(ckpt)):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path) or not (name in MODEL_FILES or name.endswith(WEIGHT_FILES)):
            continue
        h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            if not name.endswith(".safetensors"):
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                continue
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            head = f.read(min(n, 100 << 20))
            h.update(head)
            try:
                tensors = json.loads(head)
            except ValueError:  # not a safetensors header: loading will say so; the bytes read are hashed
                continue
            for key in sorted(k for k in tensors if k != "__metadata__"):
                start, end = tensors[key]["data_offsets"]
                for at in sorted({start, max(start, end - sample)}):
                    f.seek(8 + n + at)
                    h.update(f.read(min(sample, end - at)))
    return h.hexdigest()


def check_prompt_length(model, ids, where="the prompt"):
    """An InputError when a prompt alone is longer than the decoder's context length (max_seq_len)."""
    limit = model.cfg.decoder.max_seq_len
    if len(ids) > limit:
        raise InputError(f"{where} is {len(ids)} tokens (image patches included), over the model's context "
                         f"length of {limit} tokens")


def resolve_device(device="auto"):
    """'auto': the GPU if there is one, else the CPU; anything else is passed through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype="auto", device="cpu"):
    """'auto': bf16 on a GPU, fp32 on a CPU (bf16 matmuls are slow there); or bf16 / fp16 / fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_compile(compile="auto", device="cpu"):
    """Whether decoding runs its static-cache step through torch.compile. 'auto': on a GPU (CUDA
    graphs: one replay per token instead of hundreds of kernel launches), off on a CPU, where a chat
    answer of a few tokens does not win back the 11-17 s the first call spends compiling (bench/vs_transformers.py
    --decode; README §Talking to a model, docs/eval.md §Decoding); 'on' / 'off' force it."""
    if compile in (True, False):
        return compile
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"unknown compile setting {compile!r}; choose auto, on, off")
    if compile == "auto":
        return str(device).startswith("cuda")
    return compile == "on"


def load_model(ckpt, tokenizer=None, device="cpu", dtype="auto", pseudo_image_features=False, template=None,
               compile="off"):
    """(model in eval mode, tokenizer) from a nanoVT checkpoint or a llava-hf directory; the tokenizer
    is `tokenizer` (a tokenizer.model file or folder) or the one beside the weights. `template`
    overrides the chat template the checkpoint says it was trained with; `compile` (auto / on / off,
    resolve_compile) sets whether its decoding steps are compiled."""
    from gguf_file import is_gguf
    if not os.path.exists(os.path.join(ckpt, "config.json")) and not is_gguf(ckpt):
        raise InputError(f"no model at {ckpt} (no config.json): pass a nanoVT checkpoint, a llava-hf directory "
                         f"or a GGUF LLM file")
    tok_path = tokenizer or ckpt
    tok_file = os.path.join(tok_path, "tokenizer.model") if os.path.isdir(tok_path) else tok_path
    if not os.path.isfile(tok_file):
        raise InputError(f"no tokenizer at {tok_file}: " + ("pass --tokenizer FILE (a tokenizer.model)"
                                                            if not tokenizer else "pass a tokenizer.model file"))
    try:
        tok = load_tokenizer(tok_path)
    except Exception as e:
        raise InputError(f"cannot read tokenizer {tok_file}: {why(e)}") from None
    device = resolve_device(device)
    model = weights.from_pretrained(ckpt, dtype=resolve_dtype(dtype, device), device=device).eval()
    if pseudo_image_features:
        model.cfg.pseudo_image_features = True  # Eq. 8 at inference
    if template:
        if template not in conversation.TEMPLATES:
            raise ValueError(f"unknown template {template!r}; "
                             f"choose one of {', '.join(conversation.TEMPLATES)}")
        model.cfg.template = template  # every prompt is rendered in model.cfg.template
    model.compile_decode = resolve_compile(compile, device)  # generate_stream's default
    return model, tok


def prompt_text(model, text, has_image, history=()):
    """The rendered generation prompt: the chat so far + a new user turn, ending at the assistant's
    prefix, in the model's own template (the image goes with the first user turn)."""
    turns = list(history) + [{"from": "human", "value": (conversation.IMAGE_TAG + "\n" + text) if has_image and
                              not history else text}]
    return conversation.render_conversation(turns, model.cfg.template, has_image=has_image)


def prompt_ids(model, tok, text, has_image, history=()):
    """Token ids of prompt_text(...), image positions holding config.image_token_id."""
    return conversation.tokenize_prompt(prompt_text(model, text, has_image, history), tok,
                                        model.cfg.image_token_id, model.cfg.vision.num_patches)


def stop_ids(tok):
    return [tok.eos_id]


def add_args(p, device_default="auto"):
    """The --device / --dtype / --template / --compile flags both scripts take."""
    p.add_argument("--device", default=device_default, help="auto (GPU if any), cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights' dtype: auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--template", choices=conversation.TEMPLATES, default=None,
                   help="chat template (default: the one the checkpoint was trained with)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the decoding step (static KV cache; CUDA graphs on a GPU): auto = on a GPU only")


# ----------------------------------------------------------------------------------------------
# decoding: the KV cache, the fixed-shape step, and the token stream


class KVCache:
    """Preallocated keys/values, a (B, kv_heads, max_len, head_dim) tensor each per layer, that the decoder's
    attention (model.Attention) writes into and reads from.

    `valid` (B, max_len) marks real (non-padding) keys; `pos` (B,) is the next RoPE position per row;
    `index` (0-d) is the next slot, the same for every row (left padding keeps rows aligned), as a tensor
    so that a decode step written with it has the same shapes and inputs every token (`decode_step`).
    """

    def __init__(self, cfg: DecoderConfig, batch, max_len, dtype, device):
        # one tensor per layer, not one stacked tensor: under torch.compile an in-place write into a view
        # of a graph input becomes a copy of that whole input, so a stacked cache would be copied per layer
        shape = (batch, cfg.kv_heads, max_len, cfg.hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.len = 0  # filled length as a Python int (the prefill and the dynamic decode path use it)
        self.max_len = max_len
        self.shape = (batch, max_len, dtype, torch.device(device))

    def reset(self):
        """Empty again, for the next prompt: keys and values stay (every slot is rewritten before a
        query can see it), the masks and counters go back to zero."""
        self.valid.zero_()
        self.pos.zero_()
        self.index.zero_()
        self.len = 0
        return self

    def mark_static(self):
        """Tell torch.compile these buffers keep their addresses (CUDA graphs then replay in place)."""
        for t in (*self.k, *self.v, self.valid, self.pos, self.index):
            torch._dynamo.mark_static_address(t)
        return self


def new_cache(model, batch, max_len):
    """An empty KVCache for `batch` rows of up to `max_len` tokens, in the model's dtype and device."""
    p = model.mm_head.weight
    return KVCache(model.cfg.decoder, batch, max_len, p.dtype, p.device)


def decode_step(model, tok, cache):
    """Next-token logits (B, C) of one new token per row, tok (B,), written into cache slot cache.index.

    Every shape is fixed by the cache (B, max_len) and no value is read back to the host, so one
    compiled graph (a CUDA graph under mode reduce-overhead) serves every step: the keys and values
    are written at the slot with index_copy_, and the query attends all max_len slots under a mask
    that keeps the filled, non-padding ones (and, with a sliding window w, those less than w back),
    which is the mask model.Decoder.attention_mask builds for the same query over the filled prefix.
    """
    dec, cfg = model.decoder, model.cfg.decoder
    slot = cache.index.view(1)
    x = dec.embed(tok[:, None])
    cache.valid.index_fill_(1, slot, True)
    cos, sin = rope_cos_sin(cache.pos[:, None], cfg.hd, cfg.rope_theta, x.dtype)
    kj = torch.arange(cache.max_len, device=x.device)
    m = cache.valid & (kj <= cache.index)[None]
    if cfg.sliding_window is not None:
        m = m & (cache.index - kj < cfg.sliding_window)[None]
    mask = m[:, None, None, :]  # (B, 1, 1, max_len)
    for i, block in enumerate(dec.blocks):
        x = block(x, cos, sin, mask, cache, i, slot)
    cache.pos.add_(1)
    cache.index.add_(1)
    return model.mm_head(dec.norm(x)[:, 0])


def compiled_step(model):
    """torch.compile of `decode_step` for this model, made once and kept on it (model._step_fn)."""
    if getattr(model, "_step_fn", None) is None:
        cuda = model.mm_head.weight.is_cuda
        # one graph per (model, batch, cache length): eval's batches and a test suite's models need
        # more than dynamo's default of 8 before it would fall back to eager without saying so
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

        def step(tok, cache):
            return decode_step(model, tok, cache)
        # reduce-overhead: CUDA graphs, one replay per token instead of ~10 launches per block
        model._step_fn = torch.compile(step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)
    return model._step_fn


def static_cache(model, batch, max_len, compiled):
    """A cache for batch x max_len. Compiled: one kept on the model (model._kept_cache) and reused while the
    shape fits (max_len rounded up to 128), so its buffers keep their addresses and the compiled step
    its graph; each new shape costs one compilation. Eager: a fresh one."""
    if not compiled:
        return new_cache(model, batch, max_len)
    max_len = -(-max_len // 128) * 128
    p = model.mm_head.weight
    c = getattr(model, "_kept_cache", None)
    if c is None or c.shape != (batch, max_len, p.dtype, p.device):
        model._kept_cache = c = None  # free the old one first
        c = model._kept_cache = new_cache(model, batch, max_len).mark_static()
    return c.reset()


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


@torch.no_grad()
def generate_stream(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=128, temperature=0.0,
                    top_k=None, top_p=None, stop_ids=(), generator=None, static=True, compile=None):
    """Yields the next token of every row, (B,), one step at a time, with a KV cache.

    Batches are left-padded (attention_mask 0 on the left). temperature 0 = greedy. Rows that
    produced a stop id keep yielding that id; the stream ends when every row has stopped.
    The prompt is one forward pass (the prefill); each new token then goes through `decode_step`
    on a static cache (static=True), compiled when `compile` (default: model.compile_decode, which
    load_model sets), or, with static=False, through the decoder's forward on a cache that grows by one
    key a step. A compiled stream reuses one cache kept on the model: finish or drop one stream before
    the next.
    """
    B, T = input_ids.shape
    compiled = static and (getattr(model, "compile_decode", False) if compile is None else compile)
    n = T + max_new_tokens
    cache = static_cache(model, B, n, compiled) if static else new_cache(model, B, n)
    cuda_graphs = compiled and input_ids.is_cuda
    out = model(input_ids, pixel_values, attention_mask, cache=cache, logits=False)
    logits = model.mm_head(out.hidden[:, -1])
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, stop[0] if len(stop) else tok, tok)
        yield tok
        done |= torch.isin(tok, stop)
        if bool(done.all()) or i == max_new_tokens - 1:  # no forward pass for a token never asked for
            return
        if static:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed
            logits = compiled_step(model)(tok, cache) if compiled else decode_step(model, tok, cache)
            cache.len += 1
        else:
            hidden = model.decoder(model.decoder.embed(tok[:, None]), None, cache)
            logits = model.mm_head(hidden[:, -1])


def generate(model, input_ids, pixel_values=None, max_new_tokens=128, **kw):
    """Returns (B, T + n) with the new tokens appended (rows that stopped early repeat their stop id);
    keywords as generate_stream's."""
    steps = list(generate_stream(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, **kw))
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


if __name__ == "__main__":
    sys.exit("inference.py is a library: run sample.py or eval.py")
