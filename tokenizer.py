"""
Tokenizers for nanoVT: one small interface over the two kinds of `tokenizer.model` file and GGUF files.

    encode(text, dummy_prefix=True) -> ids (no BOS/EOS)     encode_with_offsets(text) -> [(id, start, end)]
    decode(ids) -> text     piece(i) -> str     bos_id / eos_id / pad_id     vocab_size     legacy, add_bos

SentencePieceTokenizer: LLaMA, Vicuna, Mistral and the shapes world (a sentencepiece ModelProto), with
the tokenizer_config.json the released model ships; TiktokenTokenizer: LLaMA-3's BPE rank files;
GGUFBPETokenizer: the byte-level BPE inside a GGUF file (SmolLM2), with its pre-tokenizer, control
tokens and chat template. load_tokenizer tells them apart by content. How prompts are tokenised with
them: conversation.py; the rules: docs/data.md §Tokenizers.
"""

import json
import re
from pathlib import Path

IMAGE_TAG_HF = "<image>"  # the image placeholder's text in an exported tokenizer (conversation.IMAGE_TAG)


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model` (LLaMA, Vicuna, Mistral, the shapes world)."""

    def __init__(self, path, config=None):
        import sentencepiece as spm
        self.path = Path(path)
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
        i = int(i)  # e.g. "▁red": ▁ marks a word start; "" past the list (an embedding with spare rows)
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else ""


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
        self.path, self.ranks, self.specials = Path(path), ranks, specials
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
        i = int(i)  # "" past the list (an embedding with spare rows)
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace") if 0 <= i < self.vocab_size else ""


# ----------------------------------------------------------------------------------------------
# Byte-level BPE read from a GGUF file (llama.cpp's format; `tokenizer.ggml.model` "gpt2"), as SmolLM2
# ships it: docs/data.md §Tokenizers.

# Pre-tokenizers by llama.cpp's `tokenizer.ggml.pre` name. "gpt-2": GPT-2's split (contractions, letter
# runs, number runs, other-symbol runs, each with one optional leading space; whitespace runs keep their
# last space for the next piece). "smollm": every digit split off first as its own piece, then GPT-2's
# split of what lies between (HF: Digits(individual_digits=True), then ByteLevel). Written as one
# pattern: a digit is a piece; the number alternative is gone (no digit is left for it); and a
# whitespace run that a digit follows ends its first-stage piece, where GPT-2's `\s+(?!\S)` takes the
# whole run, so the lookahead lets a digit through: `(?![^\s\p{N}])`. ("In  6757": "In", "  ", "6", ...)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGITS_FIRST_SPLIT = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
GGUF_PRE_TOKENIZERS = {"gpt-2": GPT2_SPLIT, "smollm": DIGITS_FIRST_SPLIT}
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def gguf_metadata(path):
    """{key: value} of a GGUF file's key-value header (the tensors are not read), by gguf_file's bounded
    reader: strings as str, string arrays as lists, number arrays as numpy arrays."""
    from gguf_file import read_gguf
    return read_gguf(path).meta


class GGUFBPETokenizer:
    """GPT-2-style byte-level BPE from a GGUF file's metadata (SmolLM2): what `tokenizers`' BPE with the
    file's vocabulary and merges, its pre-tokenizer and its control tokens as special tokens gives.

    Tokens are written in GPT-2's byte alphabet (_byte_chars: "Ġ" is the space byte). Encoding:
      control (and user-defined) token text, anywhere in the text, is split out first and becomes its id,
        as `tokenizers` does with special tokens and llama.cpp with parse_special ("<|im_end|>" -> eos);
      each text between is cut by the pre-tokenizer (GGUF_PRE_TOKENIZERS) into pieces;
      each piece's UTF-8 bytes are merged by BPE: the adjacent pair listed first among the merges,
        until none is listed.
    Engine: tiktoken with rank = token id. tiktoken merges the adjacent pair whose concatenation has the
    lowest rank: the merges' order, since the file's merge results have ids that rise in merge order
    (checked here). A token that no merge produces is left out of the ranks, as BPE cannot reach it.
    (tiktoken would also join a pair that no merge lists if their concatenation is a token. Training
    orders merges so that such a pair hardly arises; tests/test_gguf_tokenizer.py checks the SmolLM2
    file against the reference on every token's own text and on thousands of strings.)
    A byte that has no token (SmolLM2: 21 of them, 0x04, 0x06, ..., 0xF5-0xFF) would make tiktoken fail;
    `tokenizers` drops it from its piece before merging, so a text holding one takes the exact path
    (_encode_exact: the split in Python's `regex`, the byte dropped, the merges applied by their list).
    A lone surrogate (not text UTF-8 can hold) is read as U+FFFD. There is no dummy-prefix space
    (dummy_prefix is accepted for the common interface and ignored); `legacy` is True for the same reason.
    """

    def __init__(self, path, meta=None):
        import tiktoken
        self.path = Path(path)
        meta = gguf_metadata(path) if meta is None else meta
        where = str(path)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; nanoVT reads byte-level BPE "
                             f"('gpt2') from a GGUF file (a sentencepiece model: use its tokenizer.model)")
        self.pre = meta.get("tokenizer.ggml.pre")
        if self.pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{where}: tokenizer.ggml.pre is {self.pre!r}, a pre-tokenizer nanoVT does not "
                             f"know; known: {', '.join(GGUF_PRE_TOKENIZERS)}")
        self.pattern = GGUF_PRE_TOKENIZERS[self.pre]
        tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens") or ()]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens))]
        merges = [str(m) for m in meta.get("tokenizer.ggml.merges") or ()]
        if not tokens or len(types) != len(tokens):
            raise ValueError(f"{where}: {len(tokens)} tokens and {len(types)} token types")
        self.tokens, self.types, self.merges = tokens, types, merges
        self.vocab_size = len(tokens)

        # the bytes of every token; control and user-defined tokens are text matched as a whole
        byte_of = {c: b for b, c in _byte_chars().items()}
        self.specials, self.token_bytes = {}, []
        for i, (t, kind) in enumerate(zip(tokens, types)):
            if kind in (GGUF_CONTROL, GGUF_USER_DEFINED):
                self.specials[t] = i
                self.token_bytes.append(t.encode("utf-8"))
            elif all(c in byte_of for c in t):
                self.token_bytes.append(bytes(byte_of[c] for c in t))
            elif kind == GGUF_NORMAL:
                raise ValueError(f"{where}: token {i} {t!r} is not written in GPT-2's byte alphabet")
            else:  # unknown / unused / byte tokens outside the alphabet: decoded as their text, never encoded
                self.token_bytes.append(t.encode("utf-8"))
        ids = {t: i for i, t in enumerate(tokens)}
        # merge ranks by pair of byte strings (the exact path), and the check that makes rank = id valid
        self.merge_ranks, produced, last = {}, set(), -1
        for k, m in enumerate(merges):
            a, _, b = m.partition(" ")
            i = ids.get(a + b)
            if not a or not b or a not in ids or b not in ids or i is None:
                raise ValueError(f"{where}: merge {k} {m!r} does not join two tokens into a token")
            if i <= last:
                raise ValueError(f"{where}: merge {k} {m!r} gives token {i}, not after the previous merge's "
                                 f"{last}; nanoVT's BPE needs merge results whose ids rise in merge order")
            last = i
            self.merge_ranks[(self.token_bytes[ids[a]], self.token_bytes[ids[b]])] = k
            produced.add(i)
        ranks = {}
        for i, (t, kind) in enumerate(zip(tokens, types)):
            if kind != GGUF_NORMAL or not (len(self.token_bytes[i]) == 1 or i in produced):
                continue
            if self.token_bytes[i] in ranks:
                raise ValueError(f"{where}: tokens {ranks[self.token_bytes[i]]} and {i} are the same bytes")
            ranks[self.token_bytes[i]] = i
        self.ranks = ranks
        self.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # bytes without a token
        self.enc = tiktoken.Encoding(f"gguf-{self.pre}", pat_str=self.pattern, mergeable_ranks=ranks,
                                     special_tokens={})
        self._split = None  # the pre-tokenizer in Python's `regex`, made when a text needs the exact path
        # control / user-defined text, longest first: at one position the longest one matches
        self._special_rx = re.compile("|".join(re.escape(s) for s in sorted(self.specials, key=len, reverse=True))
                                      ) if self.specials else None

        def token_id(key, default):
            i = meta.get(key, default)
            if i is not None and not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"{where}: {key} {i} is not a token id (the vocabulary has {self.vocab_size})")
            return None if i is None else int(i)
        # llama.cpp's defaults for a "gpt2" vocabulary: bos = eos = 11, no BOS added; pad: eos (nanoVT pads)
        self.bos_id = token_id("tokenizer.ggml.bos_token_id", 11)
        self.eos_id = token_id("tokenizer.ggml.eos_token_id", 11)
        self.pad_id = token_id("tokenizer.ggml.padding_token_id", self.eos_id)
        self.unk_id = token_id("tokenizer.ggml.unknown_token_id", None)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        self.legacy = True  # no dummy-prefix space to drop after a special token
        self.chat_template = meta.get("tokenizer.chat_template")

    # -- encoding

    def encode(self, text, dummy_prefix=True):
        ids = []
        for a, b, special in self._segments(text):
            ids += [special] if special is not None else self._encode_ordinary(text[a:b])
        return ids

    def encode_with_offsets(self, text, dummy_prefix=True):
        """[(id, char_start, char_end)]: the characters where the token's first byte and last byte lie
        (tokens of one multi-byte character share its span)."""
        out = []
        text = self._clean(text)
        for a, b, special in self._segments(text):
            if special is not None:
                out.append((special, a, b))
                continue
            chunk = text[a:b]
            ids, n = self._encode_ordinary(chunk, with_bytes=True), len(chunk)
            if len(chunk.encode("utf-8")) == n:  # ASCII: byte k is character k
                out += [(i, a + s, a + e) for i, s, e in ids]
            else:
                char_of = [k for k, c in enumerate(chunk) for _ in range(len(c.encode("utf-8")))]  # byte -> char
                out += [(i, a + char_of[s], a + char_of[e - 1] + 1) for i, s, e in ids]
        return out

    @staticmethod
    def _clean(text):
        if any("\ud800" <= c <= "\udfff" for c in text):  # lone surrogates: not text UTF-8 can hold
            text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        return text

    def _segments(self, text):
        """[(char_start, char_end, special id or None)]: the control tokens and the plain text between."""
        out, pos = [], 0
        for m in list(self._special_rx.finditer(text) if self._special_rx else ()) + [None]:
            end = m.start() if m else len(text)
            if end > pos:
                out.append((pos, end, None))
            if m:
                out.append((m.start(), m.end(), self.specials[m.group()]))
                pos = m.end()
        return out

    def _encode_ordinary(self, text, with_bytes=False):
        """Ids of a text without control tokens (with_bytes: [(id, byte_start, byte_end)])."""
        text = self._clean(text)
        data = text.encode("utf-8")
        if len(data.translate(None, self.missing)) < len(data):  # a byte without a token: the exact path
            out = self._encode_exact(text)
            return out if with_bytes else [i for i, _, _ in out]
        ids = self.enc.encode_ordinary(text)
        if not with_bytes:
            return ids
        out, b = [], 0
        for i in ids:
            n = len(self.token_bytes[i])
            out.append((i, b, b + n))
            b += n
        return out

    def _encode_exact(self, text):
        """[(id, byte_start, byte_end)] of a text without special tokens, by the reference's rules: the
        pre-tokenizer's pieces, the bytes without a token dropped, the listed merges applied in order."""
        if self._split is None:
            import regex  # tiktoken's own dependency
            self._split = regex.compile(self.pattern)
        out, b0, c0 = [], 0, 0
        for m in self._split.finditer(text):
            b0, c0 = b0 + len(text[c0:m.start()].encode("utf-8")), m.start()  # the piece's first byte
            parts = [(bytes([x]), b0 + k, b0 + k + 1) for k, x in enumerate(m.group().encode("utf-8"))
                     if x not in self.missing]
            while len(parts) > 1:
                k, rank = None, None
                for j in range(len(parts) - 1):
                    r = self.merge_ranks.get((parts[j][0], parts[j + 1][0]))
                    if r is not None and (rank is None or r < rank):
                        k, rank = j, r
                if k is None:
                    break
                parts[k:k + 2] = [(parts[k][0] + parts[k + 1][0], parts[k][1], parts[k + 1][2])]
            out += [(self.ranks[p], a, b) for p, a, b in parts]
        return out

    # -- decoding

    def decode(self, ids):
        """The text of `ids` (control tokens as their text; ids outside the vocabulary, such as the image
        placeholder, skipped); bytes that are not UTF-8 on their own become U+FFFD."""
        return b"".join(self.token_bytes[i] for i in map(int, ids) if 0 <= i < self.vocab_size).decode(
            "utf-8", errors="replace")

    def piece(self, i):
        """The text of one token, e.g. " red" (a space, not "Ġ"); "" for an id past the tokenizer's list,
        as a model whose embedding has more rows than the tokenizer has tokens can predict."""
        i = int(i)
        return self.token_bytes[i].decode("utf-8", errors="replace") if 0 <= i < len(self.token_bytes) else ""


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
    """A tokenizer from `tokenizer.model`, a directory holding one, or a GGUF file; the kind is read from
    the content: a GGUF file starts with b"GGUF", whatever its name.

    A tokenizer_config.json beside a tokenizer.model is honoured (tokenizer_config()); `legacy` overrides
    its value."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    with open(path, "rb") as f:
        head = f.readline(4096)
    if head.startswith(b"GGUF"):
        return GGUFBPETokenizer(path)
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


# ----------------------------------------------------------------------------------------------
# The tokenizer as a Hugging Face repository holds it: tokenizer.json (the `tokenizers` library's
# serialisation, which transformers' PreTrainedTokenizerFast loads as it is), its tokenizer_config.json
# and special_tokens_map.json. Written from the tokenizer.model alone, so that transformers tokenises a
# prompt into nanoVT's ids: docs/weights.md §Export.

SP_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}


def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _proto_fields(buf):
    """(field number, value) of one protobuf message, in file order: varints as int, length-delimited
    fields as bytes, fixed-width fields as their raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} is not expected in a sentencepiece model")
        yield key >> 3, value


def sentencepiece_model(proto):
    """What a sentencepiece ModelProto says about encoding: its pieces [(piece, score, type)] in id
    order and the trainer / normaliser fields that change how text is split (sentencepiece_model.proto:
    ModelProto.pieces = 1, trainer_spec = 2, normalizer_spec = 3). A field given twice takes its last
    value, as protobuf merges a message (SentencePieceTokenizer's bare model relies on that)."""
    import struct
    pieces = []
    spec = dict(model_type=1, byte_fallback=False, treat_whitespace_as_suffix=False,  # the .proto defaults
                normalizer="", charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                escape_whitespaces=True)
    trainer = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    normalizer = {1: "normalizer", 2: "charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                  5: "escape_whitespaces"}
    for field, value in _proto_fields(proto):
        if field == 1:
            p = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_proto_fields(value))
            pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0], SP_TYPES.get(p[3], "normal")))
        elif field in (2, 3):
            names = trainer if field == 2 else normalizer
            for f, v in _proto_fields(value):
                if f in names:
                    spec[names[f]] = v.decode("utf-8") if names[f] == "normalizer" else v
    for k in ("byte_fallback", "treat_whitespace_as_suffix", "add_dummy_prefix", "remove_extra_whitespaces",
              "escape_whitespaces"):
        spec[k] = bool(spec[k])
    return pieces, spec


def _rx_literal(text):
    """`text` as an Oniguruma regex (the `tokenizers` library's) matching it literally."""
    return "".join(c if c.isalnum() else "\\x{%x}" % ord(c) for c in text)


def _added(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bos_processor(bos, bos_id):
    """The post-processor that puts BOS before a text (and before each text of a pair)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _sentencepiece_json(tok):
    """tokenizer.json for a sentencepiece BPE model, encoding as SentencePieceTokenizer does.

    sentencepiece's BPE starts from characters (user-defined symbols such as the shapes world's "\\n"
    whole, never merged) and repeatedly merges the adjacent pair whose concatenation is the piece with
    the highest score; `tokenizers`' BPE merges the pair listed first. So the merges list every split
    of every piece into two pieces, pieces by falling score. The dummy-prefix space: legacy (the
    default) before every chunk of text, also after </s> and <image> (a normaliser, which runs on each
    chunk between special tokens); legacy=False only at the very start (a pre-tokeniser), and the chat
    template writes the space after <image> itself (conversation.hf_chat_template)."""
    pieces, spec = sentencepiece_model(tok.sp.serialized_model_proto())
    where = getattr(tok, "path", "this sentencepiece model")
    if spec["model_type"] != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spec["model_type"], spec["model_type"])
        raise ValueError(f"{where} is a {kind} sentencepiece model; the export writes BPE models only "
                         f"(LLaMA, Vicuna, Mistral, the shapes world)")
    if spec["remove_extra_whitespaces"] or not spec["escape_whitespaces"] or spec["treat_whitespace_as_suffix"]:
        raise ValueError(f"{where}: remove_extra_whitespaces / no escape_whitespaces / treat_whitespace_as_suffix "
                         f"cannot be written as a tokenizer.json that tokenises as sentencepiece does")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    normal = {p for p, _, t in pieces if t == "normal"}
    merges = []
    for _, _, p in sorted((-s, i, p) for i, (p, s, t) in enumerate(pieces) if t == "normal" and len(p) > 1):
        merges += [[p[:k], p[k:]] for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
    prefix = spec["add_dummy_prefix"]
    normalizers = []
    if spec["charsmap"]:  # a normalisation rule other than identity, precompiled into the model
        import base64
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(spec["charsmap"]).decode()})
    if prefix and tok.legacy:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    pre = []
    if prefix and not tok.legacy:
        pre.append({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})
    symbols = sorted((p for p, _, t in pieces if t == "user_defined"), key=len, reverse=True)
    if symbols:
        pre.append({"type": "Split", "pattern": {"Regex": "|".join(map(_rx_literal, symbols))},
                    "behavior": "Isolated", "invert": False})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    unk = tok.sp.unk_id()
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(i, p) for i, (p, _, t) in enumerate(pieces) if t in ("control", "unknown")],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre} if pre else None,
        "post_processor": _bos_processor(pieces[tok.bos_id][0], tok.bos_id) if tok.add_bos else None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[unk][0] if unk >= 0 else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": spec["byte_fallback"], "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def _byte_chars():
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(0x100, 0x200))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _tiktoken_json(tok):
    """tokenizer.json for a LLaMA-3 style tiktoken model: LLaMA-3's split pattern, then byte-level BPE.
    tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a whole
    pre-token that is itself a rank as one token (ignore_merges)."""
    chars = _byte_chars()
    text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    ranks = tok.ranks
    merges = []
    for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        merges += [[text(t[:k]), text(t[k:])] for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks]
    specials = tok.specials
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added(i, s) for s, i in sorted(specials.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": _bos_processor("<|begin_of_text|>", tok.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): r for t, r in ranks.items()}, "merges": merges},
    }


def _gguf_bpe_json(tok):
    """tokenizer.json for a GGUFBPETokenizer: the file's vocabulary and merges as they are, its pre-tokenizer
    (smollm: Digits one by one, then ByteLevel; gpt-2: ByteLevel), control tokens as special added tokens
    (user-defined ones as plain added tokens), GPT-2's byte-level decoder. No unk token: a byte without a
    token is dropped, as GGUFBPETokenizer does."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = [{"type": "Digits", "individual_digits": True}] if tok.pre == "smollm" else []
    added = [_added(i, t) | {"special": tok.types[i] == GGUF_CONTROL}
             for t, i in sorted(tok.specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre + [byte_level]},
        "post_processor": _bos_processor(tok.tokens[tok.bos_id], tok.bos_id) if tok.add_bos else None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok.tokens)}, "merges": [m.split(" ") for m in tok.merges]},
    }


def hf_tokenizer_files(tok, image_token_id, model_max_length, image_token=IMAGE_TAG_HF):
    """{file name: JSON object}: tokenizer.json, tokenizer_config.json and special_tokens_map.json for
    `tok` (a SentencePieceTokenizer, TiktokenTokenizer or GGUFBPETokenizer), with `image_token` added as a
    special token at `image_token_id`, the row export_llava_hf gives the placeholder. transformers loads the files as
    PreTrainedTokenizerFast (tokenizer.json as it is), which tokenises a rendered prompt as nanoVT does
    (tests/test_export.py); nanoVT itself reads tokenizer.model and the legacy / add_bos_token /
    bos / eos / pad fields of tokenizer_config.json (tokenizer_config())."""
    spm = isinstance(tok, SentencePieceTokenizer)
    if 0 <= image_token_id < tok.vocab_size:
        raise ValueError(f"the image placeholder id {image_token_id} is token {tok.piece(image_token_id)!r} of "
                         f"the tokenizer ({tok.vocab_size} tokens); it needs a row of its own")
    tj = (_sentencepiece_json(tok) if spm else _gguf_bpe_json(tok) if isinstance(tok, GGUFBPETokenizer)
          else _tiktoken_json(tok))
    tj["added_tokens"].append(_added(image_token_id, image_token))
    piece = (lambda i: tok.sp.id_to_piece(i)) if spm else (lambda i: tok.piece(i))
    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id)}
    if spm and tok.sp.unk_id() >= 0:
        special["unk_token"] = piece(tok.sp.unk_id())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "add_bos_token": tok.add_bos, "add_eos_token": False, "legacy": tok.legacy,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length, "padding_side": "left",
        "extra_special_tokens": {"image_token": image_token},
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]},
    }
    token = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                       "single_word": False}
    specials_map = {k: token(v) for k, v in special.items()} | {"additional_special_tokens": [token(image_token)]}
    return {"tokenizer.json": tj, "tokenizer_config.json": config, "special_tokens_map.json": specials_map}
