"""
Tokenizers for nanoVT: one small interface over the two kinds of `tokenizer.model` file.

    encode(text, dummy_prefix=True) -> ids (no BOS/EOS)     encode_with_offsets(text) -> [(id, start, end)]
    decode(ids) -> text     piece(i) -> str     bos_id / eos_id / pad_id     vocab_size     legacy, add_bos

SentencePieceTokenizer: LLaMA, Vicuna, Mistral and the shapes world (a sentencepiece ModelProto), with
the tokenizer_config.json the released model ships; TiktokenTokenizer: LLaMA-3's BPE rank files.
load_tokenizer tells them apart by content. How prompts are tokenised with them: conversation.py;
the rules: docs/data.md §Tokenizers.
"""

import json
import re
from pathlib import Path


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
