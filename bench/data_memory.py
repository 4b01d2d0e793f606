"""Memory of LLaVA JSON samples kept by LlavaDataset: data.SampleIndex (one compact JSON buffer +
offsets) against the parsed list of dicts. Synthetic mix665k-like samples (3 rounds, ~110 words).
With --cache: per process, the time and peak memory of building LlavaDataset by parsing the JSON
(what every rank did), by parsing and writing the read cache (a node's first rank), and from the
cache (the node's other ranks: data.ReadCache, memory-mapped), each in a fresh process.

    python bench/data_memory.py [--samples 100000] [--cache]
"""

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def samples(n):
    rng = random.Random(0)
    words = "the a red circle image shows how many people are there what color is it on left right".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [{"id": f"{k:012d}", "image": f"coco/train2017/{k:012d}.jpg", "conversations": [
        turn for _ in range(3) for turn in ({"from": "human", "value": text(12)}, {"from": "gpt", "value": text(25)})]}
        for k in range(n)]


def memory_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(mode, folder):
    """One process building the dataset: prints seconds and peak resident memory above the start."""
    json_path, cache = os.path.join(folder, "d.json"), os.path.join(folder, "cache")
    base = memory_kib("VmRSS")
    t = time.perf_counter()
    ds = data.LlavaDataset(json_path, None, None, "vicuna_v1", 336, 576, cache_dir=None if mode == "parse" else cache,
                           write_cache=mode == "write")
    seconds = time.perf_counter() - t
    assert len(ds) and ds.from_cache == (mode != "parse") and not ds.skipped
    print(json.dumps({"seconds": seconds, "peak_mib": (memory_kib("VmHWM") - base) / 1024,
                      "anon_mib_after": memory_kib("RssAnon") / 1024}))


def cache_bench(n):
    with tempfile.TemporaryDirectory() as folder:
        rows = samples(n)
        for r in rows:  # the images exist (empty files): the read-time scan finds them all
            os.makedirs(os.path.join(folder, os.path.dirname(r["image"])), exist_ok=True)
            open(os.path.join(folder, r["image"]), "wb").close()
        with open(os.path.join(folder, "d.json"), "w") as f:
            json.dump(rows, f)
        size = os.path.getsize(os.path.join(folder, "d.json"))
        del rows
        print(f"{n} samples, file {size / 2**20:.1f} MiB; per process (fresh each):")
        for mode, what in (("parse", "parse (every rank before)"), ("write", "parse + write cache (local rank 0)"),
                           ("map", "from the cache (other ranks)")):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, folder],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"  {what:36s} {r['seconds']:7.2f} s, peak +{r['peak_mib']:7.1f} MiB, "
                  f"anonymous resident after {r['anon_mib_after']:6.1f} MiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--cache", action="store_true", help="per-process cost: parsing against the read cache")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    if args.cache:
        return cache_bench(args.samples)
    n = args.samples
    raw = json.dumps(samples(n)).encode()
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
