"""A small, independent reference of LLaVA-1.5's preprocessing (llava/train/train.py preprocess_v1,
preprocess_llama_2, preprocess_plain; llava/mm_utils.py tokenizer_image_token; llava/conversation.py
get_prompt), written from the rule, for the tests to compare nanoVT's ids and labels against.

The tokenizer is the one LLaVA-1.5 trained with: transformers 4.31's slow LlamaTokenizer, legacy
behaviour: the text is split at the special token </s>, every piece of text is encoded by
sentencepiece on its own (so with its dummy-prefix space), BOS first. Also the real tokenizers the
tests use: Mistral-7B's (shipped inside the mistral_common package) and a LLaMA-2-like one trained
here (digits split, byte fallback, LLaMA-2's normalisation)."""

import importlib.util
import os

import sentencepiece as spm

IGNORE = -100
IMAGE = -200
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def mistral_model_path():
    """Mistral-7B's sentencepiece model, package data of mistral_common."""
    spec = importlib.util.find_spec("mistral_common")
    return os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")


LLAMA_LIKE_CORPUS = [
    SYSTEM, "USER: ASSISTANT: [INST] [/INST]", "What is shown in the image? A red circle on a white background.",
    "How many apples are there? There are 42 apples and 7 pears.", "The answer is (a), the first option.",
    'He said "yes" and left.', "Describe the picture in detail. A small dog sits on a green lawn next to a fence.",
    "Is there a blue star? No, there is no blue star.", "The year 1999 came before 2024.",
    "Digits: 0 1 2 3 4 5 6 7 8 9, and 365 days.",
]


def train_llama_like(path):
    """A LLaMA-2-like sentencepiece BPE model: digits split, byte fallback for what is not in the
    vocabulary (CJK, emoji), LLaMA-2's identity normalisation, dummy prefix, no whitespace cleanup."""
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(LLAMA_LIKE_CORPUS * 30), model_writer=f, vocab_size=500, model_type="bpe",
            split_digits=True, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1,
            shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    return path


class LegacyTokenizer:
    """`tokenizer(text).input_ids` of transformers' slow LlamaTokenizer (legacy=True)."""

    def __init__(self, model_path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()

    def __call__(self, text):
        ids = [self.bos]
        pieces = text.split("</s>")
        for k, piece in enumerate(pieces):
            if piece:
                ids += self.sp.encode(piece)
            if k < len(pieces) - 1:
                ids.append(self.eos)
        return ids


def tokenizer_image_token(prompt, tok):
    """LLaVA's: each chunk between <image> tags tokenised alone; BOS once; -200 for each image."""
    chunks = [tok(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]  # BOS
    for k, c in enumerate(chunks):
        if k:
            ids.append(IMAGE)
        ids += c[1:]
    return ids


def multimodal_turns(turns):
    """LLaVA's preprocess_multimodal: the turn holding <image> becomes "<image>\\n" + the rest."""
    out = []
    for t in turns:
        v = t["value"]
        if "<image>" in v:
            v = ("<image>\n" + v.replace("<image>", "").strip()).strip()
        out.append((t["from"], v))
    return out


def render(turns, style):
    """conversation.py's get_prompt for vicuna_v1 (TWO), llava's mistral_instruct (LLAMA_2, no
    system), and VW-LMM's mistral (MISTRAL)."""
    msgs = multimodal_turns(turns)
    if style == "vicuna_v1":
        ret, seps = SYSTEM + " ", [" ", "</s>"]
        for i, (who, v) in enumerate(msgs):
            ret += ("USER" if who == "human" else "ASSISTANT") + ": " + v + seps[i % 2]
        return ret
    ret = ""
    for i, (who, v) in enumerate(msgs):
        if i % 2 == 0:
            ret += f"[INST] {v} [/INST]"
        else:
            ret += (" " + v + " </s>") if style == "mistral_instruct" else (v + "</s>")
    return ret


def llava_ids_labels(turns, tok, style, has_image):
    """(input_ids, labels) by LLaVA's rule. `style`: vicuna_v1, mistral_instruct, vw_mistral, plain.

    Rounds are split at </s>; a round's instruction is its part up to and including the separator
    ("ASSISTANT: " after " ", "[/INST] "); LLaVA masks len(tokens(instruction)) - 2 tokens (BOS and
    the separator's trailing-space piece) and counts len(tokens(round)) for the round (its BOS slot
    stands for the </s>). The VW-LMM mistral separator "[/INST]" has no trailing space, so only the
    BOS is subtracted there. Also returns whether LLaVA's "tokenization mismatch" occurred.
    """
    enc = (lambda s: tokenizer_image_token(s, tok)) if has_image else tok
    if style == "plain":  # preprocess_plain: "<image>" + caption + "\n"; the image part masked
        prompt = "<image>" + turns[1]["value"] + "\n"
        ids = tokenizer_image_token(prompt, tok)
        n = len(tokenizer_image_token("<image>", tok))
        return ids, [IGNORE] * n + ids[n:], False
    prompt = render(turns, style)
    ids = enc(prompt)
    labels = list(ids)
    sep = {"vicuna_v1": " ASSISTANT: ", "mistral_instruct": "[/INST] ", "vw_mistral": "[/INST]"}[style]
    minus = 1 if style == "vw_mistral" else 2
    cur = 1
    labels[0] = IGNORE
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(enc(rou)), len(enc(parts[0])) - minus
        for k in range(cur, min(cur + instruction_len, len(labels))):
            labels[k] = IGNORE
        cur += round_len
    for k in range(cur, len(labels)):
        labels[k] = IGNORE
    mismatch = cur != len(ids)
    if mismatch:
        labels = [IGNORE] * len(ids)
    return ids, labels, mismatch
