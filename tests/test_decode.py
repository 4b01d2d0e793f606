"""The static KV cache's decode step, eager and compiled, against transformers' greedy tokens (the
reference) and against the growing-cache path: batch 1 with an image, a left-padded batch of prompts
of different lengths, and Mistral's sliding window (7 keys, shorter than every sequence here).

On the CPU; with NANOVT_TEST_DEVICE=cuda (bench/gpu.sh) on that device, compiled with CUDA graphs.
The compiled cases need a C++ compiler (CPU) or Triton (CUDA) and are skipped without one."""

import os
import shutil

import pytest
import torch

import inference
from hf_tiny import IMAGE_TOKEN, save_new_layout, tiny_llava
from model import VTLMM
import weights

P = 16  # patches of a 32 px image at patch 8
NEW = 20
DEV = torch.device(os.environ.get("NANOVT_TEST_DEVICE", "cpu"))
if DEV.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def can_compile():
    if DEV.type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton()
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


MODES = ["static", pytest.param("compiled", marks=[
    pytest.mark.slow, pytest.mark.skipif(not can_compile(), reason="torch.compile needs a C++ compiler / Triton")])]


def prompt(seed, T, at, vocab=200):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, T), generator=g)
    ids[:, at:at + P] = IMAGE_TOKEN
    return ids.to(DEV), torch.randn(1, 3, 32, 32, generator=g).to(DEV)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pair(request, tmp_path_factory):
    """(transformers model on DEV, nanoVT model loaded from its files on DEV)."""
    hf = tiny_llava(request.param, sliding_window=7 if request.param == "mistral" else None)
    path = save_new_layout(hf, str(tmp_path_factory.mktemp(request.param)))
    return hf.to(DEV), weights.from_pretrained(path, device=DEV).eval()


def hf_greedy(hf, ids, px):
    with torch.no_grad():
        return hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]


def generate(m, mode, ids, px, **kw):
    out = inference.generate(m, ids, px, max_new_tokens=NEW, static=mode != "dynamic", compile=mode == "compiled", **kw)
    return out[:, ids.shape[1]:]


def compiled_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", MODES)
def test_batch_1_with_image_equals_transformers(pair, mode):
    hf, m = pair
    ids, px = prompt(1, 24, 3)
    want = hf_greedy(hf, ids, px)
    before = compiled_graphs()
    got = generate(m, mode, ids, px)
    assert torch.equal(got, want)
    assert torch.equal(got, generate(m, "dynamic", ids, px))
    if mode == "compiled":
        assert compiled_graphs() > before  # the step really went through torch.compile
        assert torch.equal(generate(m, mode, ids, px), want)  # again, on the kept cache and graph


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_equals_each_row_alone(pair, mode):
    hf, m = pair
    (a, pa), (b, pb) = prompt(1, 30, 3), prompt(2, 21, 2)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long, device=DEV), b], 1)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :pad] = False
    got = generate(m, mode, ids, torch.cat([pa, pb]), attention_mask=mask)
    assert torch.equal(got[0], hf_greedy(hf, a, pa)[0])  # each row as transformers decodes it alone
    assert torch.equal(got[1], hf_greedy(hf, b, pb)[0])
    assert torch.equal(got, generate(m, "dynamic", ids, torch.cat([pa, pb]), attention_mask=mask))


def test_sliding_window_binds_in_the_decode_steps(tmp_path):
    """The window (7) is shorter than the prompt, so it changes the decode steps' attention; the static
    step follows transformers (above) and differs from the same weights without a window."""
    hf = tiny_llava("mistral", sliding_window=7)
    m = weights.from_pretrained(save_new_layout(hf, str(tmp_path)), device=DEV).eval()
    ids, px = prompt(1, 24, 3)
    with torch.no_grad():
        cache = inference.new_cache(m, 1, 24 + 4)
        m(ids, px, cache=cache, logits=False)
        tok = torch.tensor([5], device=DEV)
        windowed = inference.decode_step(m, tok, cache)
        m.decoder.cfg.sliding_window = None
        cache.index.fill_(24)
        cache.pos.fill_(24)
        cache.valid[:, 24:] = False
        unbound = inference.decode_step(m, tok, cache)
    assert (windowed - unbound).abs().max() > 1e-3


def test_static_cache_is_reused_only_when_compiled():
    torch.manual_seed(0)
    from model import DecoderConfig, VisionConfig, VTLMMConfig
    m = VTLMM(VTLMMConfig(vision=VisionConfig(image_size=32, patch_size=8, width=48, layers=1, heads=4, mlp=96),
                          decoder=DecoderConfig(vocab_size=100, dim=64, layers=1, heads=4, kv_heads=2, hidden=128)))
    a = inference.static_cache(m, 2, 50, compiled=True)
    a.valid.fill_(True)
    a.index.fill_(9)
    b = inference.static_cache(m, 2, 100, compiled=True)  # the same 128-slot shape: the same buffers, emptied
    assert b is a and b.max_len == 128 and not b.valid.any() and int(b.index) == 0
    assert inference.static_cache(m, 2, 129, compiled=True).max_len == 256
    assert inference.static_cache(m, 2, 50, compiled=False).max_len == 50
