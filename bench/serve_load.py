"""
A bounded load test of serve.py on loopback: the answers to N distinct (image, question) pairs, first one
request at a time, then from many clients at once; every concurrent answer must equal its sequential one.

    python bench/serve_load.py --ckpt out/shapes/stage4/final      # starts serve.py on a free port, stops it
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 32 --requests 4

Each client sends its requests one after another (greedy, half of them streamed); the run stops by itself
after clients x requests answers. It prints the latency (p50 / p95, and the first streamed token's) and the
new tokens per second of both phases, and exits with status 1 on any error or any answer that differs.
Only the standard library: it is a client we did not write into the server.
"""

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ("How many shapes are in the image?", "What color is the background?")


def ask(url, image, question, max_tokens, stream):
    """One chat request: (answer, completion tokens, seconds, seconds to the first streamed piece or None)."""
    u = urlsplit(url)
    body = json.dumps({"model": "any", "temperature": 0, "max_tokens": max_tokens, "stream": stream,
                       "stream_options": {"include_usage": True} if stream else None,
                       "messages": [{"role": "user", "content": [
                           {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]}]})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        if not stream:
            j = json.loads(r.read())
            return (j["choices"][0]["message"]["content"], j["usage"]["completion_tokens"], time.perf_counter() - t0,
                    None)
        answer, n, first = "", None, None
        for line in r:  # server-sent events, one "data: ..." line each
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            j = json.loads(line[6:])
            if "error" in j:
                raise RuntimeError(j["error"]["message"])
            if j.get("usage"):
                n = j["usage"]["completion_tokens"]
            for c in j["choices"]:
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    answer += c["delta"]["content"]
        return answer, n, time.perf_counter() - t0, first
    finally:
        conn.close()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def start_server(ckpt, extra=()):
    """serve.py on a free port; returns (process, url)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", "0", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = p.stdout.readline()
    if " on http://" not in line:
        p.kill()
        sys.exit(f"serve.py did not start: {line.strip() or 'no output'}")
    threading.Thread(target=p.stdout.read, daemon=True).start()  # drain
    return p, line.split(" on ")[-1].strip()


def run(url, images, clients, requests, max_tokens, names=None):
    pairs = [(k, q) for k in range(len(images)) for q in QUESTIONS]
    t0 = time.perf_counter()
    ref = {(k, q): ask(url, images[k], q, max_tokens, stream=False) for k, q in pairs}  # sequential: one at a time
    seq_s = time.perf_counter() - t0
    seq_tokens = sum(r[1] for r in ref.values())

    def client(i):
        out = []
        for j in range(requests):
            pair = pairs[(i * requests + j) % len(pairs)]
            try:
                out.append((pair, *ask(url, images[pair[0]], pair[1], max_tokens, stream=(i + j) % 2 == 0), None))
            except Exception as e:  # counted, never raised: every client finishes its requests
                out.append((pair, None, 0, 0.0, None, f"{type(e).__name__}: {e}"))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    errors = [r[5] for r in results if r[5]]
    differ = [r for r in results if not r[5] and r[1] != ref[r[0]][0]]
    lat = [r[3] for r in results if not r[5]]
    first = [r[4] for r in results if r[4] is not None]
    tokens = sum(r[2] or 0 for r in results if not r[5])
    summary = dict(requests=len(results), errors=len(errors), differ=len(differ), seq_s=seq_s,
                   seq_tokens_per_s=seq_tokens / seq_s, seq_latency_p50=statistics.median(r[2] for r in ref.values()),
                   wall_s=wall, tokens_per_s=tokens / wall, latency_p50=pct(lat, 50), latency_p95=pct(lat, 95),
                   first_token_p50=pct(first, 50), first_token_p95=pct(first, 95))
    print(f"sequential: {len(pairs)} requests in {seq_s:.2f} s, {summary['seq_tokens_per_s']:.1f} new tokens/s, "
          f"latency p50 {summary['seq_latency_p50']:.3f} s")
    print(f"{clients} clients x {requests} requests: {len(results)} in {wall:.2f} s, {summary['tokens_per_s']:.1f} "
          f"new tokens/s; latency p50 {summary['latency_p50']:.3f} s, p95 {summary['latency_p95']:.3f} s; first "
          f"streamed piece p50 {summary['first_token_p50']:.3f} s, p95 {summary['first_token_p95']:.3f} s")
    print(f"errors: {len(errors)}; answers that differ from the sequential ones: {len(differ)}")
    for e in errors[:5]:
        print("  error:", e)
    for r in differ[:5]:
        print(f"  differs: {(names or images)[r[0][0]][:40]} {r[0][1]!r}: {r[1]!r} vs {ref[r[0]][0]!r}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start serve.py --ckpt CKPT)")
    p.add_argument("--ckpt", default=os.path.join("out", "shapes", "stage4", "final"))
    p.add_argument("--images", default=os.path.join("data", "shapes", "images"), help="a folder of PNG images")
    p.add_argument("--n-images", type=int, default=8, help="the folder's last N images (x 2 questions)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args(argv)
    names = sorted(f for f in os.listdir(a.images) if f.endswith(".png"))[-a.n_images:]
    images = ["data:image/png;base64," + base64.b64encode(open(os.path.join(a.images, f), "rb").read()).decode()
              for f in names]
    server, url = start_server(a.ckpt) if a.url is None else (None, a.url)
    try:
        summary = run(url, images, a.clients, a.requests, a.max_tokens, names)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    if summary["errors"] or summary["differ"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
