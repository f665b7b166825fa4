"""A remote backend for the APR runtime: threads decoded by an OpenAI-compatible completions server.

:class:`RemoteEngine` has the interface the runtime drives (:class:`apr_jax.inference.runtime.EngineLike`), so
the same spawn/join orchestration and the same format functions run over SGLang, ``apr-jax serve`` or any
server of ``/v1/completions``. Each thread is one request: the prompt is sent as token ids (exactly the ids the
in-process engine would prefill, BOS included, so no server-side tokenization can differ), with ``max_tokens``,
``temperature``, ``top_k``, ``seed`` (the thread's key as a 64-bit integer, the same derivation the in-process
engine uses) and the runtime's stop string. Up to ``concurrency`` requests are in flight at once from a pool
of HTTP client threads, so the children of a spawn are decoded concurrently by the server's own batching.

A parent's continuation is a new request (a remote server reuses its own prefix cache, as SGLang's radix
cache does, or recomputes). Failures never raise out of :meth:`step`: a connection refused or reset, a 5xx
or a timeout is retried ``retries`` times with backoff; what still fails (and any 4xx or malformed response)
comes back as a :class:`Finished` with ``stop="error"`` and the reason, which the runtime records as that
problem's failure while the other problems go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import itertools
import json
import time
import urllib.error
import urllib.request
from typing import Hashable, Sequence

import numpy as np

from apr_jax.inference.engine import Finished
from apr_jax.inference.sampling import GREEDY, Sampling
from apr_jax.inference.server import key_to_seed


class BackendError(RuntimeError):
    """A request that failed for good (after retries, or refused)."""


class RemoteEngine:
    """Threads as completion requests to ``url`` (e.g. ``http://127.0.0.1:30000``).

    Args:
      url: the server's base URL (``/v1/completions`` is appended).
      codec: the run's tokenizer codec (turns returned text back into the model's token ids).
      context: tokens per thread (prompt + output), as the server's model allows.
      sampling: temperature and top-k sent with every request.
      stop: stop strings sent with every request (the runtime's join marker).
      concurrency: requests in flight at once (the "slots" of a remote server).
      timeout: seconds per HTTP request; retries: extra attempts on connection errors, 5xx and timeouts.
      model: the ``model`` field of requests (SGLang accepts any; it names the served model).
      prompt_as: ``"ids"`` (default: token ids, used as given) or ``"text"`` for servers that take only
        strings (``transformers serve``): the prompt's text without BOS, which the server's tokenizer adds.
      server_stops: send the stop strings to the server (default). False for servers that do not say which
        stop matched (no ``matched_stop``): the thread then decodes to EOS or its limit and the stop strings
        are applied here, to the returned text.
    """

    def __init__(self, url: str, codec, *, context: int, sampling: Sampling = GREEDY,
                 stop: Sequence[str] = ("<Sub Searches>",), concurrency: int = 32, timeout: float = 120.0,
                 retries: int = 2, backoff: float = 0.5, model: str = "default", prompt_as: str = "ids",
                 server_stops: bool = True):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if prompt_as not in ("ids", "text"):
            raise ValueError(f"prompt_as must be 'ids' or 'text', got {prompt_as!r}")
        self.prompt_as, self.server_stops = prompt_as, server_stops
        self.url = url.rstrip("/") + "/v1/completions"
        self.codec, self.context, self.sampling, self.stop = codec, context, sampling, list(stop)
        self.concurrency, self.timeout, self.retries, self.backoff, self.model = (
            concurrency, timeout, retries, backoff, model)
        self._pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="apr-remote")
        self._queue: list = []
        self._order = itertools.count()
        self._flight: dict[cf.Future, tuple] = {}
        self._t0 = time.perf_counter()
        self.steps = 0  # completed requests (the timeline's x axis for remote runs)
        self.dispatches = 0
        self.forced_tokens = 0
        self.failures = 0

    # ------------------------------------------------------------------------------ the engine interface

    def submit(self, key: Hashable, prompt: Sequence[int], max_new: int, rng: np.ndarray, priority: int = 1) -> None:
        prompt = [int(t) for t in prompt]
        if not prompt or len(prompt) >= self.context:
            raise ValueError(f"thread {key!r}: prompt of {len(prompt)} tokens does not fit the {self.context}-token "
                             "context")
        heapq.heappush(self._queue, (priority, next(self._order), key, prompt, max_new, rng))

    def continue_thread(self, key: Hashable, prompt: Sequence[int], max_new: int, rng: np.ndarray,
                        new_key: Hashable | None = None) -> None:
        self.submit(key if new_key is None else new_key, prompt, max_new, rng, priority=0)

    def release(self, key: Hashable) -> None:
        """Nothing to free: a remote thread holds no local slot."""

    @property
    def free_slots(self) -> int:
        return max(0, self.concurrency - len(self._flight) - len(self._queue))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._flight

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def step(self) -> list[Finished]:
        """Send what the concurrency allows, then wait for at least one request to finish."""
        while self._queue and len(self._flight) < self.concurrency:
            priority, _, key, prompt, max_new, rng = heapq.heappop(self._queue)
            start = (self.steps, self.now())
            fut = self._pool.submit(self._request, prompt, min(max_new, self.context - len(prompt)), rng)
            self._flight[fut] = (key, prompt, start)
            self.dispatches += 1
        if not self._flight:
            return []
        done, _ = cf.wait(list(self._flight), return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            key, prompt, (start_step, start_s) = self._flight.pop(fut)
            self.steps += 1
            try:
                tokens, stop = fut.result()
                error = None
            except BackendError as err:
                tokens, stop, error = [], "error", str(err)
                self.failures += 1
            out.append(Finished(key, -1, len(prompt), len(prompt), tokens, [0.0] * len(tokens), stop, start_step,
                                self.steps, start_s, self.now(), error=error))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------ one request

    def _payload(self, prompt: list[int], max_new: int, rng: np.ndarray) -> bytes:
        body = {"model": self.model, "prompt": prompt if self.prompt_as == "ids" else self.codec.text(prompt),
                "max_tokens": int(max_new), "temperature": self.sampling.temperature, "seed": key_to_seed(rng)}
        if self.server_stops:
            body["stop"] = self.stop
        if self.sampling.top_k:
            body["top_k"] = self.sampling.top_k
        return json.dumps(body).encode()

    def _post(self, data: bytes) -> dict:
        req = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def _request(self, prompt: list[int], max_new: int, rng: np.ndarray) -> tuple[list[int], str]:
        data, last = self._payload(prompt, max_new, rng), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._parse(self._post(data))
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                last = f"HTTP {err.code} from {self.url}: {detail}"
                if err.code < 500:
                    break  # refused: retrying cannot help
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last = f"{type(err).__name__} talking to {self.url}: {getattr(err, 'reason', err)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
                last = f"malformed response from {self.url}: {type(err).__name__}: {err}"
                break
        raise BackendError(last)

    def _parse(self, response: dict) -> tuple[list[int], str]:
        """Token ids of a completion as the in-process engine reports them: a matched stop string's tokens
        included (``stop_sequence``), EOS appended when the model ended (``eos``), or neither (``length``).
        Servers that return the generated ids (``token_ids``, as ``apr-jax serve`` does) are taken at their
        word; otherwise the text is re-encoded with the run's tokenizer (lossless for the trace language)."""
        choice = response["choices"][0]
        text, reason = choice["text"], choice["finish_reason"]
        if not isinstance(text, str) or reason not in ("stop", "length", "eos"):
            raise ValueError(f"unexpected choice {str(choice)[:200]}")
        matched = choice.get("matched_stop")
        exact = choice.get("token_ids")  # apr-jax serve's extension: the ids as generated
        if exact is not None:
            if not isinstance(exact, list) or not all(isinstance(t, int) for t in exact):
                raise ValueError("token_ids must be a list of integers")
            stop = ("length" if reason == "length" else
                    "stop_sequence" if isinstance(matched, str) and matched in self.stop else "eos")
            return exact, stop
        if not self.server_stops:
            cut = [(text.find(s), s) for s in self.stop if text.find(s) >= 0]
            if cut:
                at, matched = min(cut)
                text, reason = text[:at], "stop"
        ids = self.codec.ids(text)
        if reason == "length":
            return ids, "length"
        if isinstance(matched, str) and matched in self.stop:
            return ids + self.codec.ids(matched), "stop_sequence"
        return ids + [self.codec.eos_id], "eos"
