"""``apr-jax serve``: the slot engine behind an OpenAI-compatible completions API (the subset SGLang serves).

Endpoints (JSON):

- ``POST /v1/completions`` with ``prompt`` (a string, or a list of token ids used exactly as given: BOS is
  not added), ``max_tokens``, ``temperature`` (0 = greedy), ``top_k``, ``seed``, ``stop`` (a string or a
  list). Returns ``choices[0]`` with ``text`` (stop strings excluded, as OpenAI does), ``finish_reason``
  (``"stop"`` or ``"length"``) and ``matched_stop`` (the stop string, the EOS id, or null: SGLang's field),
  ``token_ids`` (an extension: the generated ids exactly, stop sequence and EOS included), plus ``usage``. Only ``n = 1``; no streaming.
- ``GET /health``: 200 when the engine thread is alive. ``GET /v1/models``: the model and its context.

Every request becomes one thread of one shared :class:`~apr_jax.inference.engine.Engine`, so concurrent
requests are decoded together (continuous batching): an engine thread admits new requests between decode
dispatches, which it limits to ``admit_every`` steps so that a new request never waits for a long one. A request's sampling key comes from its ``seed`` exactly as the APR runtime derives thread keys,
so a client that sends the runtime's per-thread seeds gets the in-process engine's tokens. The engine's
sampling (temperature, top-k) is fixed per server (``--temperature``); a request that asks for another is
refused (400) rather than silently served differently. Stop strings the server was started with end decoding
on device; any other stop string is applied to the finished text.

Bad requests get a 4xx with a message: malformed JSON, unknown fields of the wrong type, a prompt longer than
the context, ``max_tokens`` < 1, ``n`` != 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import queue
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

import numpy as np

from apr_jax.inference.engine import Engine, Finished
from apr_jax.inference.sampling import Sampling

log = logging.getLogger(__name__)


def seed_to_key(seed: int) -> np.ndarray:
    """The raw uint32[2] PRNG key a request's ``seed`` stands for (the inverse of :func:`key_to_seed`)."""
    seed = int(seed) % (1 << 64)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def key_to_seed(key: np.ndarray) -> int:
    """A thread's raw PRNG key as one 64-bit integer seed."""
    return (int(key[0]) << 32) | int(key[1])


class RequestError(ValueError):
    """A request the server refuses (HTTP 400)."""


@dataclasses.dataclass
class _Pending:
    prompt: list[int]
    max_new: int
    key: np.ndarray
    stops: list[str]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Finished | None = None
    error: str | None = None


class EngineService:
    """The engine thread: admits requests between dispatches and hands each finished thread to its caller."""

    def __init__(self, engine: Engine, codec, model_name: str = "apr-jax", device_stops: Sequence[str] = (),
                 admit_every: int = 16):
        self.engine, self.codec, self.model_name = engine, codec, model_name
        self.admit_every = admit_every  # decode steps per dispatch: how long a new request waits at most
        self.device_stops = list(device_stops)
        self._inbox: queue.Queue[tuple[int, _Pending]] = queue.Queue()
        self._ids = itertools.count()
        self._waiting: dict[int, _Pending] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="apr-jax-engine", daemon=True)
        self.thread.start()

    def submit(self, pending: _Pending) -> None:
        self._inbox.put((next(self._ids), pending))

    def close(self) -> None:
        self._stop.set()
        self._inbox.put((-1, None))  # wakes the loop
        self.thread.join(timeout=30)

    def _admit(self, rid: int, pending: _Pending) -> None:
        try:
            self.engine.submit(rid, pending.prompt, pending.max_new, pending.key)
            self._waiting[rid] = pending
        except ValueError as err:
            pending.error = str(err)
            pending.done.set()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.engine.idle:
                    rid, pending = self._inbox.get()
                    if pending is None:
                        continue
                    self._admit(rid, pending)
                while True:
                    try:
                        rid, pending = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if pending is not None:
                        self._admit(rid, pending)
                for f in self.engine.step(max_steps=self.admit_every):
                    self.engine.release(f.key)
                    pending = self._waiting.pop(f.key)
                    pending.result = f
                    pending.done.set()
        except Exception as err:  # the engine died: fail everything waiting, loudly
            log.exception("engine thread failed")
            for pending in self._waiting.values():
                pending.error = f"engine failure: {err}"
                pending.done.set()
            raise


def _as_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise RequestError(f"'{name}' must be a string or a list of strings")


def parse_request(body: dict, service: EngineService) -> _Pending:
    """Validate a completions request into an engine thread (raises :class:`RequestError`)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    engine, codec = service.engine, service.codec
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # OpenAI's batch form with one prompt
    if isinstance(prompt, str):
        ids = codec.prompt_ids(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        vocab = engine.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
    else:
        raise RequestError("'prompt' must be a non-empty string or list of token ids")
    if len(ids) >= engine.context:
        raise RequestError(f"prompt of {len(ids)} tokens leaves no room in the {engine.context}-token context")
    max_new = body.get("max_tokens", 16)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise RequestError("'max_tokens' must be an integer >= 1")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is served")
    if body.get("stream"):
        raise RequestError("streaming is not served")
    temperature = body.get("temperature", 1.0)
    top_k = body.get("top_k", engine.sampling.top_k) or 0
    if not isinstance(temperature, (int, float)) or not isinstance(top_k, int):
        raise RequestError("'temperature' must be a number and 'top_k' an integer")
    if float(temperature) != engine.sampling.temperature or int(top_k) != engine.sampling.top_k:
        raise RequestError(f"this server samples with temperature {engine.sampling.temperature} and top_k "
                           f"{engine.sampling.top_k} (start it with other --temperature/--top-k to change)")
    seed = body.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RequestError("'seed' must be an integer")
    return _Pending(ids, max_new, seed_to_key(seed), _as_list(body.get("stop"), "stop"))


def render_response(pending: _Pending, service: EngineService, model: str) -> dict:
    """The OpenAI-style completion of a finished request."""
    f, codec = pending.result, service.codec
    tokens = list(f.tokens)
    text = codec.text(tokens)
    finish, matched = ("length", None)
    if f.stop == "eos":
        finish, matched = "stop", service.engine.eos_id
    elif f.stop == "stop_sequence":
        finish = "stop"
        matched = next((s for s in service.device_stops if text.endswith(s)), None)
        if matched is not None:
            text = text[:-len(matched)]
    choice = {"index": 0, "text": text, "finish_reason": finish, "matched_stop": matched, "logprobs": None,
              "token_ids": tokens}  # extension: the exact generated ids (stop sequence and EOS included)
    cut = [(text.find(s), s) for s in pending.stops if s and text.find(s) >= 0]
    if cut:  # a stop string the engine does not watch: applied to the text (the ids no longer match it)
        at, s = min(cut)
        choice.update(text=text[:at], finish_reason="stop", matched_stop=s)
        del choice["token_ids"]
    return {"id": f"cmpl-{f.key}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": len(pending.prompt), "completion_tokens": len(tokens),
                      "total_tokens": len(pending.prompt) + len(tokens)}}


def make_handler(service: EngineService, request_timeout: float = 600.0):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default; errors are logged below
            log.debug("%s - %s", self.address_string(), fmt % args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}})

        def do_GET(self):
            if self.path == "/health":
                alive = service.thread.is_alive()
                self._send(200 if alive else 503, {"status": "ok" if alive else "engine stopped"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                             "max_model_len": service.engine.context}]})
            else:
                self._error(404, f"no such endpoint {self.path}")

        def do_POST(self):
            if self.path != "/v1/completions":
                self._error(404, f"no such endpoint {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
            except (ValueError, json.JSONDecodeError) as err:
                self._error(400, f"malformed JSON: {err}")
                return
            try:
                pending = parse_request(body, service)
            except RequestError as err:
                self._error(400, str(err))
                return
            if not service.thread.is_alive():
                self._error(503, "the engine thread has stopped")
                return
            service.submit(pending)
            if not pending.done.wait(request_timeout):
                self._error(504, f"no result within {request_timeout} s")
                return
            if pending.error is not None:
                self._error(400 if "context" in pending.error or "prompt" in pending.error else 500, pending.error)
                return
            self._send(200, render_response(pending, service, body.get("model") or service.model_name))

    return Handler


def make_server(service: EngineService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``service`` (``port`` 0: a free port; see ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server


def serve_run(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 32, context: int | None = None,
              sampling: Sampling = Sampling(temperature=0.0), stops: Sequence[str] = ("<Sub Searches>",),
              step: int | None = None) -> None:
    """Load a run folder and serve it until interrupted."""
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.inference.runtime import Codec

    model_cfg, params, tok = load_run_model(ckpt, step=step)
    _, bos, eos = tokenization.special_ids(tok)
    codec = Codec(tok, bos, eos)
    engine = Engine(model_cfg, params, slots=slots, eos_id=eos, context=context, sampling=sampling,
                    stop_sequences=[codec.ids(s) for s in stops])
    service = EngineService(engine, codec, model_name=str(ckpt), device_stops=stops)
    server = make_server(service, host, port)
    print(f"serving {ckpt} on http://{host}:{server.server_address[1]} (slots {slots}, context {engine.context}, "
          f"temperature {sampling.temperature}); POST /v1/completions, GET /health", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
