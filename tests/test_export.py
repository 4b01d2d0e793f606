"""The export is a whole Hugging Face repository: clients we did not write (transformers' AutoProcessor,
LlavaForConditionalGeneration, pipeline("image-text-to-text")) run it from the directory alone and give
nanoVT's greedy tokens; its tokenizer and chat template give conversation.py's ids on real tokenizers;
its image processor gives data.process_image's pixels on real photographs; it loads back into nanoVT
bit for bit. docs/weights.md §Export."""

import base64
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import llava_ref
import numpy as np
import pytest
import torch
from PIL import Image

import conversation
import data
import inference
import losses
import weights
from conversation import render_conversation, tokenize_conversation, tokenize_prompt
from model import VTLMM, DecoderConfig, VisionConfig, VTLMMConfig
from tokenizer import hf_tokenizer_files, load_tokenizer, sentencepiece_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------- a tiny trained model


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A tiny VT-LMM (configs/tiny.py's shapes) trained on the shapes world's tokenizer until it answers
    twelve held-out questions of both kinds and two follow-ups with their own answers, so that greedy
    decoding gives varied tokens; saved as a nanoVT checkpoint and exported by the command line."""
    d = tmp_path_factory.mktemp("export")
    tok = load_tokenizer(world / "tokenizer.model")
    torch.manual_seed(0)
    cfg = VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),
                      decoder=DecoderConfig(vocab_size=tok.vocab_size, dim=64, layers=2, heads=4, kv_heads=2,
                                            hidden=128, max_seq_len=256), template="vicuna_v1")
    model = VTLMM(cfg)
    model.init_weights()
    qs = read_jsonl(world / "eval_short.jsonl")[:8] + read_jsonl(world / "eval_pope.jsonl")[:4]
    for q in qs:
        q["answer"] = q.get("answer") or q["label"].capitalize()
    follow = [(qs[0], "How many circles are there?", "two"), (qs[3], "What is the background?", "a gray one")]
    samples = []
    for k, q in enumerate(qs):
        turns = [{"from": "human", "value": "<image>\n" + q["text"]}, {"from": "gpt", "value": q["answer"]}]
        samples.append((turns, q["image"]))
    for q, text, answer in follow:
        samples.append((samples[qs.index(q)][0] + [{"from": "human", "value": text}, {"from": "gpt", "value": answer}],
                        q["image"]))
    batch = data.collate([{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": str(k),
                           "pixel_values": data.process_image(data.load_image(world / image), 32)}
                          for k, (turns, image) in enumerate(samples)
                          for ids, labels in [tokenize_conversation(turns, tok, "vicuna_v1", cfg.image_token_id,
                                                                    cfg.vision.num_patches)]], tok.pad_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the suite shares the cores
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(80):
            loss, _, _ = losses.Objective(model, "lm")(batch["input_ids"], batch["pixel_values"],
                                                       labels=batch["labels"], attention_mask=batch["attention_mask"])
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    torch.nn.init.normal_(model.vm_head.weight)  # a VM head unlike its init, for the round trip
    ckpt = d / "ckpt"
    model.save_pretrained(str(ckpt))
    (ckpt / "tokenizer.model").write_bytes((world / "tokenizer.model").read_bytes())
    weights.main([str(ckpt), "--export", str(d / "hf")])
    image = lambda q: data.load_image(world / q["image"])  # noqa: E731
    return SimpleNamespace(model=model, tok=tok, hf_dir=d / "hf", qs=qs, follow=follow, image=image)


def nanovt_greedy(model, tok, text, image, history=(), max_new_tokens=12):
    ids = inference.prompt_ids(model, tok, text, True, history)
    px = data.process_image(image, model.cfg.vision.image_size)[None]
    with torch.no_grad():
        steps = [int(s[0]) for s in inference.generate_stream(model, torch.tensor([ids]), px, max_new_tokens=max_new_tokens,
                                                          stop_ids=[tok.eos_id])]
    return steps


def hf_greedy(hf, inputs, max_new_tokens=12):
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_export_writes_a_whole_repository(trained):
    tok, hf_dir = trained.tok, trained.hf_dir
    assert sorted(os.listdir(hf_dir)) == sorted([
        "model.safetensors", "vm_head.safetensors", "config.json", "generation_config.json", "tokenizer.model",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
        "preprocessor_config.json", "processor_config.json"])
    from transformers import AutoConfig, AutoProcessor
    config, processor = AutoConfig.from_pretrained(hf_dir), AutoProcessor.from_pretrained(hf_dir)
    assert type(processor).__name__ == "LlavaProcessor"
    # the placeholder: the tokenizer's <image> is the row config.json names, after the tokenizer's own ids
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index == tok.vocab_size
    assert processor.image_token_id == config.image_token_index
    t = processor.tokenizer
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_processor_only_path_gives_nanovt_greedy_tokens(trained):
    """AutoProcessor + LlavaForConditionalGeneration, driven only through the processor: the chat
    template, the image processor and the <image> expansion give nanoVT's prompt ids and pixels, and
    generate() nanoVT's greedy tokens, single-turn, multi-turn and in a left-padded batch."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, tok, hf_dir, qs, follow = trained.model, trained.tok, trained.hf_dir, trained.qs, trained.follow
    processor = AutoProcessor.from_pretrained(hf_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    image_row = hf.config.image_token_index
    answers, right = [], 0
    for q in qs:
        image = trained.image(q)
        mine = nanovt_greedy(model, tok, q["text"], image)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        want_ids = [image_row if i == model.cfg.image_token_id else i
                    for i in inference.prompt_ids(model, tok, q["text"], True)]
        assert inputs["input_ids"][0].tolist() == want_ids
        assert torch.equal(inputs["pixel_values"][0], data.process_image(image, 32))
        theirs = hf_greedy(hf, inputs)[0]
        assert theirs == mine, (q["text"], tok.decode(mine), tok.decode(theirs))
        answers.append(tok.decode(mine).strip())
        right += answers[-1] == q["answer"]
    assert right >= 10 and len(set(answers)) >= 5, answers  # a trained model, not one token for everything
    for q, text, answer in follow:  # the second question of a chat, after the model's own first answer
        image = trained.image(q)
        history = [{"from": "human", "value": q["text"]}, {"from": "gpt", "value": q["answer"]}]
        mine = nanovt_greedy(model, tok, text, image, history)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["text"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": q["answer"]}]},
                    {"role": "user", "content": [{"type": "text", "text": text}]}]
        inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           return_tensors="pt")
        assert hf_greedy(hf, inputs)[0] == mine
        assert tok.decode(mine).strip() == answer
    # a left-padded batch of two prompts of different lengths answers as each does alone
    pair = [qs[0], follow[1][0]]
    images = [trained.image(q) for q in pair]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": t}]}],
                                           add_generation_prompt=True) for t in (pair[0]["text"], "Is it red?")]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    got = hf_greedy(hf, inputs)
    for row, image, text in zip(got, images, (pair[0]["text"], "Is it red?")):
        mine = nanovt_greedy(model, tok, text, image)
        assert row[:len(mine)] == mine


def test_pipeline_answers_the_same(trained):
    from transformers import pipeline
    model, tok = trained.model, trained.tok
    pipe = pipeline("image-text-to-text", model=str(trained.hf_dir))
    for q in trained.qs[:4]:
        image = trained.image(q)
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q["text"]}]}]
        mine = nanovt_greedy(model, tok, q["text"], image)
        out = pipe(text=messages, max_new_tokens=12, do_sample=False, return_full_text=False)
        # the pipeline cuts the decoded prompt off the decoded whole, so the answer keeps its leading space
        assert out[0]["generated_text"].strip() == tok.decode(mine).strip()
        ids = pipe(text=messages, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        assert ids.tolist()[-len(mine):] == mine


def test_export_loads_back_into_nanovt_bit_equal(trained):
    """weights.from_pretrained(export) holds the same tensors (VM head included); the placeholder's row is
    the extra all-zero one, and the reloaded model with the exported tokenizer answers the same."""
    model, tok, hf_dir, qs = trained.model, trained.tok, trained.hf_dir, trained.qs
    back = weights.from_pretrained(str(hf_dir))
    C = model.cfg.decoder.vocab_size
    assert back.cfg.image_token_id == C and back.cfg.decoder.vocab_size == C + 1
    assert back.cfg.template == model.cfg.template and back.cfg.vision == model.cfg.vision
    mine, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        q = theirs[name]
        if name in ("decoder.embed.weight", "mm_head.weight", "vm_head.weight"):
            assert torch.equal(q[:C], p) and not q[C:].any(), name
        else:
            assert torch.equal(q, p), name
    back_model, back_tok = inference.load_model(str(hf_dir))
    assert back_tok.legacy == tok.legacy and back_tok.add_bos == tok.add_bos and back_tok.pad_id == tok.pad_id
    image = trained.image(qs[0])
    assert nanovt_greedy(back_model, back_tok, qs[0]["text"], image) == nanovt_greedy(model, tok, qs[0]["text"], image)


# ---------------------------------------------------------------------------- tokenizer and chat template


@pytest.fixture(scope="module")
def real_tokenizers(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_like")
    return {"demo": str(world / "tokenizer.model"), "mistral": llava_ref.mistral_model_path(),
            "llama2": llava_ref.train_llama_like(str(d / "tokenizer.model"))}


def hf_tokenizer(tok, template, folder):
    """transformers' tokenizer from the files export writes for `tok`, with `template`'s chat template."""
    from transformers import AutoTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    files = hf_tokenizer_files(tok, tok.vocab_size, 1024)
    files["tokenizer_config.json"]["chat_template"] = conversation.hf_chat_template(template, tok.legacy)
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(folder)


TEXTS = ["A chat between a curious user and an artificial intelligence assistant.", "x\n\ny 12 3  two spaces",
         "\nstarts with a newline", "中文的回答 😀 yes", "tab\there\r\n", "(a) 'quoted' \"double\" 1999-2024", "a" * 40]


@pytest.mark.parametrize("name", ["demo", "mistral", "llama2"])
def test_sentencepiece_model_reads_as_protobuf_does(real_tokenizers, name):
    """tokenizer.sentencepiece_model's own protobuf reading against sentencepiece's API and protobuf's."""
    from sentencepiece import sentencepiece_model_pb2
    tok = load_tokenizer(real_tokenizers[name])
    pieces, spec = sentencepiece_model(tok.sp.serialized_model_proto())
    sp = tok.sp
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in pieces] == [sp.get_score(i) for i in range(sp.get_piece_size())]
    for i, (_, _, kind) in enumerate(pieces):
        assert (kind == "control", kind == "unknown", kind == "byte") == (sp.is_control(i), sp.is_unknown(i),
                                                                          sp.is_byte(i))
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    assert [p.type for p in m.pieces].count(4) == [k for _, _, k in pieces].count("user_defined")
    assert (spec["model_type"], spec["byte_fallback"]) == (m.trainer_spec.model_type, m.trainer_spec.byte_fallback)
    n = m.normalizer_spec
    assert (spec["normalizer"], spec["charsmap"], spec["add_dummy_prefix"], spec["remove_extra_whitespaces"],
            spec["escape_whitespaces"]) == (n.name, n.precompiled_charsmap, n.add_dummy_prefix,
                                            n.remove_extra_whitespaces, n.escape_whitespaces)


@pytest.mark.parametrize("name", ["demo", "mistral", "llama2"])
def test_exported_tokenizer_encodes_as_sentencepiece(real_tokenizers, world, tmp_path, name):
    """tokenizer.json (written by tokenizer.py, not transformers' own conversion) gives nanoVT's ids, BOS
    first, on the world's text corpus and on digits, CJK, emoji, runs of spaces and newlines; and decodes
    them back to the text."""
    tok = load_tokenizer(real_tokenizers[name])
    hf = hf_tokenizer(tok, "vicuna_v1", tmp_path)
    corpus = (world / "text_corpus.txt").read_text().split("\n")[:200]
    for text in TEXTS + corpus:
        assert hf(text).input_ids == [tok.bos_id] + tok.encode(text), text
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == tok.decode(tok.encode(text))


def test_exported_tiktoken_tokenizer_encodes_as_tiktoken(tmp_path):
    """A LLaMA-3 style tiktoken rank file exports as byte-level BPE with LLaMA-3's split pattern."""
    words = [b" t", b"he", b" the", b"ir", b" c", b" cir", b"cle", b" circle", b"ed", b" r", b" red", b"12"]
    ranks = [bytes([i]) for i in range(256)] + words
    path = tmp_path / "tt" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    tok = load_tokenizer(path)
    hf = hf_tokenizer(tok, "vicuna_v1", tmp_path / "hf")
    for text in TEXTS + ["the red circle's 12345 circles", "USER: <image>\nthe circle ASSISTANT:"]:
        want = [tok.bos_id] + tokenize_prompt(text, tok, tok.vocab_size, 1)[1:]
        assert hf(text).input_ids == want, text
    assert hf.convert_tokens_to_ids("<|end_of_text|>") == tok.eos_id


def turns_of(messages):
    """The LLaVA JSON turns conversation.py reads for transformers' messages."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            value = m["content"]
        else:
            value = "".join(("<image>\n" if c["type"] == "image" else c["text"]) for c in m["content"])
        out.append({"from": "human" if m["role"] == "user" else "gpt", "value": value})
    return out


def user(text, image=False):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CHATS = {
    "single": [user("What color is the circle? ", image=True)],
    "single-answered": [user("What color is the circle?", image=True), assistant("Red.")],
    "multi": [user("What is it?", image=True), assistant("42 apples"), user("And now?"), assistant("\nTwo lines"),
              user("Last one")],
    "text-only": [user("Count to three."), assistant("1 2 3"), user("  spaced  ")],
    "string-content": [{"role": "user", "content": "What is this?\n<image>"}],  # as lmms-eval's llava_hf sends
}


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name,template", [("demo", "vicuna_v1"), ("llama2", "vicuna_v1"),
                                           ("mistral", "mistral_instruct"), ("mistral", "vw_mistral"),
                                           ("demo", "plain")])
def test_chat_template_gives_conversation_ids(real_tokenizers, tmp_path, name, template, legacy):
    """apply_chat_template + the exported tokenizer give tokenize_prompt's ids of render_conversation (the
    training prompt when the chat ends with an answer, the generation prompt when it ends with a question),
    for each template on its real tokenizer, single- and multi-turn, with legacy true and false."""
    tok = load_tokenizer(real_tokenizers[name], legacy=legacy)
    hf = hf_tokenizer(tok, template, tmp_path)
    for case, messages in CHATS.items():
        if template == "plain" and case not in ("single", "single-answered"):
            continue
        answered = messages[-1]["role"] == "assistant"
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answered)
        ours = render_conversation(turns_of(messages), template)
        assert text.replace("<image> ", "<image>") == ours, case  # legacy=False writes the space itself
        assert hf(text).input_ids == tokenize_prompt(ours, tok, tok.vocab_size, 1), case
        if answered:
            ids, _ = tokenize_conversation(turns_of(messages), tok, template, tok.vocab_size, 1)
            assert hf(text).input_ids == ids, case


def test_gguf_tokenizer_and_chatml_export(smollm2_tokenizer, tmp_path):
    """SmolLM2's GGUF tokenizer exports as tokenizer.json (Digits, then ByteLevel) with the chatml chat
    template: transformers gives nanoVT's ids on text (control-token text included) and decodes them
    back, and apply_chat_template gives tokenize_prompt's ids of render_conversation, with a system
    message too."""
    tok = smollm2_tokenizer
    hf = hf_tokenizer(tok, "chatml", tmp_path)
    for text in TEXTS + ["In  6757", "<|im_start|>user\nHi<|im_end|>\n", "a\x04b!\x04!", "<image>\nx"]:
        want = tokenize_prompt(text, tok, tok.vocab_size, 1)
        assert hf(text).input_ids == want, text
        assert hf.decode(want) == tok.decode(tok.encode(text)), text
    chats = dict(CHATS, system=[{"role": "system", "content": "Be brief."}, user("Hi", image=True), assistant("Ok")])
    for case, messages in chats.items():
        answered = messages[-1]["role"] == "assistant"
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=not answered)
        turns = [{"from": "system", "value": m["content"]} if m["role"] == "system" else turns_of([m])[0]
                 for m in messages]
        ours = render_conversation(turns, "chatml")
        assert text == ours, case
        assert hf(text).input_ids == tokenize_prompt(ours, tok, tok.vocab_size, 1), case
        if answered:
            ids, _ = tokenize_conversation(turns, tok, "chatml", tok.vocab_size, 1)
            assert hf(text).input_ids == ids, case


def test_vicuna_template_takes_a_system_message(real_tokenizers, tmp_path):
    hf = hf_tokenizer(load_tokenizer(real_tokenizers["demo"]), "vicuna_v1", tmp_path / "v")
    text = hf.apply_chat_template([{"role": "system", "content": "Be brief."}, user("Hi")], tokenize=False,
                                  add_generation_prompt=True)
    assert text == "Be brief. USER: Hi ASSISTANT:"
    mistral = hf_tokenizer(load_tokenizer(real_tokenizers["mistral"]), "mistral_instruct", tmp_path / "m")
    with pytest.raises(Exception, match="no system prompt"):
        mistral.apply_chat_template([{"role": "system", "content": "x"}, user("Hi")], tokenize=False)


def test_export_refuses_what_it_cannot_write(world, tmp_path):
    tok = load_tokenizer(world / "tokenizer.model")
    small = VTLMM(VTLMMConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp=32),
                              decoder=DecoderConfig(vocab_size=100, dim=32, layers=1, heads=2, hidden=64)))
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        weights.export_llava_hf(small, str(tmp_path / "a"), world / "tokenizer.model")
    assert not (tmp_path / "a").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="needs a row of its own"):
        hf_tokenizer_files(tok, 5, 256)
    unigram = tmp_path / "uni" / "tokenizer.model"
    import sentencepiece as spm
    unigram.parent.mkdir()
    with open(unigram, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=f, vocab_size=60,
                                       model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="unigram sentencepiece model"):
        hf_tokenizer_files(load_tokenizer(unigram), 200, 256)


# ---------------------------------------------------------------------------- the image processor


def photographs():
    """scikit-image's sample photographs, and odd shapes and modes made from them."""
    import skimage.data as sk
    images = {n: Image.fromarray(getattr(sk, n)()) for n in
              ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "hubble_deep_field", "page", "text",
               "colorwheel", "logo")}  # RGB, greyscale (camera, coins, page, text), RGBA (logo), 300 to 1000 px
    images["tall"] = images["coffee"].resize((37, 400))
    images["wide"] = images["chelsea"].resize((451, 19))
    images["tiny"] = images["astronaut"].resize((3, 5))
    images["one-pixel"] = images["astronaut"].resize((1, 1))
    images["palette"] = images["chelsea"].convert("P")
    images["grey+alpha"] = images["camera"].convert("LA")
    images["opaque-rgba"] = images["coffee"].convert("RGBA")
    return images


@pytest.mark.parametrize("size", [336, 32])
def test_image_processor_pixels_equal_process_image(tmp_path, size):
    """The exported preprocessor_config.json through AutoImageProcessor (PIL backend, the one installed
    without torchvision) gives data.process_image's pixels: LLaVA's pad-to-square with the mean colour,
    bicubic resize, crop, rescale, normalise; measured equal to the bit on every image here. One
    documented difference: transformers composites a translucent image on white, LLaVA and nanoVT drop
    the alpha channel (convert("RGB") first to get nanoVT's pixels)."""
    from transformers import AutoImageProcessor
    image_cfg, _ = weights.hf_processor_configs(VisionConfig(image_size=size, patch_size=8))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    for name, image in photographs().items():
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(theirs, data.process_image(image, size)), name
    rgba = np.array(photographs()["coffee"].convert("RGBA"))
    rgba[..., 3] = np.arange(rgba.shape[1]) % 256  # translucent columns
    translucent = Image.fromarray(rgba)
    white = Image.alpha_composite(Image.new("RGBA", translucent.size, (255, 255, 255, 255)), translucent)
    theirs = processor(images=translucent, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(theirs, data.process_image(white, size))
    assert not torch.equal(theirs, data.process_image(translucent, size))


# ---------------------------------------------------------------------------- the command line


def test_print_command_ends_quietly_in_a_closed_pipe():
    """`python weights.py --layout llava-hf | head -1`, a real pipe: one line, no BrokenPipeError."""
    r = subprocess.run(f"{sys.executable} weights.py --layout llava-hf --preset mistral-7b-v0.1 | head -1",
                       shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("# layout llava-hf, mistral-7b-v0.1:") and r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
