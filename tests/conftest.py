import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)
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
