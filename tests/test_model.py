"""model.py against transformers (the reference), on tiny random models, float32, on the CPU; with
NANOVT_TEST_DEVICE=cuda (bench/gpu.sh) the parity tests run both models on that device, TF32 off."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import inference
from hf_tiny import (IMAGE_TOKEN, save_new_layout, save_old_layout, save_original_llava, tiny_llava)
from model import PRESETS, VTLMM, DecoderConfig, VisionConfig, VTLMMConfig
import weights

P = 16  # patches of a 32 px image at patch 8
DEV = torch.device(os.environ.get("NANOVT_TEST_DEVICE", "cpu"))
if DEV.type == "cuda":  # float32 parity means float32 matmuls
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def batch(seed=1, B=2, T=30, at=3, vocab=200, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    ids[:, at:at + P] = IMAGE_TOKEN
    return ids.to(device), torch.randn(B, 3, 32, 32, generator=g).to(device)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def ref(request, tmp_path_factory):
    """(transformers model, its directory in the new llava-hf layout)."""
    # Mistral: grouped-query attention (4 heads, 2 kv heads) and a sliding window shorter than T
    hf = tiny_llava(request.param, sliding_window=7 if request.param == "mistral" else None)
    path = tmp_path_factory.mktemp(request.param)
    return hf, save_new_layout(hf, str(path / "new"))


def test_logits_match_transformers_every_layout(ref, tmp_path):
    hf, new = ref
    ids, px = batch(device=DEV)
    with torch.no_grad():
        want = hf.to(DEV)(input_ids=ids, pixel_values=px).logits
    hf.cpu()
    dirs = {"new": new,
            "old": save_old_layout(hf, str(tmp_path / "old")),
            "sharded": save_new_layout(hf, str(tmp_path / "sharded"), max_shard_size="100KB")}
    assert any(f.endswith(".index.json") for f in os.listdir(dirs["sharded"]))
    keys = load_file(os.path.join(dirs["old"], "model.safetensors")).keys()
    assert any(k.startswith("language_model.model.") for k in keys)
    for name, d in dirs.items():
        m = weights.from_pretrained(d, device=DEV).eval()
        assert m.cfg.image_token_id == IMAGE_TOKEN
        with torch.no_grad():
            got = m(ids, px).logits
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-4, name


def test_new_layout_with_vision_model_prefix(ref, tmp_path):
    """The layout transformers 4.52-4.57 wrote: model.vision_tower.vision_model.*"""
    hf, new = ref
    sd = load_file(os.path.join(new, "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        elif k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("multi_modal_projector."):
            k = "model." + k
        out[k] = v
    os.makedirs(tmp_path / "d")
    save_file(out, str(tmp_path / "d" / "model.safetensors"))
    (tmp_path / "d" / "config.json").write_text(open(os.path.join(new, "config.json")).read())
    ids, px = batch()
    with torch.no_grad():
        assert rel_err(weights.from_pretrained(str(tmp_path / "d"))(ids, px).logits,
                       hf(input_ids=ids, pixel_values=px).logits) <= 1e-4


def test_sliding_window_is_exercised(tmp_path):
    new = save_new_layout(tiny_llava("mistral", sliding_window=7), str(tmp_path))
    ids, px = batch()
    a = weights.from_pretrained(new).eval()
    b = weights.from_pretrained(new, ).eval()
    b.decoder.cfg.sliding_window = None
    with torch.no_grad():
        assert rel_err(a(ids, px).logits, b(ids, px).logits) > 1e-3  # the window changes the answer


def test_original_llava_and_vwlmm_layout(ref, tmp_path):
    hf, _ = ref
    vm = torch.randn(hf.config.text_config.vocab_size, 64)
    clip = str(tmp_path / "clip")
    d = save_original_llava(hf, str(tmp_path / "vwlmm"), clip, vm_head=vm)
    m = weights.from_pretrained(d).eval()  # the CLIP tower comes from config's mm_vision_tower
    assert m.cfg.image_token_id == -200  # original LLaVA marks the image with the sentinel -200
    ids, px = batch()
    with torch.no_grad():
        got = m(ids.masked_fill(ids == IMAGE_TOKEN, -200), px).logits
        assert rel_err(got, hf(input_ids=ids, pixel_values=px).logits) <= 1e-4
    assert torch.equal(m.vm_head.weight, vm)
    assert m.cfg.template == ("mistral_instruct" if hf.config.text_config.model_type == "mistral" else "vicuna_v1")


def test_kv_cache_matches_full_forward(ref):
    hf, new = ref
    m = weights.from_pretrained(new, device=DEV).eval()
    ids, px = batch(T=40, device=DEV)
    with torch.no_grad():
        full = m(ids, px).logits
        cache = inference.new_cache(m, 2, 40)
        parts = [m(ids[:, :25], px, cache=cache).logits]  # prefill (with the image), then one at a time
        for t in range(25, 40):
            parts.append(m(ids[:, t:t + 1], cache=cache).logits)
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_left_padded_batch_matches_single_rows(ref):
    hf, new = ref
    m = weights.from_pretrained(new).eval()
    long_ids, px0 = batch(seed=1, B=1, T=30, at=3)
    short_ids, px1 = batch(seed=2, B=1, T=24, at=2)
    padded = torch.cat([long_ids, torch.cat([torch.zeros(1, 6, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[1, :6] = False
    with torch.no_grad():
        out = inference.generate(m, padded, torch.cat([px0, px1]), attention_mask=mask, max_new_tokens=6)
        solo0 = inference.generate(m, long_ids, px0, max_new_tokens=6)
        solo1 = inference.generate(m, short_ids, px1, max_new_tokens=6)
        # the prompt logits of the padded row equal its unpadded forward too
        full = m(padded, torch.cat([px0, px1]), attention_mask=mask).logits[1, 6:]
        assert rel_err(full, m(short_ids, px1).logits[0]) <= 1e-5
    assert torch.equal(out[0, -6:], solo0[0, -6:])
    assert torch.equal(out[1, -6:], solo1[0, -6:])


def test_greedy_generate_matches_transformers(ref):
    hf, new = ref
    m = weights.from_pretrained(new, device=DEV).eval()
    ids, px = batch(B=1, T=24, device=DEV)
    with torch.no_grad():
        want = hf.to(DEV).generate(input_ids=ids, pixel_values=px, max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0, min_new_tokens=20)
        hf.cpu()
        got = inference.generate(m, ids, px, max_new_tokens=20)
    assert torch.equal(got, want)


def test_generate_runs_one_forward_per_new_token(monkeypatch):
    """n new tokens cost the prompt's forward + n - 1 single-token steps, not one more."""
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg()).eval()
    calls = []
    m.decoder.register_forward_hook(lambda mod, args, out: calls.append(out.shape[1]))
    real_step = inference.decode_step
    monkeypatch.setattr(inference, "decode_step", lambda model, tok, cache: calls.append("step") or
                        real_step(model, tok, cache))
    with torch.no_grad():
        inference.generate(m, torch.randint(0, 50, (1, 5)), max_new_tokens=6, static=False)
        assert calls == [5] + [1] * 5
        calls.clear()
        inference.generate(m, torch.randint(0, 50, (1, 5)), max_new_tokens=6)  # the static cache's decode step
        assert calls == [5] + ["step"] * 5


def test_stop_tokens_and_sampling():
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg()).eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        greedy = inference.generate(m, ids, max_new_tokens=8)
        stop = int(greedy[0, 6])  # the second generated token of row 0
        stopped = inference.generate(m, ids, max_new_tokens=8, stop_ids=[stop])
        g1 = torch.Generator().manual_seed(3)
        g2 = torch.Generator().manual_seed(3)
        s1 = inference.generate(m, ids, max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9, generator=g1)
        s2 = inference.generate(m, ids, max_new_tokens=8, temperature=1.0, top_k=5, top_p=0.9, generator=g2)
    assert (stopped[0, 6:] == stop).all()  # after the stop id, the row repeats it
    assert torch.equal(s1, s2)  # seeded sampling is reproducible
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    from inference import sample_next
    draws = {int(sample_next(logits, 1.0, top_k=2)) for _ in range(50)}
    assert draws <= {2, 3}
    draws = {int(sample_next(logits, 1.0, top_p=0.5)) for _ in range(50)}
    assert draws == {3}  # p(3) = 0.64 already reaches 0.5


def test_export_llava_hf_roundtrip(ref, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, new = ref
    m = weights.from_pretrained(new).eval()
    torch.nn.init.normal_(m.vm_head.weight)
    weights.export_llava_hf(m, str(tmp_path / "exp"))
    hf2 = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exp")).eval()
    ids, px = batch()
    with torch.no_grad():
        assert rel_err(hf2(input_ids=ids, pixel_values=px).logits, m(ids, px).logits) <= 1e-4
    back = weights.from_pretrained(str(tmp_path / "exp"))  # picks up vm_head.safetensors beside it
    assert torch.equal(back.vm_head.weight, m.vm_head.weight)


def tiny_cfg(**kw):
    return VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=3, heads=4, mlp=96),
                       decoder=DecoderConfig(vocab_size=100, dim=64, layers=2, heads=4, kv_heads=2, hidden=128),
                       **kw)


def test_export_with_sentinel_image_id(tmp_path):
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg()).eval()  # image_token_id is the sentinel -200, not a vocabulary row
    weights.export_llava_hf(m, str(tmp_path / "exp"))
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "exp")).eval()
    ids = torch.randint(0, 100, (1, 24))
    ids[:, 2:2 + P] = m.cfg.image_token_id
    px = torch.randn(1, 3, 32, 32)
    hf_ids = ids.masked_fill(ids == m.cfg.image_token_id, hf.config.image_token_id)
    with torch.no_grad():
        assert rel_err(hf(input_ids=hf_ids, pixel_values=px).logits[..., :100], m(ids, px).logits) <= 1e-4


def test_save_load_nanovt_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg(pseudo_image_features=True)).eval()
    m.save_pretrained(str(tmp_path))
    m2 = weights.from_pretrained(str(tmp_path)).eval()
    assert m2.cfg == m.cfg
    ids = torch.randint(0, 100, (1, 24))
    ids[:, 2:2 + P] = m.cfg.image_token_id
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(ids, px).logits, m2(ids, px).logits)
    m3 = weights.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert m3.mm_head.weight.dtype == torch.bfloat16


def _break(src, dst, fn):
    sd = load_file(os.path.join(src, "model.safetensors"))
    os.makedirs(dst)
    fn(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_broken_checkpoints_fail_clearly(ref, tmp_path):
    hf, new = ref
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    missing = _break(new, str(tmp_path / "missing"), lambda sd: sd.pop(key))
    with pytest.raises(KeyError, match=r"missing .*decoder\.blocks\.1\.mlp\.up\.weight"):
        weights.from_pretrained(missing)
    extra = _break(new, str(tmp_path / "extra"), lambda sd: sd.update({"language_model.model.bogus.weight":
                                                                        torch.zeros(3)}))
    with pytest.raises(KeyError, match=r"unexpected key 'language_model\.model\.bogus\.weight'"):
        weights.from_pretrained(extra)
    shape = _break(new, str(tmp_path / "shape"), lambda sd: sd.update({key: sd[key][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=r"shape mismatch for '" + key.replace(".", r"\.") + "'.*model.safetensors"):
        weights.from_pretrained(shape)
    trunc = _break(new, str(tmp_path / "trunc"), lambda sd: None)
    f = os.path.join(trunc, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        weights.from_pretrained(trunc)
    bad = str(tmp_path / "badjson")
    os.makedirs(bad)
    open(os.path.join(bad, "config.json"), "w").write('{"text_config": {,}')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 1"):
        weights.from_pretrained(bad)


def test_from_clip_and_llm_matches_parts(ref, tmp_path):
    """Stage I start: CLIP tower from a CLIPVisionModel dir, decoder + head from a LLaMA/Mistral dir."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    hf, _ = ref
    clip = CLIPVisionModel(hf.config.vision_config).eval()
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(str(tmp_path / "clip"))
    llm = AutoModelForCausalLM.from_config(hf.config.text_config).eval()
    llm.model.load_state_dict(hf.model.language_model.state_dict())
    llm.lm_head.load_state_dict(hf.lm_head.state_dict())
    llm.save_pretrained(str(tmp_path / "llm"))
    m = weights.from_clip_and_llm(str(tmp_path / "clip"), str(tmp_path / "llm")).eval()
    ids, px = batch()
    with torch.no_grad():
        want = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert rel_err(m.vision(px), want) <= 1e-5
        text = ids.clamp(max=199)
        assert rel_err(m(text).logits, llm(input_ids=text).logits) <= 1e-4


def test_visual_logits_and_pseudo_image_features():
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg()).eval()
    ids = torch.randint(0, 100, (2, 24))
    ids[0, 2:2 + P] = m.cfg.image_token_id
    ids[1, 5:5 + P] = m.cfg.image_token_id
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(ids, px, logits=False)
        x = m.adapter(m.vision(px)).reshape(-1, 64)  # X_image, row-major
        assert out.logits is None and out.image_mask.sum() == 2 * P
        assert torch.allclose(out.image_features, x, atol=1e-6)
        assert torch.allclose(m.vm_head(out.image_features), x @ m.vm_head.weight.T, atol=1e-6)  # Eq. 5
        # Eq. 8 from its definition, in float64
        xp = torch.softmax(x.double() @ m.vm_head.weight.double().T, -1) @ m.decoder.embed.weight.double()
        assert torch.allclose(m.pseudo_image_features(x).double(), xp, atol=1e-6)
        m.cfg.pseudo_image_features = True
        emb = m.decoder.embed(ids.clamp(min=0))
        emb[ids == m.cfg.image_token_id] = xp.float()
        want = m.mm_head(m.decoder(emb))
        assert rel_err(m(ids, px).logits, want) <= 1e-5
        # Eq. 3, by brute force over the vocabulary
        near, _ = m.nearest_tokens(px[:1])
        for j in range(P):
            sims = [F.cosine_similarity(x[j], m.decoder.embed.weight[c], dim=0) for c in range(100)]
            assert int(near[0, j]) == int(torch.stack(sims).argmax())
        top, _ = m.visual_tokens(px[:1])
        assert torch.equal(top[0, :, 0], (x[:P] @ m.vm_head.weight.T).argmax(-1))


def test_image_count_mismatch_is_an_error():
    m = VTLMM(tiny_cfg()).eval()
    ids = torch.randint(0, 100, (1, 24))
    ids[0, 2:2 + P - 1] = m.cfg.image_token_id
    with pytest.raises(ValueError, match="image placeholders"):
        m(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        m(ids)


@pytest.mark.parametrize("name,part,count", [
    ("vicuna-7b-v1.5", "decoder", 6_738_415_616),
    ("mistral-7b-v0.1", "decoder", 7_241_732_096),
    ("mistral-7b-instruct-v0.2", "decoder", 7_241_732_096),
    ("clip-vit-l14-336", "vision", 303_507_456),
])
def test_7b_parameter_counts_on_meta(name, part, count):
    preset = PRESETS[name]
    cfg = VTLMMConfig(vision=preset) if part == "vision" else VTLMMConfig(decoder=preset)
    with torch.device("meta"):
        m = VTLMM(cfg)
    n = m.num_params("vision") if part == "vision" else m.num_params("decoder") + m.mm_head.weight.numel()
    assert n == count


def test_objectives_equal_the_losses_on_full_logits():
    """losses.Objective on the model's hidden states (chunked, heads fused) gives the full-logit losses."""
    import losses
    torch.manual_seed(0)
    m = VTLMM(tiny_cfg()).train()
    ids = torch.randint(0, 100, (2, 24))
    ids[0, 1:1 + P] = m.cfg.image_token_id
    ids[1, 5:5 + P] = m.cfg.image_token_id
    labels = ids.masked_fill(ids == m.cfg.image_token_id, -100)
    labels[:, :3] = -100
    px = torch.randn(2, 3, 32, 32)
    full = m(ids, px)
    visual = m.vm_head(full.image_features)
    _, lm, vm = losses.mm_loss(full.logits, labels, visual, full.image_mask)
    loss, out_lm, out_vm = losses.Objective(m, "mm", chunk_size=5)(ids, px, labels)
    assert torch.allclose(out_lm, lm, rtol=1e-5) and torch.allclose(out_vm, vm, rtol=1e-5)
    assert torch.allclose(loss, lm + vm, rtol=1e-5)  # Eq. 7
    fit = losses.vm_fit_loss(full.logits, visual, full.image_mask)
    loss3, lm3, _ = losses.Objective(m, "vm_fit")(ids, px, labels)
    assert torch.allclose(loss3, fit, rtol=1e-5) and lm3 == 0
    loss3.backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"vm_head.weight"}  # Eq. 9 reaches the VM head only
    lm_only, lm4, vm4 = losses.Objective(m, "lm")(ids, px, labels)  # stage IV with the VM term off
    assert torch.allclose(lm_only, lm, rtol=1e-5) and torch.allclose(lm4, lm, rtol=1e-5) and vm4 == 0
    with pytest.raises(ValueError, match="unknown objective"):
        losses.Objective(m, "mm_lm")


def test_bin_weights_load_without_unpickling(ref, tmp_path):
    """Older .bin checkpoints: read through torch.load(weights_only=True), never a full unpickle."""
    hf, new = ref
    d = tmp_path / "bin"
    os.makedirs(d)
    torch.save(load_file(os.path.join(new, "model.safetensors")), str(d / "pytorch_model.bin"))
    (d / "config.json").write_text(open(os.path.join(new, "config.json")).read())
    ids, px = batch()
    with torch.no_grad():
        assert rel_err(weights.from_pretrained(str(d))(ids, px).logits, hf(input_ids=ids, pixel_values=px).logits) <= 1e-4


def _sdpa_dtypes(monkeypatch):
    """Record the dtypes every F.scaled_dot_product_attention call in model.py receives."""
    import model as model_lib
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)
    monkeypatch.setattr(model_lib.F, "scaled_dot_product_attention", spy)
    return seen


def test_bf16_training_on_the_cpu_attends_in_float32(monkeypatch):
    """model.attend: under CPU bf16 autocast with gradients on, every attention of the decoder and the
    vision tower runs in float32 (PyTorch's CPU flash-attention backward is slower in bf16), and its
    result equals float32 attention rounded to bf16; without gradients (inference) it stays in bf16.
    Under autocast q and k arrive in float32 and v in bf16, so a check of q's dtype alone would miss it."""
    import model as model_lib
    seen = _sdpa_dtypes(monkeypatch)
    torch.manual_seed(0)
    m = VTLMM(VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp=64),
                          decoder=DecoderConfig(dim=64, layers=2, heads=4, kv_heads=2, hidden=128,
                                                max_seq_len=64, vocab_size=100)))
    ids, px = torch.randint(0, 100, (2, 20)), torch.randn(2, 3, 32, 32)
    m(ids)
    m.vision(px)
    calls = len(seen)  # one per decoder block and per vision block the features come through
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(ids).logits.float().sum().backward()
        m.vision(px).float().sum().backward()
    assert len(seen) == calls >= 3 and all(d == (torch.float32,) * 3 for d in seen), seen
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        m(ids)
    assert seen and all(torch.bfloat16 in d for d in seen), seen  # inference: SDPA left to autocast
    q, k = torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 16)
    v = torch.randn(2, 4, 20, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_lib.attend(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v.float(), is_causal=True).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    y32 = model_lib.attend(q, k, v.float(), is_causal=True)  # float32 training: untouched
    assert torch.equal(y32, F.scaled_dot_product_attention(q, k, v.float(), is_causal=True))
