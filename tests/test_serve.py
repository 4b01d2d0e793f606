"""serve.py with clients we did not write: the official openai package, raw HTTP for hostile input, a client
that hangs up mid-answer, the load test's many clients, and headless chromium on the page. The server runs
on loopback from a tiny random checkpoint, started as `python serve.py` (the in-process one for the
hang-up test has its decoding slowed down, so there is an answer to walk away from)."""

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
import uvicorn
from PIL import Image
from tiny_ckpt import make_checkpoint

import data
import inference
import sample
import serve
from conversation import IMAGE_TAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "What shape is in the center?"


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    """The tiny random checkpoint with its VM head scaled up, so that patches differ in their visual tokens."""
    path = make_checkpoint(str(world), tmp_path_factory.mktemp("ckpt") / "tiny")
    model, _ = sample.load(path)
    with torch.no_grad():
        model.vm_head.weight.mul_(300)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image(world):
    return os.path.join(str(world), "images", "000003.png")


def data_url(raw, kind="image/png"):
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`python serve.py` on a free port, with small limits (1 MiB bodies, 1 megapixel images); (url, log path)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", "0",
                              "--device", "cpu", "--max-body-mb", "1", "--max-pixels", "1000000"], cwd=ROOT,
                             stdout=f, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            text = log.read_text()
            if " on http://" in text and "startup complete" in text:
                break
            assert p.poll() is None, text
            time.sleep(0.1)
        yield text.split(" on ")[1].split()[0], log
    finally:
        p.terminate()
        p.wait(30)


@pytest.fixture(scope="module")
def local(ckpt):
    return sample.load(ckpt)


def request(url, method, path, body=None, headers=None):
    """(status, parsed JSON) of one request over a fresh connection; `body` is bytes or a JSON-able object."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, raw, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def chat_body(content, **kw):
    return {"model": "nanovt", "messages": [{"role": "user", "content": content}], **kw}


def with_image(text, image):
    """A user message's content: the text, then the image file as a data: URL."""
    url = data_url(open(image, "rb").read())
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_greedy_answer_equals_sample_py(server, ckpt, local, image, capsys):
    url, _ = server
    model, tok = local
    px = sample.pixels(model, data.load_image(image))
    answer, ids = sample.reply(model, tok, px, Q, write=lambda s: None, max_new_tokens=20)
    assert sample.main(["--ckpt", ckpt, "--image", image, "--prompt", Q, "--max-new-tokens", "20",
                        "--device", "cpu"]) == answer
    msgs = [{"role": "user", "content": with_image(Q, image)}]
    c = client(url)
    r = c.chat.completions.create(model="nanovt", messages=msgs, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == tok.decode(ids) and r.choices[0].message.content.strip() == answer
    assert r.usage.completion_tokens == len(ids) and len(ids) > 0
    assert r.usage.prompt_tokens == len(inference.prompt_ids(model, tok, Q, True))
    assert r.choices[0].finish_reason == ("length" if len(ids) == 20 else "stop")
    chunks = list(c.chat.completions.create(model="nanovt", messages=msgs, temperature=0, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(pieces) == r.choices[0].message.content and sum(1 for s in pieces if s) > 1  # streamed, in pieces
    assert chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    # a second turn: the image stays with the first question, as in sample.py's chat
    history = [{"from": "human", "value": IMAGE_TAG + "\n" + Q}, {"from": "gpt", "value": answer}]
    second, _ = sample.reply(model, tok, px, "And its color?", history, write=lambda s: None, max_new_tokens=12)
    r2 = c.chat.completions.create(model="nanovt", temperature=0, max_completion_tokens=12, messages=msgs + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "And its color?"}])
    assert r2.choices[0].message.content.strip() == second
    assert [m.id for m in c.models.list().data] == ["nanovt"]
    with pytest.raises(openai.BadRequestError, match="role must be system, user or assistant"):
        c.chat.completions.create(model="nanovt", messages=[{"role": "robot", "content": "hi"}])


def test_sampling_seed_and_stop(server, image):
    url, _ = server
    c = client(url)
    msgs = [{"role": "user", "content": with_image("Describe the image.", image)}]
    kw = dict(model="nanovt", messages=msgs, max_tokens=16, temperature=1.0, top_p=0.9)
    a, b, d = (c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 1, 2))
    assert a == b and a != d
    greedy = c.chat.completions.create(model="nanovt", messages=msgs, max_tokens=30, temperature=0)
    text = greedy.choices[0].message.content
    assert len(text) >= 6, text
    stop = text[3:6]  # a string the greedy answer reaches: the answer ends just before it
    cut = c.chat.completions.create(model="nanovt", messages=msgs, max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="nanovt", messages=msgs, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == text[:text.index(stop)]


def png(size, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_is_refused_with_a_reason_and_the_server_goes_on(server, image):
    url, log = server
    raw = open(image, "rb").read()
    good = data_url(raw)
    trap = socket.create_server(("127.0.0.1", 0))  # an http URL pointing here must never be fetched
    trap.settimeout(0.5)

    def img(u):
        return chat_body([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": u}}])

    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be system, user or assistant"),
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "a system or user message must come"),
        (chat_body([{"type": "input_audio", "input_audio": {"data": "AAAA"}}]), 400, "part of type 'input_audio'"),
        (img("data:text/plain;base64,aGVsbG8="), 400, "must be a base64 image"),
        (img("data:image/png;base64,%%%"), 400, "not valid base64"),
        (img(data_url(b"hello, not a picture")), 400, "not an image"),
        (img(data_url(raw[:len(raw) // 2])), 400, "cannot read image bytes"),  # truncated
        (img(data_url(png((2000, 2000)))), 400, "decompression bomb"),  # 4 megapixels, a few kB of PNG
        (img(data_url(png((1, 1500)))), 400, "pads to a 1500x1500 square"),
        (img(f"http://127.0.0.1:{trap.getsockname()[1]}/cat.png"), 400, "an http URL: the server fetches no URL"),
        (img("https://example.com/cat.png"), 400, "an https URL"),
        (img("/etc/passwd"), 400, "not a data: URL"),
        (img("file:///etc/passwd"), 400, "not a data: URL"),
        (chat_body(f"{IMAGE_TAG} hi"), 400, "send the image as an image_url part"),
        (chat_body("word " * 400), 400, "over the model's context length of 256 tokens"),
        (chat_body("hi", temperature=5), 400, "temperature must be a number from 0 to 2"),
        (chat_body("hi", n=3), 400, "n must be"),
        ({"messages": [{"role": "user", "content": with_image("hi", image)}, {"role": "assistant", "content": "ok"},
                       {"role": "user", "content": with_image("and?", image)}]}, 400, "one image per conversation"),
        (chat_body("hi", pad="x" * (1 << 20)), 413, "over the limit of 1048576 bytes"),
    ]
    for body, status, words in cases:
        got, j = request(url, "POST", "/v1/chat/completions", body)
        assert (got, j["error"]["type"]) == (status, "invalid_request_error") and words in j["error"]["message"], \
            (words, got, j)
    with pytest.raises(socket.timeout):
        trap.accept()  # nothing connected
    # a declared length over the limit is refused before the body is read
    assert request(url, "POST", "/v1/chat/completions", b"{}", {"Content-Length": str(5 << 20)})[0] == 413
    got, j = request(url, "POST", "/v1/visual_tokens", {"image": data_url(png((1500, 1)))})
    assert got == 400 and "decompression bomb" in j["error"]["message"]
    assert request(url, "GET", "/nowhere")[0] == 404 and request(url, "GET", "/v1/chat/completions")[0] == 405
    got, j = request(url, "POST", "/v1/chat/completions", img(good) | {"temperature": 0, "max_tokens": 4})
    assert got == 200 and j["usage"]["completion_tokens"] > 0  # still serving
    text = log.read_text()
    assert "refused (400)" in text and base64.b64encode(raw)[16:64].decode() not in text  # no image bytes logged


@contextlib.contextmanager
def in_process(service):
    """serve.make_app(service) under uvicorn on a thread of this process; yields its URL."""
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(serve.make_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_that_hangs_up_mid_stream_frees_the_model(local, image, monkeypatch):
    def endless(model, tok, ids, pixel_values, out, *settings):  # 50 tokens a second, for ever
        while True:
            time.sleep(0.02)
            out.append(0)
            yield "x"
    monkeypatch.setattr(serve, "answer_pieces", endless)
    service = serve.Service(*local, "tiny")
    with in_process(service) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat_body("hi", stream=True)).encode()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b'"content": "x"') < 3:  # three tokens streamed
            got += s.recv(65536)
        job = service.worker.running
        assert job is not None
        waiting = {}  # a second client, queued behind the endless answer
        behind = threading.Thread(target=lambda: waiting.update(r=request(
            url, "POST", "/v1/visual_tokens", {"image": data_url(open(image, "rb").read())})))
        behind.start()
        time.sleep(0.5)
        assert "r" not in waiting and service.worker.running is job
        t0 = time.perf_counter()
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        behind.join(10)
        assert waiting["r"][0] == 200 and time.perf_counter() - t0 < 2.0
        n = job["items"]
        time.sleep(0.3)
        assert job["items"] == n and job["gone"]  # the answer stopped, and the model went to the next client


def test_visual_tokens_are_the_models(server, local, image):
    url, _ = server
    model, tok = local
    got, j = request(url, "POST", "/v1/visual_tokens", {"image": data_url(open(image, "rb").read()), "top_k": 3,
                                                        "word": "red"})
    assert got == 200
    px = sample.pixels(model, data.load_image(image))
    ids, probs = model.visual_tokens(px, 3)
    nids, cos = model.nearest_tokens(px)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    assert j["grid"] == g and len(j["patches"]) == g * g
    for p, ti, tp, n, c in zip(j["patches"], ids[0].tolist(), probs[0].tolist(), nids[0].tolist(), cos[0].tolist()):
        assert [t["id"] for t in p["top"]] == ti
        assert [t["token"] for t in p["top"]] == [sample.label(tok, i) for i in ti]
        assert [t["prob"] for t in p["top"]] == pytest.approx(tp, abs=1e-6)
        assert p["nearest"]["id"] == n and p["nearest"]["cosine"] == pytest.approx(c, abs=1e-6)
    assert len({tuple(t["id"] for t in p["top"]) for p in j["patches"]}) > 1  # the patches differ
    red = [i for i in range(tok.vocab_size) if sample.label(tok, i).lower() == "red"]
    assert j["word"]["ids"] == red and red
    full = torch.softmax(model.vm_head(model.image_features(px)).float(), -1)[0][:, red].sum(-1)  # Eq. 5
    assert j["word"]["probs"] == pytest.approx(full.tolist(), abs=1e-6)


def test_load_test_answers_equal_sequential_ones(server, world):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import serve_load
    summary = serve_load.main(["--url", server[0], "--images", os.path.join(str(world), "images"), "--n-images", "3",
                               "--clients", "6", "--requests", "2", "--max-tokens", "8"])
    assert summary["requests"] == 12 and summary["errors"] == 0 and summary["differ"] == 0


def test_cli_without_a_model_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no model at"):
        serve.main(["--ckpt", str(tmp_path / "nothing")])


def test_the_page_in_chromium(server, image, tmp_path):
    import serve_page
    if isinstance(serve_page.find_chromium(), str):
        pytest.skip(serve_page.find_chromium())
    url, _ = server
    raw = open(image, "rb").read()
    question = "What color is the shape?"
    _, ref = request(url, "POST", "/v1/chat/completions", chat_body(with_image(question, image), temperature=0))
    _, vt = request(url, "POST", "/v1/visual_tokens", {"image": data_url(raw), "top_k": 5})
    g = vt["grid"]
    tops = [tuple(t["token"] for t in p["top"]) for p in vt["patches"]]
    k = next(i for i in range(g * g) if tops.count(tops[i]) == 1)  # a patch whose words no other patch has
    d = serve_page.open_browser(1200, 820)
    try:
        serve_page.load(d, url, image)
        assert serve_page.ask(d, question) == ref["choices"][0]["message"]["content"]
        words, nearest = serve_page.hover(d, g, k // g, k % g)
        assert tuple(words) == tops[k] and nearest == vt["patches"][k]["nearest"]["token"]
        word = tops[k][0]
        _, lit = request(url, "POST", "/v1/visual_tokens", {"image": data_url(raw), "word": word})
        at = max(range(g * g), key=lambda i: lit["word"]["probs"][i])
        where = f'"{word}": most probable at row {at // g + 1}, column {at % g + 1}'
        assert serve_page.light(d, word).startswith(where)
        d.save_screenshot(str(tmp_path / "desktop.png"))
        d.find_element("id", "grid").send_keys("\ue014")  # the keyboard: ArrowRight from the patch in focus
        assert "Patch row" in d.find_element("id", "where").text
        d.set_window_size(390, 844)  # a phone's width: nothing sticks out sideways
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        d.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        d.quit()
    assert os.path.getsize(tmp_path / "desktop.png") > 10000 and os.path.getsize(tmp_path / "phone.png") > 10000


def test_nothing_but_serve_py_imports_the_web_stack():
    code = ("import sys, checkpoint, data, eval, inference, model, sample, train, weights; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'fastapi')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
