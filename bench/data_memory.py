"""Memory of LLaVA JSON samples kept by LlavaDataset: data.SampleIndex (one compact JSON buffer +
offsets) against the parsed list of dicts. Synthetic mix665k-like samples (3 rounds, ~110 words).

    python bench/data_memory.py [--samples 100000]
"""

import argparse
import gc
import json
import os
import random
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    n = ap.parse_args(argv).samples
    rng = random.Random(0)
    words = "the a red circle image shows how many people are there what color is it on left right".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    raw = json.dumps([{"id": f"{k:012d}", "image": f"coco/train2017/{k:012d}.jpg", "conversations": [
        turn for _ in range(3) for turn in ({"from": "human", "value": text(12)}, {"from": "gpt", "value": text(25)})]}
        for k in range(n)]).encode()
    gc.collect()
    tracemalloc.start()
    parsed = json.loads(raw)
    gc.collect()
    as_dicts = tracemalloc.get_traced_memory()[0]
    index = data.SampleIndex(parsed)
    del parsed
    gc.collect()
    compact = tracemalloc.get_traced_memory()[0]
    assert len(index) == n
    print(f"{n} samples, file {len(raw) / 2**20:.1f} MiB: list of dicts {as_dicts / 2**20:.1f} MiB, "
          f"SampleIndex {compact / 2**20:.1f} MiB ({as_dicts / compact:.1f}x less)")


if __name__ == "__main__":
    main()
