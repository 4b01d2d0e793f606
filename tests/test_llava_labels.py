"""nanoVT's input_ids and labels against LLaVA-1.5's own rule (tests/llava_ref.py) with real
tokenizers: Mistral-7B's and a LLaMA-2-like one; tokenizer_config.json's `legacy` against
transformers; and a tiny run that only learns to start a numeric answer with LLaVA's labels."""

import json
import shutil

import llava_ref
import pytest
import torch

import data
import inference
import losses
from conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    render_conversation,
    tokenize_conversation,
    tokenize_prompt,
)
from model import VTLMM, DecoderConfig, VisionConfig, VTLMMConfig
from tokenizer import SentencePieceTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory):
    """{"mistral": path, "llama2": path}: the real Mistral-7B model and a LLaMA-2-like one trained once."""
    d = tmp_path_factory.mktemp("real_tokenizers")
    return {"mistral": llava_ref.mistral_model_path(), "llama2": llava_ref.train_llama_like(str(d / "llama2.model"))}


def qa(*pairs, image=True):
    turns = []
    for q, a in pairs:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    if image:  # as in LLaVA's data: the tag at the end of the first question, moved to the front
        turns[0]["value"] += "\n<image>"
    return turns


ANSWERS = {  # every kind of first character the issue names, and an ordinary word
    "word": "A red circle.", "digit": "3", "number": "42 apples", "cjk": "中文的回答",
    "newline": "\nTwo lines\nhere", "emoji": "😀 yes", "paren": "(a) the first one", "quote": '"yes", he said',
}
CASES = {f"single-{k}": qa(("What is it?", a)) for k, a in ANSWERS.items()}
CASES |= {f"text-{k}": qa(("How many?", a), image=False) for k, a in ANSWERS.items()}
CASES["multi"] = qa(("How many apples?", "42"), ("And in Chinese?", "四十二"), ("Which option?", "(b)"),
                    ("Say it with an emoji", "🍎 apples"), ("Spell it", "forty-two"))
CASES["multi-text"] = qa(("Count", "7"), ("Quote it", '"seven"'), ("New line?", "\nok"), image=False)


@pytest.mark.parametrize("tokenizer", ["mistral", "llama2"])
@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "vw_mistral"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_labels_equal_llava_rule(tokenizer_files, tokenizer, template, case):
    path = tokenizer_files[tokenizer]
    tok, ref = SentencePieceTokenizer(path, config={}), llava_ref.LegacyTokenizer(path)
    turns = CASES[case]
    has_image = "text" not in case
    want_ids, want_labels, mismatch = llava_ref.llava_ids_labels(turns, ref, template, has_image)
    assert not mismatch  # the reference's own lengths agree, so its labels are LLaVA's
    ids, labels = tokenize_conversation(turns, tok, template, IMAGE_TOKEN_ID, num_patches=1, has_image=has_image)
    assert ids == want_ids
    assert labels == [IGNORE_INDEX if l == llava_ref.IGNORE or i == IMAGE_TOKEN_ID else l
                      for i, l in zip(want_ids, want_labels)]


@pytest.mark.parametrize("tokenizer", ["mistral", "llama2"])
@pytest.mark.parametrize("answer", sorted(ANSWERS))
def test_plain_template_equals_llava_rule(tokenizer_files, tokenizer, answer):
    path = tokenizer_files[tokenizer]
    tok, ref = SentencePieceTokenizer(path, config={}), llava_ref.LegacyTokenizer(path)
    turns = qa(("Describe the image briefly.", ANSWERS[answer]))
    want_ids, want_labels, _ = llava_ref.llava_ids_labels(turns, ref, "plain", True)
    ids, labels = tokenize_conversation(turns, tok, "plain", IMAGE_TOKEN_ID, num_patches=1, has_image=True)
    assert ids == want_ids and labels == [IGNORE_INDEX if l == llava_ref.IGNORE else l for l in want_labels]


def test_the_bare_space_piece_is_what_changed(tokenizer_files):
    """The cases above would fail with a rule that supervises only the answer's own characters:
    with both tokenizers a digit answer starts with a bare "▁" piece, and it is supervised."""
    for name, path in tokenizer_files.items():
        tok = SentencePieceTokenizer(path, config={})
        ids, labels = tokenize_conversation(qa(("How many?", "3")), tok, "vicuna_v1", IMAGE_TOKEN_ID, 1)
        first = next(k for k, l in enumerate(labels) if l != IGNORE_INDEX)
        assert tok.piece(ids[first]) == "▁" and tok.piece(ids[first + 1]) == "3", name
        assert tok.piece(ids[first - 1]) == ":"


def _with_config(tmp_path, model_path, **config):
    d = tmp_path / ("cfg-" + "-".join(f"{k}{v}" for k, v in config.items()))
    d.mkdir()
    shutil.copyfile(model_path, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, **config}))
    return d


@pytest.mark.parametrize("tokenizer", ["mistral", "llama2"])
@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct"])
def test_legacy_false_changes_multi_turn_ids_as_transformers(tokenizer_files, tokenizer, template, tmp_path):
    from transformers import LlamaTokenizer
    ids = {}
    for legacy in (True, False):
        d = _with_config(tmp_path, tokenizer_files[tokenizer], legacy=legacy)
        hf = LlamaTokenizer.from_pretrained(str(d))
        tok = load_tokenizer(d)
        assert tok.legacy is legacy
        for case in ("multi", "multi-text"):
            turns, has_image = CASES[case], case == "multi"
            prompt = render_conversation(turns, template, has_image)
            hf_call = lambda s: hf(s).input_ids  # noqa: E731
            want = llava_ref.tokenizer_image_token(prompt, hf_call) if has_image else hf(prompt).input_ids
            got, labels = tokenize_conversation(turns, tok, template, IMAGE_TOKEN_ID, 1, has_image)
            assert got == [IMAGE_TOKEN_ID if i == llava_ref.IMAGE else i for i in want], (legacy, case)
            assert tokenize_prompt(prompt, tok, IMAGE_TOKEN_ID, 1) == got
            # the labels still hold every answer and its </s>
            runs = [tok.decode([i for i, l in zip(got, labels) if l != IGNORE_INDEX])]
            assert all(t["value"].strip() in runs[0] for t in turns if t["from"] == "gpt")
            ids[legacy, case] = got
    assert ids[True, "multi"] != ids[False, "multi"] and ids[True, "multi-text"] != ids[False, "multi-text"]
    # without a tokenizer_config.json: plain sentencepiece, the legacy ids
    plain = SentencePieceTokenizer(tokenizer_files[tokenizer])
    assert plain.legacy and tokenize_conversation(CASES["multi"], plain, template, IMAGE_TOKEN_ID, 1)[0] == \
        ids[True, "multi"]


def test_tokenizer_config_fields(tokenizer_files, tmp_path):
    d = _with_config(tmp_path, tokenizer_files["mistral"], add_bos_token=False, legacy=False)
    tok = load_tokenizer(d)
    ids, labels = tokenize_conversation(qa(("Q", "3")), tok, "mistral_instruct", IMAGE_TOKEN_ID, 1)
    assert ids[0] != tok.bos_id and len(ids) == len(labels)
    assert load_tokenizer(d, legacy=True).legacy is True  # an explicit choice overrides the file
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<nope>"}}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not a piece"):
        load_tokenizer(d)


# ---------------------------------------------------------------------------- a tiny run learns digits

DIGIT_QA = [(f"What is the code of {w}?", c) for w, c in [
    ("apple", "17"), ("pear", "4"), ("plum", "350"), ("fig", "82"), ("lime", "6"), ("kiwi", "1999"),
    ("date", "23"), ("nut", "5")]]


def _train_and_answer(tok, old_rule, steps=120):
    torch.manual_seed(0)
    cfg = VTLMMConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp=32),
                      decoder=DecoderConfig(vocab_size=tok.vocab_size, dim=64, layers=2, heads=4, kv_heads=4,
                                            hidden=128, max_seq_len=128))
    model = VTLMM(cfg)
    model.init_weights()
    rows = []
    for q, a in DIGIT_QA:
        ids, labels = tokenize_conversation(qa((q, a), image=False), tok, "vicuna_v1", IMAGE_TOKEN_ID, 1)
        if old_rule:  # the earlier rule: only tokens overlapping the answer's characters
            labels = [IGNORE_INDEX if l != IGNORE_INDEX and tok.piece(i) == "▁" and labels[k - 1] == IGNORE_INDEX
                      else l for k, (i, l) in enumerate(zip(ids, labels))]
        rows.append((ids, labels))
    batch = data.collate([{"input_ids": torch.tensor(i), "labels": torch.tensor(l), "id": str(k)}
                          for k, (i, l) in enumerate(rows)], tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss, _, _ = losses.Objective(model, "lm")(batch["input_ids"], labels=batch["labels"],
                                                   attention_mask=batch["attention_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    right = 0
    for q, a in DIGIT_QA:  # greedy, from the generation prompt "... ASSISTANT:", as sample.py asks
        prompt = render_conversation(qa((q, ""), image=False)[:1], "vicuna_v1")
        ids = torch.tensor([tokenize_prompt(prompt, tok)])
        with torch.no_grad():
            out = inference.generate(model, ids, max_new_tokens=8, stop_ids=[tok.eos_id])[0, ids.shape[1]:].tolist()
        right += tok.decode([i for i in out if i != tok.eos_id]).strip() == a
    return right


def test_tiny_run_learns_to_answer_with_digits(tokenizer_files):
    tok = SentencePieceTokenizer(tokenizer_files["llama2"], config={})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the suite shares the cores
    try:
        with_llava_labels = _train_and_answer(tok, old_rule=False, steps=60)
        with_old_labels = _train_and_answer(tok, old_rule=True, steps=60)
    finally:
        torch.set_num_threads(threads)
    assert with_llava_labels >= 7, with_llava_labels
    assert with_old_labels <= 2, with_old_labels  # never taught to start the answer
