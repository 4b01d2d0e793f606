"""
Data for nanoVT: tokenizers, chat templates, images, LLaVA datasets.

Read top to bottom:
  1. tokenizers     one small interface over sentencepiece and tiktoken (LLaMA-3) files
  2. chat templates plain / vicuna_v1 / mistral_instruct / vw_mistral, tokenised once; the
                    labels are LLaVA-1.5's (docs/data.md §Labels)
  3. images         LLaVA-1.5's recipe: pad to square with the CLIP mean colour, CLIP resize,
                    centre crop, normalise
  4. datasets       LLaVA JSON conversations (stages I, II, IV), images only (stage III),
                    collate, length-grouped sharded sampler

Bad input (LlavaDataset / ImageOnlyDataset). Default: skip the sample, log one warning with
its id and reason, count it (`.skipped`, `.report()`); with strict=True raise instead. Found when
the file is read, before step 1, so the sampler only ever serves usable samples:
  - malformed JSON            ValueError naming file, line and column; JSON Lines content in a
                              .json file, and bytes that are not UTF-8 (file, byte offset, line),
                              get their own messages; a UTF-8 byte-order mark is accepted. These
                              fail even when strict=False (nothing to skip to).
  - LLaVA's repairs           a first turn from "gpt" is dropped (LLaVA: source[1:]); a last human
                              turn without an answer is dropped, the answered turns kept. Counted
                              in `.repaired` and the report.
  - empty conversations, turns not alternating human/gpt, a single unanswered question, two
    <image> tags, <image> in an assistant turn, <image> but no "image" field, an "image" field
    that is not a string (a list, a number)          skipped with the reason
  - "image" field but no <image> tag   LLaVA's data always has the tag; we prepend "<image>\n"
                              to the first human turn (the JSON says the image belongs there)
  - missing image files       a parallel scan of every path; skipped, with one summary "N of M
                              images missing, by folder" (a missing sub-folder never stops a run)
Found when an item is loaded; the loader then serves the next sample instead, so a run never
crashes at step 40,000 (strict: raise), and the skip reaches the main process with the batch:
  - corrupt or truncated image file, an image over `max_pixels` (decompression bomb)
  - a sample whose image block does not fit in max_len, or with no answer left after truncation
"""

import array
import codecs
import hashlib
import json
import mmap
import os
import logging
import math
import re
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("nanovt.data")

IGNORE_INDEX = -100      # label of positions that carry no loss (torch's cross_entropy default)
IMAGE_TOKEN_ID = -200    # nanoVT's image placeholder: a sentinel outside every vocabulary
IMAGE_TAG = "<image>"    # marks the image in LLaVA's JSON and in rendered prompts
EOS_TAG = "</s>"         # end of an assistant turn in rendered prompts; always the tokenizer's eos id

# -----------------------------------------------------------------------------
# 1. Tokenizers: encode (no BOS/EOS), decode, bos_id / eos_id / pad_id, vocab_size, piece(i)


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model` (LLaMA, Vicuna, Mistral, the shapes world)."""

    def __init__(self, path, config=None):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self._sp_bare = None  # the same model without the dummy prefix, made when first needed
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA has no pad piece; like LLaVA (pad_token = unk_token) we then pad with unk, id 0
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        # tokenizer_config.json as the released model ships it (see tokenizer_config()); without one,
        # plain sentencepiece: BOS first, a dummy-prefix space before every chunk of text (legacy)
        config = tokenizer_config(path) if config is None else config
        self.legacy = bool(config.get("legacy", True))
        self.add_bos = bool(config.get("add_bos_token", True))
        for name in ("bos", "eos", "pad"):
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                i = self.sp.piece_to_id(token)
                if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
                    raise ValueError(f"{Path(path).parent / 'tokenizer_config.json'}: {name}_token {token!r} "
                                     f"is not a piece of {path}")
                setattr(self, f"{name}_id", i)

    def encode(self, text, dummy_prefix=True):
        return self._model(dummy_prefix).encode(text)

    def encode_with_offsets(self, text, dummy_prefix=True):
        """[(id, char_start, char_end)] for one tokenisation of `text`. dummy_prefix=False: without
        sentencepiece's leading "▁" (how transformers' LlamaTokenizer, legacy=False, tokenises text
        that follows a special token)."""
        try:
            r = self._model(dummy_prefix).encode(text, out_type="offset_mapping")
        except (ValueError, TypeError, RuntimeError) as e:
            raise RuntimeError("this sentencepiece has no out_type='offset_mapping'; use >= 0.2.3") from e
        return [(i, s, e) for i, (s, e) in zip(r["ids"], r["offsets"])]

    def _model(self, dummy_prefix):
        if dummy_prefix:
            return self.sp
        if self._sp_bare is None:
            import sentencepiece as spm
            # The model file is a protobuf ModelProto; a second normalizer_spec message (field 3)
            # appended to it is merged into the first by the parser, so these 4 bytes set only
            # NormalizerSpec.add_dummy_prefix (its field 3, a bool) to false.
            proto = self.sp.serialized_model_proto() + bytes([0x1A, 0x02, 0x18, 0x00])
            self._sp_bare = spm.SentencePieceProcessor(model_proto=proto)
        return self._sp_bare

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def piece(self, i):
        return self.sp.id_to_piece(int(i))  # e.g. "▁red": ▁ marks a word start


# The LLaMA-3 pre-tokenizer: contractions, words, 1-3 digit numbers, punctuation runs, whitespace
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_special_tokens():
    """LLaMA-3's 256 special tokens, in id order right after the BPE ranks (128000..128255)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    return names


class TiktokenTokenizer:
    """A LLaMA-3 style `tokenizer.model`: lines of "<base64 bytes> <rank>" for tiktoken.

    Special tokens are LLaMA-3's, appended after the ranks: <|begin_of_text|> is BOS,
    <|end_of_text|> is EOS (and pad: LLaMA-3 has no pad token).
    """

    def __init__(self, path):
        import base64
        import tiktoken
        ranks = {}
        for line in Path(path).read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        specials = {name: len(ranks) + k for k, name in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(Path(path).name, pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self.enc.n_vocab
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.pad_id = self.eos_id
        self.legacy, self.add_bos = True, True  # byte-level BPE has no dummy prefix to drop

    def encode(self, text, dummy_prefix=True):
        return self.enc.encode(text, disallowed_special=())  # special-token text is plain text here

    def encode_with_offsets(self, text, dummy_prefix=True):
        ids = self.encode(text)
        _, starts = self.enc.decode_with_offsets(ids)
        return [(i, s, e) for i, s, e in zip(ids, starts, starts[1:] + [len(text)])]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def piece(self, i):
        return self.enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")


def tokenizer_config(path):
    """The tokenizer_config.json beside a tokenizer.model, as a dict ({} when there is none).

    What nanoVT reads from it, as transformers' LlamaTokenizer does:
      legacy          (default true) false: text right after a special token (</s>) is tokenised
                      without sentencepiece's dummy-prefix space (Vicuna: "USER" one piece, not
                      "▁US" "ER"; Mistral: "[" not "▁["). LLaVA-1.5 was trained with legacy
                      behaviour: docs/data.md §Tokenizers.
      add_bos_token   (default true) whether a prompt starts with BOS
      bos_token / eos_token / pad_token   a piece of the model (a string or {"content": ...})
    """
    cpath = Path(path).parent / "tokenizer_config.json"
    if not cpath.is_file():
        return {}
    try:
        config = json.loads(cpath.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cpath}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cpath}: expected a JSON object")
    return config


def load_tokenizer(path, legacy=None):
    """A tokenizer from `tokenizer.model` or a directory holding one; the kind is read from the content.

    A tokenizer_config.json beside it is honoured (tokenizer_config()); `legacy` overrides its value."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    with open(path, "rb") as f:
        head = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", head):  # tiktoken rank files are text lines
        return TiktokenTokenizer(path)
    config = tokenizer_config(path)  # otherwise a sentencepiece ModelProto (binary)
    return SentencePieceTokenizer(path, config if legacy is None else {**config, "legacy": legacy})


def train_sentencepiece(texts, out_path, vocab_size=1024, user_defined_symbols=(), max_sentences=200_000):
    """Train a small LLaMA-like BPE sentencepiece model on `texts`; returns its tokenizer.

    ids: unk 0, bos 1, eos 2 (as LLaMA), pad 3. Deterministic: one thread, input in the given
    order, no sampling beyond the first `max_sentences`. Frequent words become whole pieces
    ("▁red") because BPE merges them first; `user_defined_symbols` are forced into the vocabulary.
    """
    import sentencepiece as spm
    texts = [t for t in texts if t.strip()][:max_sentences]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # text in = text out, as LLaMA
            user_defined_symbols=list(user_defined_symbols), hard_vocab_limit=False,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2)
    return SentencePieceTokenizer(out_path)


# -----------------------------------------------------------------------------
# 2. Chat templates (docs/data.md §Templates) and tokenisation with label masking (§Labels)

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "vicuna_v1", "mistral_instruct", "vw_mistral")


def _move_image_tag_to_front(turns, has_image):
    """LLaVA's rule: the human turn holding <image> becomes "<image>\\n" + the rest, stripped."""
    turns = [dict(t) for t in turns]
    tagged = [t for t in turns if IMAGE_TAG in t["value"]]
    if has_image and not tagged:  # an image with no tag: it belongs to the first question
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
    elif not has_image and tagged:
        raise ValueError("<image> tag but no image file")
    for t in turns:
        if IMAGE_TAG in t["value"]:
            t["value"] = (IMAGE_TAG + "\n" + t["value"].replace(IMAGE_TAG, "").strip()).strip()
    return turns


def render_segments(conversations, template, has_image=None):
    """The rendered prompt as [(text, supervised)] pieces; "".join(texts) is render_conversation().

    If the conversation ends with a human turn, the prompt ends with the assistant's prefix
    (the generation prompt used by sample.py and evaluation).
    """
    has_image = any(IMAGE_TAG in t["value"] for t in conversations) if has_image is None else has_image
    turns = _move_image_tag_to_front(conversations, has_image)
    if template == "plain":  # stage I: the human text is dropped, only the caption is learned
        segs = [(IMAGE_TAG, False)] if has_image else []
        return segs + ([(turns[1]["value"] + "\n", True)] if len(turns) > 1 else [])
    segs = []
    for k, t in enumerate(turns):
        if template == "vicuna_v1":
            if t["from"] == "human":
                segs.append(((SYSTEM_VICUNA + " " if k == 0 else "") + "USER: " + t["value"] + " ASSISTANT: ", False))
            else:
                segs.append((t["value"] + EOS_TAG, True))
        elif template == "mistral_instruct":
            if t["from"] == "human":
                segs.append(("[INST] " + t["value"] + " [/INST] ", False))
            else:
                segs.append((t["value"] + " " + EOS_TAG, True))
        elif template == "vw_mistral":  # the VW-LMM authors' "mistral" style: no spaces around answers
            if t["from"] == "human":
                segs.append(("[INST] " + t["value"] + " [/INST]", False))
            else:
                segs.append((t["value"] + EOS_TAG, True))
        else:
            raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    if turns[-1]["from"] == "human":  # generation prompt: no trailing space after the prefix
        segs[-1] = (segs[-1][0].rstrip(" "), False)
    return segs


def render_conversation(conversations, template, has_image=None):
    """The prompt string of docs/data.md §Templates, with <image> and </s> as text."""
    return "".join(text for text, _ in render_segments(conversations, template, has_image))


_MARKERS = re.compile(re.escape(IMAGE_TAG) + "|" + re.escape(EOS_TAG))


def _dummy_prefix(tokenizer, marker):
    """Whether the text chunk after `marker` (None: the start) gets sentencepiece's dummy-prefix space.

    At the start and after <image>: yes, as LLaVA's tokenizer_image_token, which tokenises every
    chunk between images in its own call. After </s>: as the tokenizer is configured (legacy=True,
    the default: yes, as the slow LLaMA tokenizer LLaVA-1.5 trained with; legacy=False: no)."""
    return marker != EOS_TAG or getattr(tokenizer, "legacy", True)


def _tokenize_text(text, tokenizer, image_token_id, num_patches):
    """[(id, char_start, char_end)] for a rendered prompt: split only at <image> and </s>."""
    out, pos, marker = [], 0, None
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if end > pos:  # each text chunk is tokenised once
            out += [(i, pos + s, pos + e) for i, s, e in
                    tokenizer.encode_with_offsets(text[pos:end], dummy_prefix=_dummy_prefix(tokenizer, marker))]
        if m:
            marker = m.group()
            ids = [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            out += [(i, m.start(), m.end()) for i in ids]
            pos = m.end()
    return out


def tokenize_prompt(text, tokenizer, image_token_id=IMAGE_TOKEN_ID, num_patches=576):
    """BOS + the whole rendered prompt tokenised at once: the reference tokenize_conversation must equal."""
    out, pos, marker = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else [], 0, None
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if end > pos:
            out += tokenizer.encode(text[pos:end], dummy_prefix=_dummy_prefix(tokenizer, marker))
        if m:
            marker = m.group()
            out += [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            pos = m.end()
    return out


def tokenize_conversation(conversations, tokenizer, template, image_token_id=IMAGE_TOKEN_ID,
                          num_patches=576, has_image=None):
    """(input_ids, labels) of one conversation: LLaVA-1.5's input_ids and supervised positions.

    The rendered prompt is tokenised once; a token is supervised if it starts inside an assistant
    answer or its </s>, or in the space that ends the user segment right before an answer
    (below). So the ids are, by construction, those of the whole prompt, and LLaVA's
    "tokenization mismatch" (per-round lengths, counted from separately tokenised rounds, that
    disagree with the whole prompt; LLaVA then masks the whole sample) cannot happen: no length
    is counted apart from the one tokenisation.
    Labels are IGNORE_INDEX on BOS, system prompt, user turns and image positions.
    """
    segs = render_segments(conversations, template, has_image)
    spans, pos = [], 0
    for k, (text, supervised) in enumerate(segs):
        start = pos
        # Why the "▁" before some answers is supervised: LLaVA (preprocess_v1 / preprocess_llama_2)
        # masks len(tokens("... ASSISTANT: ")) - 2 tokens of a round, BOS and the piece of that
        # trailing space; everything after is supervised. When an answer starts with a character
        # the tokenizer does not join to a preceding space (a digit, CJK, a newline, an emoji with
        # the LLaMA-2 and Mistral tokenizers), the space stays a bare "▁" piece and LLaVA supervises
        # it, so a model learns to start such answers. The space belongs to the answer's span here.
        if supervised and k and not segs[k - 1][1] and segs[k - 1][0].endswith(" "):
            start -= 1
        if supervised:
            spans.append((start, pos + len(text)))
        pos += len(text)
    # BOS as an id, plain included (as LLaVA), unless the tokenizer's config says add_bos_token: false
    input_ids = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, s, e in _tokenize_text("".join(t for t, _ in segs), tokenizer, image_token_id, num_patches):
        # a token that starts in the user segment stays with it, even if it runs into the answer
        # ("](" with vw_mistral's "[/INST](b)"): LLaVA counts it in len(tokens(instruction))
        hit = any(a <= s < b for a, b in spans)
        input_ids.append(i)
        labels.append(i if hit and i != image_token_id else IGNORE_INDEX)
    return input_ids, labels


REPAIRS = {"first": "dropped a first turn from gpt", "last": "dropped a last question without an answer"}


def repair_conversations(sample):
    """(sample, repairs): the sample with LLaVA's repairs made, and their names (REPAIRS values).

    A first turn from gpt is dropped (LLaVA's preprocess does source[1:]). A last human turn
    without an answer is dropped, so the answered turns before it are kept (LLaVA would mask the
    whole sample). Anything else is left for check_conversations to judge. The input is not changed.
    """
    turns = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return sample, []
    repairs = []
    if turns and turns[0].get("from") == "gpt":
        turns, repairs = turns[1:], repairs + [REPAIRS["first"]]
    if len(turns) > 1 and turns[-1].get("from") == "human":
        turns, repairs = turns[:-1], repairs + [REPAIRS["last"]]
    return ({**sample, "conversations": turns} if repairs else sample), repairs


def check_conversations(sample):
    """Why a LLaVA JSON sample is unusable, or None if it is fine (cheap: text and field types only;
    run repair_conversations first to get LLaVA's repairs)."""
    if not isinstance(sample, dict):
        return f"not a JSON object ({type(sample).__name__})"
    image = sample.get("image")
    if image is not None and not isinstance(image, str):
        return f"image field is not a string ({type(image).__name__}; one image path per sample)"
    turns = sample.get("conversations")
    if turns is not None and not isinstance(turns, list):
        return f"conversations is not a list ({type(turns).__name__})"
    if not turns:
        return "empty conversations"
    if not all(isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
               for t in turns):
        return "malformed turn (needs from: human|gpt and a string value)"
    if turns[0]["from"] != "human":
        return "first turn is from the assistant"
    if any(t["from"] != ("human", "gpt")[k % 2] for k, t in enumerate(turns)):
        return "turns do not alternate human/gpt"
    if turns[-1]["from"] != "gpt":
        return "last turn has no answer"
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if n_tags > 1:
        return f"{n_tags} <image> tags (one image per sample)"
    if any(IMAGE_TAG in t["value"] for t in turns if t["from"] == "gpt"):
        return "<image> in an assistant turn"
    if n_tags and not sample.get("image"):
        return "<image> tag but no image file"
    return None


# -----------------------------------------------------------------------------
# 3. Images: LLaVA-1.5's recipe (docs/data.md §Images)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA truncates, not rounds
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ a 9459 x 9459 image)


def to_rgb(image):
    """PIL image of any mode -> RGB. As LLaVA (`.convert("RGB")`), alpha is dropped, not composited;
    16-bit greys are scaled to 8 bits (PIL's convert would clip them at 255: a white image)."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image, background=CLIP_MEAN_RGB):
    """Centre the image on a square canvas of its longer side (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, background)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def process_image(image, size, pad_to_square=True):
    """PIL image -> float tensor (3, size, size): CLIPImageProcessor's steps after LLaVA's padding."""
    image = to_rgb(image)
    if pad_to_square:
        image = expand_to_square(image)
    w, h = image.size  # resize the shortest edge to `size` (bicubic), the long edge as HF: int()
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2  # centre crop
    x = np.asarray(image)[top:top + size, left:left + size]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale in float64 then float32, as HF
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)


def load_image(path, max_pixels=MAX_PIXELS):
    """Open, fully decode and convert an image file; raises on missing, corrupt, truncated, or too large."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning is a refusal here
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:  # checked from the header, before decoding
                raise ValueError(f"decompression bomb: {im.width}x{im.height} > {max_pixels} pixels")
            im.load()  # decode now, so truncated files fail here (LOAD_TRUNCATED_IMAGES stays off)
            return to_rgb(im)


# -----------------------------------------------------------------------------
# 4. Datasets, collate, sampler


def read_text_utf8(path):
    """A file's text: UTF-8, a leading byte-order mark dropped; other bytes are an error naming the
    file, the byte offset and the line."""
    raw = Path(path).read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw[:at].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{raw[at]:02x} at byte offset {at} (line {line}); "
                         f"save the file as UTF-8") from None


def read_json(path):
    """A JSON list (or JSON lines if the file ends in .jsonl); errors name the file, line and column."""
    text = read_text_utf8(path)
    if not str(path).endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one whole JSON value, then more: most likely one sample per line
                raise ValueError(
                    f"{path}: a second JSON value starts at line {e.lineno}, column {e.colno}; this looks like "
                    f"JSON Lines (one sample per line): name the file .jsonl, or write one JSON list") from None
            raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    return rows


def find_missing_images(image_folder, paths, workers=32):
    """The indices of `paths` (relative to image_folder) that are not files; a parallel scan.

    os.stat releases the GIL, so threads overlap the file system's latency (a network disk, a
    cold cache); each thread checks a block of paths, so a warm local disk costs what one loop does."""
    from concurrent.futures import ThreadPoolExecutor
    folder, paths = str(image_folder), list(paths)
    block = max(1, math.ceil(len(paths) / (workers * 4)))
    blocks = [paths[i:i + block] for i in range(0, len(paths), block)]
    with ThreadPoolExecutor(max(1, min(workers, len(blocks)))) as pool:
        found = pool.map(lambda ps: [os.path.isfile(os.path.join(folder, p)) for p in ps], blocks)
        found = [ok for part in found for ok in part]
    return [k for k, ok in enumerate(found) if not ok]


def missing_summary(paths, total):
    """ "N of M images missing, by folder: a/b 3, c 1" for the missing relative paths."""
    by_folder = Counter(os.path.dirname(p) or "." for p in paths)
    return (f"{len(paths)} of {total} images missing, by folder: "
            + ", ".join(f"{folder} {n}" for folder, n in sorted(by_folder.items(), key=lambda x: (-x[1], x[0]))))


def write_atomic(path, write):
    """Write a file whole or not at all: `write(f)` into a temporary file beside it (named by host
    and pid, so writers on a shared disk never collide), fsync, rename over `path`, fsync the folder."""
    path = str(path)
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SampleIndex:
    """Samples kept compactly: each one's JSON in one bytes buffer, found by an offsets array and
    decoded when asked for. Parsed dicts cost several times the file's size per rank (3.4x for
    mix665k-like samples: bench/data_memory.py), and DataLoader workers copy them page by page as
    reference counts change (copy-on-write); one buffer and one array do neither. Indexing and iteration give fresh dicts, so callers cannot change it."""

    _paths = None  # (blob file, offsets .npy) when memory-mapped from a read cache

    def __init__(self, samples):
        chunks = [json.dumps(s, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for s in samples]
        self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
        self._blob = b"".join(chunks)

    @classmethod
    def mapped(cls, blob_path, offsets_path):
        """A SampleIndex over files written by save(): both memory-mapped read-only, so processes
        that map the same files share one copy in the page cache."""
        self = cls.__new__(cls)
        self._paths = (str(blob_path), str(offsets_path))
        self._map()
        return self

    def _map(self):
        blob_path, offsets_path = self._paths
        self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        with open(blob_path, "rb") as f:  # the map stays valid after the file is closed
            size = os.fstat(f.fileno()).st_size
            self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if self._offsets.ndim != 1 or len(self._offsets) < 1 or self._offsets[-1] != size:
            raise ValueError(f"{blob_path}: {size} bytes, but {offsets_path} ends at "
                             f"{self._offsets[-1] if len(self._offsets) else None}")

    def save(self, blob_path, offsets_path):
        """Write the buffer and the offsets (a .npy of int64), each atomically."""
        write_atomic(blob_path, lambda f: f.write(self._blob))
        write_atomic(offsets_path, lambda f: np.save(f, np.asarray(self._offsets, np.int64), allow_pickle=False))

    def __getstate__(self):  # DataLoader workers started by spawn/forkserver map the files again
        return {"_paths": self._paths} if self._paths else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._paths:
            self._map()

    def __len__(self):
        return len(self._offsets) - 1

    def __getitem__(self, j):
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        return json.loads(self._blob[self._offsets[j]:self._offsets[j + 1]])

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class _SkippingDataset(torch.utils.data.Dataset):
    """Shared bad-sample handling: warn once per sample, count per reason, serve the next sample.

    Skips are keyed by the sample's position (("read", k) in the file, ("load", j) in .samples),
    so two bad samples that share an id count twice and one sample seen again counts once.
    Counting across processes: DataLoader workers are copies of this object, so what they count
    stays with them; each item carries the skips made while loading it ("skipped"), collate
    gathers them into the batch, and the training loop hands them to note_skipped() in the main
    process. Ranks combine their load-time skips with merge_load_skips(); read-time skips are the
    same on every rank (each reads the whole file) and are counted once.
    """

    max_tries = 64  # this many bad samples in a row means the data is broken: raise

    def _init_skips(self, strict):
        self.strict, self.skipped, self._counted = strict, Counter(), {}
        self.repaired, self.missing = Counter(), ""

    def _skip(self, key, sample_id, reason, warn=True):
        if self.strict:
            raise ValueError(f"sample {sample_id}: {reason}")
        if key not in self._counted:  # count each bad sample once, however many epochs
            self._counted[key] = (sample_id, reason)
            self.skipped[reason.split(":")[0]] += 1
            if warn:
                log.warning("skipping sample %s: %s", sample_id, reason)

    def note_skipped(self, skipped):
        """Count skips reported by a batch (collate's "skipped": (index, id, reason) triples)."""
        for j, sample_id, reason in skipped:
            self._skip(("load", j), sample_id, reason, warn=False)  # the worker has warned

    def load_skips(self):
        """{index: (id, reason)} of the samples skipped while loading: what ranks exchange."""
        return {key[1]: v for key, v in self._counted.items() if key[0] == "load"}

    def merge_load_skips(self, per_rank):
        """Add other ranks' load_skips(); a sample skipped on two ranks counts once."""
        for skips in per_rank:
            for j, (sample_id, reason) in skips.items():
                self._skip(("load", j), sample_id, reason, warn=False)

    def report(self):
        total = sum(self.skipped.values())
        text = f"skipped {total} samples" + (": " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
                                             if total else "")
        if self.repaired:
            text += "; repaired " + ", ".join(f"{n} ({r})" for r, n in self.repaired.most_common())
        return text + (f"; {self.missing}" if self.missing else "")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        skipped = []
        for k in range(self.max_tries):
            j = (index + k) % len(self.samples)
            try:
                item = self._load(j)
                item["skipped"] = skipped  # lets the main process count skips made in workers
                return item
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as e:  # what PIL and our checks raise on bad data
                sid = str(self.samples[j].get("id", j))
                bomb = isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning))
                reason = (f"decompression bomb: {e}" if bomb else str(e) if isinstance(e, ValueError)
                          else f"bad image: {type(e).__name__}: {e}")
                self._skip(("load", j), sid, reason)
                skipped.append((j, sid, reason))
        raise RuntimeError(f"{self.max_tries} bad samples in a row from index {index}: {self.report()}")

    def _drop_missing_images(self, rows, where):
        """Read-time check: skip the samples in `rows` [(key, id, sample)] whose image file is
        missing; return the others. Logs one summary by folder."""
        with_image = [r for r in rows if r[2].get("image")]
        gone = set(find_missing_images(self.image_folder, [r[2]["image"] for r in with_image]))
        if not gone:
            return rows
        self.missing = missing_summary([with_image[k][2]["image"] for k in sorted(gone)], len(with_image))
        log.warning("%s: %s (under %s)", where, self.missing, self.image_folder)
        gone_keys = {with_image[k][0] for k in gone}
        for key, sid, sample in rows:
            if key in gone_keys:
                self._skip(key, sid, f"missing image file: {Path(self.image_folder) / sample['image']}",
                           warn=len(gone) <= 20)  # past that, the summary says it better than warnings
        return [r for r in rows if r[0] not in gone_keys]

    def _pixels(self, image_file):
        path = Path(self.image_folder) / image_file
        if not path.is_file():
            raise ValueError(f"missing image file: {path}")
        return process_image(load_image(path, self.max_pixels), self.image_size)


class LlavaDataset(_SkippingDataset):
    """LLaVA JSON conversations (stage I with template "plain", II and IV with a chat template).

    Items: {"input_ids": (T,) long, "labels": (T,) long, "pixel_values": (3, H, W) float or None,
    "id": str}. Image paths are relative to `image_folder` (default: the JSON's directory).
    JSON and text checks run at init; images are read lazily.
    """

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, num_patches,
                 image_token_id=IMAGE_TOKEN_ID, max_len=2048, strict=False, max_pixels=MAX_PIXELS,
                 cache_dir=None, write_cache=True):
        assert template in TEMPLATES, f"unknown template {template!r}"
        self._init_skips(strict)
        self.image_folder = image_folder if image_folder is not None else Path(json_path).parent
        self.tokenizer, self.template, self.image_size = tokenizer, template, image_size
        self.num_patches, self.image_token_id = num_patches, image_token_id
        self.max_len, self.max_pixels = max_len, max_pixels
        # cache_dir: keep what the read found there (data.ReadCache), or take it from there; with
        # write_cache=False a missing cache is read here but not written (another process writes it)
        self.from_cache = False
        cache = ReadCache(cache_dir, self._cache_key(json_path)) if cache_dir is not None else None
        if cache and cache.load(self):
            log.info("%s: taken from the read cache %s (%s)", json_path, cache.folder / cache.stem, self.report())
            return
        if cache and not write_cache:
            log.warning("%s: no valid read cache in %s (the node's first process writes it); reading the file here",
                        json_path, cache_dir)
        self._read(json_path)
        if cache and write_cache:
            cache.save(self)
            if not cache.load(self):  # serve from the files, as the other processes do
                raise RuntimeError(f"{cache_dir}: the read cache just written does not load")

    def _cache_key(self, json_path):
        """What the read-time result depends on: the file (path, size, mtime), the image folder
        (scanned for missing files), num_patches (lengths) and strict. Not the template, the
        tokenizer or max_len: they only act when an item is loaded."""
        st = os.stat(json_path)
        return {"version": ReadCache.version, "kind": "llava", "source": str(Path(json_path).resolve()),
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "image_folder": str(Path(self.image_folder).resolve()),
                "num_patches": self.num_patches, "strict": self.strict}

    def _read(self, json_path):
        """Read, repair and check the file, scan the image paths; keep the usable samples."""
        log.info("%s: reading and checking the JSON", json_path)
        num_patches = self.num_patches
        data = read_json(json_path)
        if not isinstance(data, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(data).__name__}")
        rows = []  # (key, id, sample) of the samples that pass the text checks
        for k, sample in enumerate(data):
            sid = str(sample.get("id", k)) if isinstance(sample, dict) else str(k)
            sample, repairs = repair_conversations(sample)
            reason = check_conversations(sample)
            if reason:
                self._skip(("read", k), sid, reason)
                continue
            for r in repairs:
                self.repaired[r] += 1
            rows.append((("read", k), sid, sample))
        if self.repaired:
            log.info("%s: repaired as LLaVA does: %s", json_path, dict(self.repaired))
        # missing images are found now, so the sampler only ever serves usable samples
        samples = [sample for _, _, sample in self._drop_missing_images(rows, json_path)]
        del data, rows
        # estimated lengths (words + patches), negative for text-only samples, as LLaVA's
        words = [sum(len(t["value"].split()) for t in s["conversations"]) for s in samples]
        self.modality_lengths = array.array("i", [w + num_patches if s.get("image") else -w
                                                  for w, s in zip(words, samples)])
        self.lengths = array.array("i", [abs(n) for n in self.modality_lengths])
        self.samples = SampleIndex(samples)
        if not self.samples:
            raise ValueError(f"{json_path}: no usable samples ({self.report()})")

    def _load(self, j):
        sample = self.samples[j]
        has_image = bool(sample.get("image"))
        ids, labels = tokenize_conversation(sample["conversations"], self.tokenizer, self.template,
                                            self.image_token_id, self.num_patches, has_image)
        if len(ids) > self.max_len:  # truncate the tail, never through the image block
            if has_image and max(k for k, i in enumerate(ids) if i == self.image_token_id) >= self.max_len:
                raise ValueError(f"too long: image block ends beyond max_len={self.max_len}")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        if all(l == IGNORE_INDEX for l in labels[1:]):
            raise ValueError(f"too long: no answer left within max_len={self.max_len}")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": str(sample.get("id", j)),
                "pixel_values": self._pixels(sample["image"]) if has_image else None}


class ReadCache:
    """What LlavaDataset's init found in a file, kept so that one process per node reads the JSON
    and the others map the result (train.py's build_dataset): in `folder`, files named by a hash
    of the key (LlavaDataset._cache_key):
      <stem>.blob          the usable samples' JSON, one buffer (SampleIndex)
      <stem>.offsets.npy   int64, where each sample starts in the buffer (and the end)
      <stem>.lengths.npy   int32, the modality lengths (negative: text only)
      <stem>.json          the key, counts, and the read-time report (skips by reason, each
                           skipped sample's position, id and reason, repairs, missing images);
                           written last, so its presence means the others are complete
    Every file is written atomically. A key that differs (another file, size or mtime, another
    image folder, num_patches or strict) is a miss: the file is read again and the cache
    rewritten. Plain binary, .npy and JSON only: nothing here is unpickled. Image files added
    after the cache was written are not seen (delete the folder to scan again); removed ones are
    still caught when their item is loaded, and skipped as usual.
    """

    version = 1

    def __init__(self, folder, key):
        self.folder, self.key = Path(folder), key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.stem = f"{key['kind']}-{digest}"

    def _path(self, suffix):
        return self.folder / f"{self.stem}{suffix}"

    def save(self, ds):
        """Write the dataset's read-time result; other caches in the folder (stale keys) are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ds.samples.save(self._path(".blob"), self._path(".offsets.npy"))
        write_atomic(self._path(".lengths.npy"),
                     lambda f: np.save(f, np.asarray(ds.modality_lengths, np.int32), allow_pickle=False))
        read_skips = [[key[1], sid, reason] for key, (sid, reason) in ds._counted.items() if key[0] == "read"]
        meta = {"key": self.key, "samples": len(ds.samples), "skipped": dict(ds.skipped),
                "read_skips": read_skips, "repaired": dict(ds.repaired), "missing": ds.missing}
        write_atomic(self._path(".json"), lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
        for other in self.folder.iterdir():  # stale caches of this kind: another key
            if other.name.startswith(f"{self.key['kind']}-") and not other.name.startswith(self.stem):
                other.unlink(missing_ok=True)

    def load(self, ds):
        """Fill the dataset's read-time state from the cache; False if there is none for this key
        (or it is inconsistent: then it is rebuilt)."""
        try:
            meta = json.loads(self._path(".json").read_text(encoding="utf-8"))
            if meta.get("key") != self.key:
                return False
            samples = SampleIndex.mapped(self._path(".blob"), self._path(".offsets.npy"))
            lengths = np.load(self._path(".lengths.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("%s: read cache %s unusable (%s); reading the file again", self.folder, self.stem, e)
            return False
        if len(samples) != meta["samples"] or lengths.shape != (meta["samples"],) or lengths.dtype != np.int32:
            log.warning("%s: read cache %s is inconsistent; reading the file again", self.folder, self.stem)
            return False
        ds.samples = samples
        ds.modality_lengths = array.array("i", lengths.tobytes())
        ds.lengths = array.array("i", [abs(n) for n in ds.modality_lengths])
        ds.skipped, ds.repaired, ds.missing = Counter(meta["skipped"]), Counter(meta["repaired"]), meta["missing"]
        ds._counted = {("read", k): (sid, reason) for k, sid, reason in meta["read_skips"]}
        ds.from_cache = True
        return True


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageOnlyDataset(_SkippingDataset):
    """Stage III data: BOS + num_patches image placeholders, no text, every label ignored.

    `source`: a folder of images (searched recursively, sorted) or a LLaVA JSON whose samples'
    images are used (relative to `image_folder`, default the JSON's directory).
    """

    def __init__(self, source, tokenizer, image_size, num_patches, image_token_id=IMAGE_TOKEN_ID,
                 image_folder=None, strict=False, max_pixels=MAX_PIXELS):
        self._init_skips(strict)
        self.tokenizer, self.image_size, self.num_patches = tokenizer, image_size, num_patches
        self.image_token_id, self.max_pixels = image_token_id, max_pixels
        source = Path(source)
        if source.is_dir():
            self.image_folder = source
            files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples = [{"id": str(p.relative_to(source)), "image": str(p.relative_to(source))} for p in files]
        else:
            self.image_folder = image_folder if image_folder is not None else source.parent
            data = read_json(source)
            if not isinstance(data, list):
                raise ValueError(f"{source}: expected a JSON list of samples, got {type(data).__name__}")
            rows = []
            for k, s in enumerate(data):
                if not isinstance(s, dict) or not s.get("image"):
                    continue
                sid = str(s.get("id", k))
                if not isinstance(s["image"], str):
                    self._skip(("read", k), sid, f"image field is not a string ({type(s['image']).__name__}; "
                                                 f"one image path per sample)")
                    continue
                rows.append((("read", k), sid, {"id": sid, "image": s["image"]}))
            self.samples = SampleIndex(s for _, _, s in self._drop_missing_images(rows, source))
        if not self.samples:
            raise ValueError(f"{source}: no images")
        self.modality_lengths = self.lengths = [num_patches + 1] * len(self.samples)

    def _load(self, j):
        ids, sample = [self.tokenizer.bos_id] + [self.image_token_id] * self.num_patches, self.samples[j]
        return {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), IGNORE_INDEX),
                "pixel_values": self._pixels(sample["image"]), "id": sample["id"]}


def collate(samples, pad_id):
    """Right-pad a list of items into a batch. Samples that are None are dropped.

    Returns input_ids (B, T), labels (B, T) with IGNORE_INDEX on padding, attention_mask (B, T)
    bool, pixel_values (N_img, 3, H, W) for the samples with an image in batch order (or None),
    ids, and skipped: the (id, reason) of bad samples replaced while loading this batch.
    """
    samples = [s for s in samples if s is not None]
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], True
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None, "ids": [s["id"] for s in samples],
            "skipped": [x for s in samples for x in s.get("skipped", [])]}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices for one rank: shuffled from (seed, epoch), sharded, optionally grouped by length.

    Like LLaVA's `group_by_modality_length`: image and text-only samples are shuffled apart, cut
    into megabatches of batch_size * world_size, each sorted by length (longest first) so that a
    micro-batch holds similar lengths, and the megabatches are shuffled together. Each megabatch is
    dealt to the ranks so that their total lengths come out even (LLaVA's `split_to_even_chunks`:
    longest first, each to the rank with the least length so far that still has room); without
    grouping, megabatch k gives rank r its r-th equal slice. The index list is padded by repeating its start to a
    multiple of world_size (as DistributedSampler), so all ranks see the same number of samples.
    `skip` drops the first samples of this rank's epoch (resume mid-epoch).
    """

    def __init__(self, lengths, batch_size, seed=0, epoch=0, rank=0, world_size=1, group_by_length=True, skip=0):
        assert 0 <= rank < world_size
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, epoch
        self.rank, self.world_size, self.group_by_length, self.skip = rank, world_size, group_by_length, skip
        self.num_samples = math.ceil(len(self.lengths) / world_size)  # per rank

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def indices(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # same on every rank
        n, mega = len(self.lengths), self.batch_size * self.world_size
        perm = torch.randperm(n, generator=g).tolist()
        perm += (perm * math.ceil(self.num_samples * self.world_size / n))[:self.num_samples * self.world_size - n]
        if not self.group_by_length:
            megabatches = [perm[i:i + mega] for i in range(0, len(perm), mega)]
        else:
            groups = [[i for i in perm if self.lengths[i] > 0], [i for i in perm if self.lengths[i] <= 0]]
            megabatches, leftover = [], []
            for group in groups:
                cut = len(group) - len(group) % mega
                megabatches += [group[i:i + mega] for i in range(0, cut, mega)]
                leftover += group[cut:]
            order = torch.randperm(len(megabatches), generator=g).tolist()
            megabatches = [megabatches[k] for k in order] + ([leftover] if leftover else [])
            megabatches = [sorted(m, key=lambda i: -abs(self.lengths[i])) for m in megabatches]
        out = []
        for m in megabatches:  # every megabatch size is a multiple of world_size
            if self.group_by_length:
                out += split_even(m, self.lengths, self.world_size)[self.rank]
            else:
                share = len(m) // self.world_size
                out += m[self.rank * share:(self.rank + 1) * share]
        return out

    def __iter__(self):
        return iter(self.indices()[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def split_even(indices, lengths, world_size):
    """Deal `indices` (longest first) to world_size equal-count parts of about equal total length:
    each goes to the part with the least total so far that still has room (ties: the lowest part)."""
    share = len(indices) // world_size
    parts, totals = [[] for _ in range(world_size)], [0] * world_size
    for i in indices:
        r = min((r for r in range(world_size) if len(parts[r]) < share), key=lambda r: totals[r])
        parts[r].append(i)
        totals[r] += abs(lengths[i])
    return parts


def make_sampler(dataset, batch_size, seed=0, epoch=0, rank=0, world_size=1, group_by_length=True, skip=0):
    """A LengthGroupedSampler over `dataset.modality_lengths` (all equal if it has none)."""
    lengths = getattr(dataset, "modality_lengths", None) or [1] * len(dataset)
    return LengthGroupedSampler(lengths, batch_size, seed, epoch, rank, world_size, group_by_length, skip)
