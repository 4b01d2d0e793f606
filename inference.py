"""
Loading a model for inference and building its prompts: what sample.py and eval.py share.

    model, tok = load_model("out/shapes/stage4/final", device="auto", dtype="auto")
    ids = prompt_ids(model, tok, "What shape is in the center?", has_image=True)

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
from model import VTLMM
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
    answer of a few tokens does not win back the 11-17 s the first call spends compiling (bench.py
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
    model = VTLMM.from_pretrained(ckpt, dtype=resolve_dtype(dtype, device), device=device).eval()
    if pseudo_image_features:
        model.cfg.pseudo_image_features = True  # Eq. 8 at inference
    if template:
        if template not in conversation.TEMPLATES:
            raise ValueError(f"unknown template {template!r}; "
                             f"choose one of {', '.join(conversation.TEMPLATES)}")
        model.cfg.template = template  # every prompt is rendered in model.cfg.template
    model.compile_decode = resolve_compile(compile, device)
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


if __name__ == "__main__":
    sys.exit("inference.py is a library: run sample.py or eval.py")
