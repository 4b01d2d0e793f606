"""
Data for nanoVT: tokenizers, chat templates, images, LLaVA datasets, and the "shapes" world.

Read top to bottom:
  1. tokenizers     one small interface over sentencepiece and tiktoken (LLaMA-3) files
  2. chat templates plain / vicuna_v1 / mistral_instruct, rendered exactly as in SPEC §4,
                    tokenised once, labels derived from character offsets
  3. images         LLaVA-1.5's recipe: pad to square with the CLIP mean colour, CLIP resize,
                    centre crop, normalise
  4. datasets       LLaVA JSON conversations (stages I, II, IV), images only (stage III),
                    collate, length-grouped sharded sampler
  5. shapes world   a synthetic LLaVA-format dataset that a tiny model can learn on a laptop:
                    python data.py shapes --out data/shapes

Bad input (LlavaDataset / ImageOnlyDataset). Default: skip the sample, log one warning with
its id and reason, count it (`.skipped`, `.report()`); with strict=True raise instead.
  - malformed JSON            ValueError naming file, line and column. JSON is read at init,
                              so this fails fast even when strict=False (nothing to skip to).
  - empty conversations, a first turn from "gpt", turns not alternating human/gpt, a last
    turn without an answer, two <image> tags, <image> in an assistant turn, <image> but no
    "image" field            checked at init; skipped (strict: ValueError)
  - "image" field but no <image> tag   LLaVA's data always has the tag; we prepend "<image>\n"
                              to the first human turn (the JSON says the image belongs there)
  - missing, corrupt or truncated image file, an image over `max_pixels` (decompression bomb)
                              found when the item is loaded; the loader then serves the next
                              sample instead, so a run never crashes at step 40,000 (strict: raise)
  - a sample whose image block does not fit in max_len, or with no answer left after
    truncation                as above, found at load time
"""

import argparse
import json
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger("nanovt.data")

IGNORE_INDEX = -100      # label of positions that carry no loss (torch's cross_entropy default)
IMAGE_TOKEN_ID = -200    # nanoVT's image placeholder: a sentinel outside every vocabulary
IMAGE_TAG = "<image>"    # marks the image in LLaVA's JSON and in rendered prompts
EOS_TAG = "</s>"         # end of an assistant turn in rendered prompts; always the tokenizer's eos id

# -----------------------------------------------------------------------------
# 1. Tokenizers: encode (no BOS/EOS), decode, bos_id / eos_id / pad_id, vocab_size, piece(i)


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model` (LLaMA, Vicuna, Mistral, the shapes world)."""

    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # LLaMA has no pad piece; like LLaVA (pad_token = unk_token) we then pad with unk, id 0
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)

    def encode(self, text):
        return self.sp.encode(text)

    def encode_with_offsets(self, text):
        """[(id, char_start, char_end)] for one tokenisation of `text`."""
        try:
            r = self.sp.encode(text, out_type="offset_mapping")
        except (ValueError, TypeError, RuntimeError) as e:
            raise RuntimeError("this sentencepiece has no out_type='offset_mapping'; use >= 0.2.3") from e
        return [(i, s, e) for i, (s, e) in zip(r["ids"], r["offsets"])]

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

    def encode(self, text):
        return self.enc.encode(text, disallowed_special=())  # special-token text is plain text here

    def encode_with_offsets(self, text):
        ids = self.encode(text)
        _, starts = self.enc.decode_with_offsets(ids)
        return [(i, s, e) for i, s, e in zip(ids, starts, starts[1:] + [len(text)])]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def piece(self, i):
        return self.enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")


def load_tokenizer(path):
    """A tokenizer from `tokenizer.model` or a directory holding one; the kind is read from the content."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    with open(path, "rb") as f:
        head = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", head):  # tiktoken rank files are text lines
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)  # otherwise a sentencepiece ModelProto (binary)


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
# 2. Chat templates (SPEC §4) and tokenisation with label masking

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "vicuna_v1", "mistral_instruct")


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
        else:
            raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    if turns[-1]["from"] == "human":  # generation prompt: no trailing space after the prefix
        segs[-1] = (segs[-1][0].rstrip(" "), False)
    return segs


def render_conversation(conversations, template, has_image=None):
    """The exact prompt string of SPEC §4, with <image> and </s> as text."""
    return "".join(text for text, _ in render_segments(conversations, template, has_image))


_MARKERS = re.compile(re.escape(IMAGE_TAG) + "|" + re.escape(EOS_TAG))


def _tokenize_text(text, tokenizer, image_token_id, num_patches):
    """[(id, char_start, char_end)] for a rendered prompt: split only at <image> and </s>."""
    out, pos = [], 0
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        # each text chunk is tokenised once, with sentencepiece's dummy-prefix space: as LLaVA's
        # tokenizer_image_token at <image>, and its slow (legacy) LLaMA tokenizer after </s>
        if end > pos:
            out += [(i, pos + s, pos + e) for i, s, e in tokenizer.encode_with_offsets(text[pos:end])]
        if m:
            ids = [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            out += [(i, m.start(), m.end()) for i in ids]
            pos = m.end()
    return out


def tokenize_prompt(text, tokenizer, image_token_id=IMAGE_TOKEN_ID, num_patches=576):
    """BOS + the whole rendered prompt tokenised at once: the reference tokenize_conversation must equal."""
    out, pos = [tokenizer.bos_id], 0
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if end > pos:
            out += tokenizer.encode(text[pos:end])
        if m:
            out += [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            pos = m.end()
    return out


def tokenize_conversation(conversations, tokenizer, template, image_token_id=IMAGE_TOKEN_ID,
                          num_patches=576, has_image=None):
    """(input_ids, labels) of one conversation.

    The rendered prompt is tokenised once; a token is supervised if its characters overlap an
    assistant answer or its </s>. So the ids are, by construction, those of the whole prompt,
    and LLaVA's "tokenization mismatch" (per-turn lengths that disagree) cannot happen.
    Labels are IGNORE_INDEX on BOS, system prompt, user turns and image positions.
    """
    segs = render_segments(conversations, template, has_image)
    spans, pos = [], 0
    for text, supervised in segs:
        if supervised:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    input_ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]  # BOS as an id, plain included (as LLaVA)
    for i, s, e in _tokenize_text("".join(t for t, _ in segs), tokenizer, image_token_id, num_patches):
        hit = any((s < b and e > a) or (s == e and a <= s < b) for a, b in spans)
        input_ids.append(i)
        labels.append(i if hit and i != image_token_id else IGNORE_INDEX)
    return input_ids, labels


def check_conversations(sample):
    """Why a LLaVA JSON sample is unusable, or None if it is fine (cheap: text only)."""
    turns = sample.get("conversations") if isinstance(sample, dict) else None
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
# 3. Images: LLaVA-1.5's recipe (SPEC §4)

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


def read_json(path):
    """A JSON list (or JSON lines if the file ends in .jsonl); errors name the file, line and column."""
    text = Path(path).read_text(encoding="utf-8")
    if not str(path).endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    return rows


class _SkippingDataset(torch.utils.data.Dataset):
    """Shared bad-sample handling: warn once per id, count per reason, serve the next sample."""

    max_tries = 64  # this many bad samples in a row means the data is broken: raise

    def _init_skips(self, strict):
        self.strict, self.skipped, self._warned = strict, Counter(), set()

    def _skip(self, sample_id, reason):
        if self.strict:
            raise ValueError(f"sample {sample_id}: {reason}")
        if sample_id not in self._warned:  # count each bad sample once, however many epochs
            self._warned.add(sample_id)
            self.skipped[reason.split(":")[0]] += 1
            log.warning("skipping sample %s: %s", sample_id, reason)

    def report(self):
        total = sum(self.skipped.values())
        return f"skipped {total} samples" + (": " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
                                             if total else "")

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
                self._skip(sid, f"decompression bomb: {e}" if bomb else str(e) if isinstance(e, ValueError)
                           else f"bad image: {type(e).__name__}: {e}")
                skipped.append((sid, str(e)))
        raise RuntimeError(f"{self.max_tries} bad samples in a row from index {index}: {self.report()}")

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
                 image_token_id=IMAGE_TOKEN_ID, max_len=2048, strict=False, max_pixels=MAX_PIXELS):
        assert template in TEMPLATES, f"unknown template {template!r}"
        self._init_skips(strict)
        self.image_folder = image_folder if image_folder is not None else Path(json_path).parent
        self.tokenizer, self.template, self.image_size = tokenizer, template, image_size
        self.num_patches, self.image_token_id = num_patches, image_token_id
        self.max_len, self.max_pixels = max_len, max_pixels
        data = read_json(json_path)
        if not isinstance(data, list):
            raise ValueError(f"{json_path}: expected a JSON list of samples, got {type(data).__name__}")
        self.samples = []
        for k, sample in enumerate(data):
            reason = check_conversations(sample)
            if reason:
                self._skip(str(sample.get("id", k)) if isinstance(sample, dict) else str(k), reason)
            else:
                self.samples.append(sample)
        if not self.samples:
            raise ValueError(f"{json_path}: no usable samples ({self.report()})")

    @property
    def modality_lengths(self):
        """Estimated lengths (words + patches), negative for text-only samples, as LLaVA's."""
        words = [sum(len(t["value"].split()) for t in s["conversations"]) for s in self.samples]
        return [w + self.num_patches if s.get("image") else -w for w, s in zip(words, self.samples)]

    @property
    def lengths(self):
        return [abs(n) for n in self.modality_lengths]

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
            self.samples = [{"id": str(s.get("id", k)), "image": s["image"]}
                            for k, s in enumerate(data) if isinstance(s, dict) and s.get("image")]
        if not self.samples:
            raise ValueError(f"{source}: no images")
        self.modality_lengths = self.lengths = [num_patches + 1] * len(self.samples)

    def _load(self, j):
        ids = [self.tokenizer.bos_id] + [self.image_token_id] * self.num_patches
        return {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), IGNORE_INDEX),
                "pixel_values": self._pixels(self.samples[j]["image"]), "id": self.samples[j]["id"]}


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


# -----------------------------------------------------------------------------
# 5. The shapes world: 1-4 coloured shapes on a 3x3 grid, in LLaVA's formats

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 230),
          "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (250, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPE_WEIGHTS = (0.35, 0.3, 0.2, 0.15)  # skewed on purpose, so POPE's "popular" negatives mean something
COLOR_WEIGHTS = (0.25, 0.2, 0.18, 0.15, 0.12, 0.1)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
         "center": "in the center"}  # how a cell reads in a sentence; the rest are "at the <cell>"
SHORT = "Answer the question using a single word or phrase."  # SPEC §7, LLaVA's short-answer suffix
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
NUMBERS = ("zero", "one", "two", "three", "four")


def where(cell):
    return WHERE.get(cell, "at the " + cell)


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def there_are(n, noun, plural):
    return f"There is one {noun}" if n == 1 else f"There are {NUMBERS[n]} {plural}"


def sample_scene(rng):
    """A scene: background and 1-4 objects (color, shape, size, cell), each in its own grid cell."""
    n = rng.randint(1, 4)
    objects = [(rng.choices(list(COLORS), COLOR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0],
                rng.choice(("small", "large")), cell) for cell in sorted(rng.sample(range(9), n))]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects,
            "jitter": [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in objects]}


def scene_of(seed, i):
    """Image i of the world made with `seed` (each scene has its own generator, so any one can be redrawn)."""
    return sample_scene(random.Random(f"{seed}/scene/{i}"))


def cell_labels(scene):
    """What each of the 9 cells holds (0: empty, else 1 + 4 * colour + shape) and the background's index:
    the targets of the demo's toy vision pretraining."""
    cells = [0] * 9
    for c, s, _, cell in scene["objects"]:
        cells[cell] = 1 + 4 * list(COLORS).index(c) + SHAPES.index(s)
    return cells, list(BACKGROUNDS).index(scene["background"])


def draw_scene(scene, size, ss=4):
    """Render a scene, drawn at ss x the size and box-downsampled (cheap anti-aliasing)."""
    S = size * ss
    im = Image.new("RGB", (S, S), BACKGROUNDS[scene["background"]])
    d = ImageDraw.Draw(im)
    for (color, shape, sz, cell), (jx, jy) in zip(scene["objects"], scene["jitter"]):
        r = S / 6 * (0.75 if sz == "large" else 0.45)  # a cell is S/3 wide
        cx = (cell % 3 + 0.5) * S / 3 + jx * (S / 6 - r) * 0.8
        cy = (cell // 3 + 0.5) * S / 3 + jy * (S / 6 - r) * 0.8
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
        else:
            k, radii = (3, (r,)) if shape == "triangle" else (5, (r, 0.45 * r))
            pts = [(cx + radii[j % len(radii)] * math.sin(math.pi * j / (k * len(radii) / 2)),
                    cy - radii[j % len(radii)] * math.cos(math.pi * j / (k * len(radii) / 2)))
                   for j in range(k * len(radii))]
            d.polygon(pts, fill=fill)
    return im.reduce(ss)


def _draw_and_save(job):
    scene, size, path = job
    draw_scene(scene, size).save(path, optimize=False, compress_level=1)


def caption(scene):
    parts = [f"{article(sz)} {c} {s} {where(CELLS[cell])}" for c, s, sz, cell in scene["objects"]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text}, on a {scene['background']} background."


def questions(scene, rng, popular):
    """All (question, short answer, long answer) pairs about a scene; the caller samples a few."""
    objs = scene["objects"]
    present = {(c, s) for c, s, _, _ in objs}
    count = Counter(s for _, s, _, _ in objs)
    n = len(objs)
    # counts are words: the toy tokenizer has no digit pieces, and a digit answer would start with a
    # bare "▁" piece that the label mask (answer characters only) leaves unsupervised
    qa = [("How many shapes are in the image?", NUMBERS[n].capitalize(), there_are(n, "shape", "shapes") + " in the image."),
          ("What color is the background?", scene["background"].capitalize(),
           f"The background is {scene['background']}."),
          ("Describe the image.", None, caption(scene).capitalize())]
    s = rng.choice(SHAPES)
    qa.append((f"How many {PLURAL[s]} are there?", NUMBERS[count[s]].capitalize(),
               there_are(count[s], s, PLURAL[s]) + "."))
    for c, s, sz, cell in objs:
        if count[s] == 1:
            qa.append((f"What color is the {s}?", c.capitalize(), f"The {s} is {c}."))
        if sum(1 for o in objs if o[:2] == (c, s)) == 1:
            qa.append((f"Where is the {c} {s}?", CELLS[cell].capitalize(), f"The {c} {s} is {where(CELLS[cell])}."))
        qa.append((f"What shape is {where(CELLS[cell])}?", s.capitalize(),
                   f"There is {article(sz)} {c} {s} {where(CELLS[cell])}."))
    for category in ("random", "popular", "adversarial"):
        qa.append(pope_question(scene, rng, present, True, category, popular))
        qa.append(pope_question(scene, rng, present, False, category, popular))
    return qa


def pope_question(scene, rng, present, positive, category, popular):
    """POPE-style "Is there a X in the image?"; negatives: random, popular (most frequent objects
    absent here), adversarial (shares a colour or a shape with an object that is present)."""
    if positive:
        c, s = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if category == "popular":
            absent = [o for o in popular if o not in present][:3]
        elif category == "adversarial":
            near = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
            absent = near or absent
        c, s = rng.choice(absent)
    where_ = next((where(CELLS[cell]) for oc, osh, _, cell in scene["objects"] if (oc, osh) == (c, s)), "")
    long = f"Yes, there is {article(c)} {s} {where_}." if positive else f"No, there is no {c} {s} in the image."
    return (f"Is there {article(c)} {s} in the image?", "Yes" if positive else "No", long, category)


def text_only_conversation(rng):
    """A question needing no image: simple facts about the world's shapes, colours and numbers."""
    sides = {"triangle": "three sides", "square": "four sides", "star": "five points", "circle": "no corners"}
    mixes = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
    kind = rng.randrange(4)
    if kind == 0:
        s = rng.choice(SHAPES)
        return f"What can you tell me about {article(s)}?", f"{article(s).capitalize()} has {sides[s]}."
    if kind == 1:
        (a, b), c = rng.choice(sorted(mixes.items()))
        return f"What color do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {c}."
    if kind == 2:
        a, b = rng.randint(0, 2), rng.randint(1, 2)
        q = f"{NUMBERS[a]} plus {NUMBERS[b]}"
        return f"What is {q}?", f"{q.capitalize()} is {NUMBERS[a + b]}."
    w = rng.choice(list(COLORS) + list(SHAPES))
    kind = "color" if w in COLORS else "shape"
    return f"Is {w} a color?", ("Yes" if w in COLORS else "No") + f", {w} is a {kind}."


WORLD_VERSION = 2  # bump when the generator changes what a seed produces: older worlds are rebuilt


def make_shapes_world(out_dir, n_images=10000, image_size=64, seed=0, eval_fraction=0.05,
                      vocab_size=1024, text_only_fraction=0.05, workers=2, turns_per_image=5):
    """Write the shapes world (LLaVA formats) to out_dir; deterministic from `seed`. Returns world.json's dict.

    Files: images/NNNNNN.png; stage1_captions.json (plain template; its images are also stage III's,
    as in the paper); instruct.json (stages II and IV); text_corpus.txt (text for a "stage 0"
    decoder); tokenizer.model; eval_pope.jsonl and eval_short.jsonl on held-out images; world.json.
    Image paths in every file are relative to out_dir.
    """
    t0 = time.time()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [scene_of(seed, i) for i in range(n_images)]
    paths = [f"images/{i:06d}.png" for i in range(n_images)]
    jobs = [(s, image_size, str(out / p)) for s, p in zip(scenes, paths)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            pool.map(_draw_and_save, jobs, chunksize=256)
    else:
        for job in jobs:
            _draw_and_save(job)

    n_eval = max(1, int(n_images * eval_fraction))
    train, held_out = range(n_images - n_eval), range(n_images - n_eval, n_images)
    freq = Counter((c, s) for i in train for c, s, _, _ in scenes[i]["objects"])
    popular = [o for o, _ in freq.most_common()]

    stage1, instruct, corpus = [], [], []
    for i in train:
        cap = caption(scenes[i])
        stage1.append({"id": f"shapes-{i:06d}", "image": paths[i], "conversations": [
            {"from": "human", "value": rng.choice(("Describe the image briefly.", "Write a short caption."))
             + "\n" + IMAGE_TAG}, {"from": "gpt", "value": cap}]})
        qa = questions(scenes[i], rng, popular)
        turns = []
        # several questions per image: a from-scratch decoder learns to look up what a question
        # names far faster from many answers about each picture than from one
        for q, short, long, *_ in rng.sample(qa, min(len(qa), turns_per_image)):
            use_short = short is not None and rng.random() < 0.5
            turns += [{"from": "human", "value": f"{q}\n{SHORT}" if use_short else q},
                      {"from": "gpt", "value": short if use_short else long}]
            corpus.append(f"{q} {long}")
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
        instruct.append({"id": f"shapes-{i:06d}", "image": paths[i], "conversations": turns})
        corpus.append(cap.capitalize())
    for k in range(int(len(train) * text_only_fraction)):
        q, a = text_only_conversation(rng)
        instruct.append({"id": f"text-{k:06d}", "conversations": [{"from": "human", "value": q},
                                                                   {"from": "gpt", "value": a}]})
        corpus.append(f"{q} {a}")
    rng.shuffle(instruct)

    pope, short_eval = [], []
    for i in held_out:
        present = {(c, s) for c, s, _, _ in scenes[i]["objects"]}
        for category in ("random", "popular", "adversarial"):
            for positive in (True, False):
                q, ans, _, _ = pope_question(scenes[i], rng, present, positive, category, popular)
                pope.append({"question_id": len(pope), "image": paths[i], "text": f"{q}\n{SHORT}",
                             "label": ans.lower(), "category": category})
        for q, ans, *_ in rng.sample([x for x in questions(scenes[i], rng, popular)
                                      if x[1] is not None and len(x) == 3], 2):
            short_eval.append({"question_id": len(short_eval), "image": paths[i], "text": f"{q}\n{SHORT}",
                               "answer": ans.lower()})  # compare case-insensitively

    def dump(name, rows, lines=False):
        with open(out / name, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows, indent=0))

    dump("stage1_captions.json", stage1)
    dump("instruct.json", instruct)
    dump("eval_pope.jsonl", pope, lines=True)
    dump("eval_short.jsonl", short_eval, lines=True)
    (out / "text_corpus.txt").write_text("\n".join(corpus) + "\n")
    # the tokenizer sees the world's text and the chat templates' words, so both are cheap pieces
    words = " ".join(list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + list(NUMBERS) + ["yes", "no", "small", "large"])
    template_text = [SYSTEM_VICUNA, "USER: ASSISTANT: [INST] [/INST]", SHORT, words, words.title()] * 200
    train_sentencepiece(template_text + corpus, out / "tokenizer.model", vocab_size, user_defined_symbols=["\n"])
    world = {"version": WORLD_VERSION, "seed": seed, "n_images": n_images, "turns_per_image": turns_per_image,
             "image_size": image_size, "eval_fraction": eval_fraction,
             "vocab_size": vocab_size, "text_only_fraction": text_only_fraction, "shapes": SHAPES,
             "colors": list(COLORS), "backgrounds": list(BACKGROUNDS), "cells": CELLS, "image_folder": ".",
             "counts": {"train_images": len(train), "eval_images": n_eval, "stage1": len(stage1),
                        "instruct": len(instruct), "eval_pope": len(pope), "eval_short": len(short_eval),
                        "corpus_lines": len(corpus)},
             "stage3": "stage1_captions.json", "seconds": round(time.time() - t0, 1)}
    (out / "world.json").write_text(json.dumps(world, indent=1))
    return world


def ensure_shapes_world(out_dir, **kwargs):
    """Build the shapes world unless out_dir/world.json exists and is of this version (what the toy
    configs call)."""
    path = Path(out_dir) / "world.json"
    if not path.exists() or json.loads(path.read_text()).get("version") != WORLD_VERSION:
        make_shapes_world(out_dir, **kwargs)
    return json.loads((Path(out_dir) / "world.json").read_text())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nanoVT data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="write the synthetic shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    world = make_shapes_world(args.out, args.n_images, args.size, args.seed, workers=args.workers)
    print(json.dumps(world["counts"]), f"in {world['seconds']} s")
