"""
Serve a nanoVT model to a browser and to any OpenAI client, from one process.

    pip install -r requirements-serve.txt
    python serve.py --ckpt out/shapes/stage4/final      # then open http://127.0.0.1:8000

  POST /v1/chat/completions   OpenAI's chat completions: text and image_url parts (data: URLs), stream
                              (server-sent events ending with [DONE]), max_tokens / max_completion_tokens,
                              temperature, top_p, stop, seed, usage; the image in the first user message
  GET  /v1/models             the one model served
  POST /v1/visual_tokens      {"image": data URL, "top_k": 5, "word": "red"}: each patch's top-k visual
                              tokens softmax(W_VM x) (Eq. 5) and its Eq. 3 nearest token; with "word", the
                              probability each patch's visual token gives the tokens that read that word
  GET  /                      serve.html: chat about an image and explore its visual tokens patch by patch

The model is loaded once (sample.load: bf16 on a GPU, float32 on a CPU) and lives on one thread of its
own. Requests queue for it and run one at a time, first come first served; a streamed answer whose client
has gone is dropped at its next token. Bad input gets a 4xx with OpenAI's error object and the server goes
on. The server fetches no URL and reads no path that a request names: an image comes inline, base64, and
passes data.open_image's gate (special files, pixel limits, truncation). Image bytes are never logged.
Starlette and uvicorn are imported here only; nothing else in nanoVT imports them.
"""

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections import defaultdict

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

import inference
import sample
from conversation import IMAGE_TAG
from errors import InputError

log = logging.getLogger("serve")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
ROLES = {"system": "system", "user": "human", "assistant": "gpt"}  # OpenAI's roles -> LLaVA's "from"
DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),")


class Refused(InputError):
    """A request refused: its HTTP status and the field at fault go into OpenAI's error object."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.param, self.status = param, status


def short(value, n=30):
    """A request's value quoted in an error message, cut short (it may be anything, of any size)."""
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def answer_pieces(model, tok, ids, pixel_values, out, max_tokens, temperature, top_p, seed):
    """The server's one call into decoding: the answer's text piece by piece, its ids appended to `out`
    (sample.stream: greedy at temperature 0, else nucleus sampling seeded by `seed`)."""
    return sample.stream(model, tok, ids, pixel_values, out, max_new_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)


# ----------------------------------------------------------------------------------------------
# the model's thread: one job at a time, in arrival order


class ModelThread:
    """Runs jobs (generators) on one thread, one after another; each item a job yields goes to the request
    that submitted it. A request that goes away marks its job gone, and the thread closes the job at its
    next item: the model is free for the next request after at most one more token."""

    def __init__(self):
        self.jobs, self.running = queue.SimpleQueue(), None
        threading.Thread(target=self.loop, name="model", daemon=True).start()

    def loop(self):
        while True:
            job = self.jobs.get()
            if job["gone"]:
                continue
            self.running = job
            try:
                with torch.no_grad():
                    for item in job["gen"]:
                        job["items"] += 1
                        job["put"](("item", item))
                        if job["gone"]:
                            break
                job["put"](("end", None))
            except Exception as e:  # a programming error: its request answers 500 and logs it
                job["put"](("error", e))
            finally:
                job["gen"].close()
                self.running = None

    async def run(self, gen):
        """Queue `gen` for the model and yield its items as they come."""
        loop, out = asyncio.get_running_loop(), asyncio.Queue()

        def put(msg):
            try:
                loop.call_soon_threadsafe(out.put_nowait, msg)
            except RuntimeError:  # the event loop has closed: nobody waits any more
                pass

        job = {"gen": gen, "put": put, "gone": False, "items": 0}
        self.jobs.put(job)
        try:
            while True:
                kind, item = await out.get()
                if kind == "error":
                    raise item
                if kind == "end":
                    return
                yield item
        finally:  # finished, failed, or cancelled because the client went away
            job["gone"] = True

    async def call(self, fn, *args):
        """fn(*args) on the model's thread, in the queue like any request."""
        def one():
            yield fn(*args)
        return [r async for r in self.run(one())][0]


# ----------------------------------------------------------------------------------------------
# reading a request


async def read_json(request, limit):
    """The body as JSON, refused with 413 past `limit` bytes (before reading it when the length is declared)."""
    declared = request.headers.get("content-length", "")
    too_big = f"the request body is over the limit of {limit} bytes (--max-body-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise Refused(too_big, status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(too_big, status=413)
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # the messages say where, never what
        raise Refused(f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Refused("the body must be a JSON object")
    return obj


def image_bytes(url, where):
    """The bytes of an image sent as a data: URL (base64). Anything else is refused, unread and unfetched."""
    m = DATA_URL.match(url[:256]) if isinstance(url, str) else None
    if m is None:
        scheme = url.split(":", 1)[0].lower() if isinstance(url, str) and ":" in url[:12] else ""
        kind = f"an {scheme} URL" if scheme in ("http", "https") else "not a data: URL"
        raise Refused(f"{where} is {kind}: the server fetches no URL and reads no file; send the image inline, "
                      f"as a data:image/png;base64,... URL (PNG, JPEG or WebP)", where)
    if not m.group(1).lower().startswith("image/") or ";base64" not in m.group(2).lower():
        raise Refused(f"{where} must be a base64 image (data:image/png;base64,...), not a data: URL of type "
                      f"{short(m.group(1) + m.group(2))}", where)
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise Refused(f"{where} is not valid base64", where) from None


def conversation(messages):
    """OpenAI's messages -> (LLaVA turns before the last, the last user text, the image's bytes or None).
    One image at most, in the first user message, as sample.py's chat has it."""
    if not isinstance(messages, list) or not messages:
        raise Refused("messages must be a non-empty list", "messages")
    turns, image = [], None
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise Refused(f"{where}.role must be system, user or assistant, not {short(role)}", f"{where}.role")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise Refused(f"{where}.content must be a string or a list of parts", f"{where}.content")
        texts = []
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and role == "user":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if image is not None or any(t["from"] == "human" for t in turns):
                    raise Refused(f"{at}: one image per conversation, in the first user message", at)
                image = image_bytes(url, f"{at}.image_url")
            else:
                raise Refused(f"{at} is a part of type {short(kind)}: parts are text, or image_url in a user "
                              f"message", at)
        text = "\n".join(texts)
        if IMAGE_TAG in text:
            raise Refused(f"{where} contains {IMAGE_TAG}: send the image as an image_url part", where)
        expected = ("system", "user") if k == 0 else ("user",) if turns[-1]["from"] != "human" else ("assistant",)
        if role not in expected:
            raise Refused(f"{where} is a {role} message where a {' or '.join(expected)} message must come "
                          f"(a system message first, then user and assistant in turn, ending with user)", where)
        turns.append({"from": ROLES[role], "value": text})
    if turns[-1]["from"] != "human":
        raise Refused("the last message must be the user's", "messages")
    humans = [t for t in turns if t["from"] == "human"]
    if image is not None and len(humans) > 1:  # tag the first question; a lone one is tagged by prompt_text
        humans[0]["value"] = IMAGE_TAG + "\n" + humans[0]["value"]
    return turns[:-1], turns[-1]["value"], image


def number(body, key, lo, hi, default=None, integer=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        raise Refused(f"{key} must be {'an integer' if integer else 'a number'} from {lo} to {hi}, not {short(v)}",
                      key)
    return v


def sampling(body, default_max):
    """The decoding settings of a chat request, checked."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise Refused("stop must be a string or a list of at most 4 non-empty strings", "stop")
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise Refused("n must be 1", "n")
    if not isinstance(body.get("stream", False), bool):
        raise Refused("stream must be true or false", "stream")
    return dict(max_tokens=number(body, "max_completion_tokens", 1, 1 << 20, None, True) or
                number(body, "max_tokens", 1, 1 << 20, default_max, True),
                temperature=float(number(body, "temperature", 0, 2, 1.0)),
                top_p=float(number(body, "top_p", 0, 1, 1.0)), seed=number(body, "seed", 0, 2 ** 63 - 1, None, True),
                stop=stop)


# ----------------------------------------------------------------------------------------------
# the service


class Service:
    def __init__(self, model, tok, name, max_tokens=256, max_body=16 << 20, max_pixels=4096 * 4096):
        self.model, self.tok, self.name = model, tok, name
        self.max_tokens, self.max_body, self.max_pixels = max_tokens, max_body, max_pixels
        self.worker, self.words = ModelThread(), None
        self.has_vision = not getattr(model, "llm_only", False)

    async def image(self, raw):
        if not self.has_vision:
            raise Refused(f"{self.name} is a language model alone (no vision tower): send text only")
        try:  # decoded beside the model's thread, not on the event loop
            return await run_in_threadpool(inference.read_image, raw, self.max_pixels)
        except InputError as e:
            raise Refused(str(e), "image") from None

    def answer(self, ids, image, s):
        """The model thread's work for one chat request: (text piece, tokens so far, finish reason or None).
        Text that may begin a stop string is held back until it is known not to."""
        px = sample.pixels(self.model, image) if image is not None else None
        out, text, shown = [], "", 0
        for piece in answer_pieces(self.model, self.tok, ids, px, out, s["max_tokens"], s["temperature"],
                                   s["top_p"], s["seed"]):
            text += piece
            hits = [i for i in (text.find(x) for x in s["stop"]) if i >= 0]
            if hits:
                yield text[shown:min(hits)], len(out), "stop"
                return
            hold = max((k for x in s["stop"] for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
            if len(text) - hold > shown:
                yield text[shown:len(text) - hold], len(out), None
                shown = len(text) - hold
        yield text[shown:], len(out), "length" if len(out) >= s["max_tokens"] else "stop"

    async def chat(self, request):
        t0 = time.perf_counter()
        body = await read_json(request, self.max_body)
        history, text, raw = conversation(body.get("messages"))
        s = sampling(body, self.max_tokens)
        opts = body.get("stream_options")
        usage_chunk = isinstance(opts, dict) and opts.get("include_usage") is True
        image = await self.image(raw) if raw is not None else None
        try:
            ids = inference.prompt_ids(self.model, self.tok, text, image is not None, history)
            inference.check_prompt_length(self.model, ids, "the conversation")
        except (InputError, ValueError) as e:
            raise Refused(str(e), "messages") from None
        room = self.model.cfg.decoder.max_seq_len - len(ids)
        if room < 1:
            raise Refused(f"the conversation is {len(ids)} tokens (image patches included): no room left in the "
                          f"model's context length of {self.model.cfg.decoder.max_seq_len} tokens", "messages")
        s["max_tokens"] = min(s["max_tokens"], room)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.name}
        job = self.worker.run(self.answer(ids, image, s))

        def usage(n):
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def done(n, finish):
            log.info("chat: %d + %d tokens, %s, %.2f s%s", len(ids), n, finish or "client gone",
                     time.perf_counter() - t0, " (streamed)" if body.get("stream") else "")

        if not body.get("stream"):
            answer, n, finish = "", 0, None
            async for piece, n, finish in job:
                answer += piece
            done(n, finish)
            return JSONResponse({**head, "object": "chat.completion", "usage": usage(n), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish,
                 "logprobs": None}]})

        def chunk(delta, finish=None):
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}) + "\n\n"

        async def events():
            n, finish = 0, None
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece, n, finish in job:
                    if piece:
                        yield chunk({"content": piece})
                yield chunk({}, finish)
                if usage_chunk:
                    yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                                 "usage": usage(n)}) + "\n\n"
                yield "data: [DONE]\n\n"
            except Exception as e:  # after the headers have gone: the error becomes the last event
                log.exception("chat stream failed")
                yield "data: " + json.dumps(error_body(f"internal error: {type(e).__name__}", "server_error")) + "\n\n"
            finally:
                done(n, finish)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def patch_tokens(self, image, k, word):
        """Eq. 5 and Eq. 3 for every patch (model.visual_tokens, model.nearest_tokens), labelled as sample.py
        labels them; with `word`, each patch's probability of the tokens whose label is that word."""
        px = sample.pixels(self.model, image)
        ids, probs = self.model.visual_tokens(px, k)  # (1, patches, k)
        nids, cos = self.model.nearest_tokens(px)     # (1, patches)

        def label(i):
            return sample.label(self.tok, i) if i < self.tok.vocab_size else f"<{i}>"
        out = {"object": "visual_tokens", "model": self.name,
               "grid": self.model.cfg.vision.image_size // self.model.cfg.vision.patch_size,
               "patches": [{"top": [{"token": label(i), "id": i, "prob": p} for i, p in zip(ti, tp)],
                            "nearest": {"token": label(n), "id": n, "cosine": c}}
                           for ti, tp, n, c in zip(ids[0].tolist(), probs[0].tolist(), nids[0].tolist(),
                                                   cos[0].tolist())]}
        if word is not None:
            if self.words is None:  # label -> token ids, made once
                self.words = defaultdict(list)
                for i in range(self.tok.vocab_size):
                    self.words[label(i).lower()].append(i)
            wanted = self.words.get(word.strip().lower(), [])
            if wanted:  # the whole distribution, sorted: probs of the wanted ids summed per patch
                all_ids, all_p = self.model.visual_tokens(px, self.model.vm_head.weight.shape[0])
                mass = (all_p * torch.isin(all_ids, torch.tensor(wanted, device=all_ids.device))).sum(-1)
            else:
                mass = torch.zeros(1, len(out["patches"]))
            out["word"] = {"text": word, "ids": wanted, "probs": mass[0].tolist()}
        return out

    async def visual_tokens(self, request):
        body = await read_json(request, self.max_body)
        k = number(body, "top_k", 1, 20, 5, integer=True)
        word = body.get("word")
        if word is not None and (not isinstance(word, str) or not 0 < len(word) <= 64):
            raise Refused("word must be a string of 1 to 64 characters", "word")
        image = await self.image(image_bytes(body.get("image"), "image"))
        return JSONResponse(await self.worker.call(self.patch_tokens, image, k, word))

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "nanovt", "vision": self.has_vision}]})

    async def page(self, request):
        return FileResponse(PAGE, media_type="text/html")


def error_body(message, kind="invalid_request_error", param=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def refused(request, e):
    if isinstance(e, Refused):
        log.info("%s %s refused (%d): %s", request.method, request.url.path, e.status, e)
        return JSONResponse(error_body(str(e), param=e.param), e.status)
    if isinstance(e, HTTPException):  # no such route, wrong method
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}"), e.status_code)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)


def make_app(service):
    return Starlette(routes=[Route("/", service.page), Route("/v1/models", service.models),
                             Route("/v1/chat/completions", service.chat, methods=["POST"]),
                             Route("/v1/visual_tokens", service.visual_tokens, methods=["POST"])],
                     exception_handlers={Refused: refused, HTTPException: refused, Exception: refused})


def listen(host, port):
    """A listening socket (port 0: any free one, printed with the URL)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def main(argv=None):
    import uvicorn
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=sample.DEMO_CKPT, help="nanoVT checkpoint, llava-hf directory or GGUF LLM file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --ckpt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--name", default="nanovt", help="the model's id in the API")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length when a request names none")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MiB")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image (and its padded square)")
    inference.add_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        model, tok = sample.load(a.ckpt, a.tokenizer, a.device, False, a.dtype, a.template, a.compile)
        sock = listen(a.host, a.port)
    except (InputError, OSError) as e:
        sys.exit(f"serve.py: {e}")
    service = Service(model, tok, a.name, a.max_tokens, int(a.max_body_mb * (1 << 20)), a.max_pixels)
    host, port = sock.getsockname()[:2]
    print(f"serving {a.ckpt} as {a.name!r} on http://{host if ':' not in host else f'[{host}]'}:{port}",
          flush=True)
    uvicorn.Server(uvicorn.Config(make_app(service), log_level="info")).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
