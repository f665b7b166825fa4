"""Serving: `apr-jax serve`'s HTTP API on loopback, the remote backend against it (same thread trees as the
in-process engine), and faults (a server that dies, a slow one, malformed and refused responses)."""

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import pytest

from apr_jax.data.tokenizer import BOS_ID, EOS_ID, build_tokenizer
from apr_jax.inference.engine import Engine
from apr_jax.inference.remote import RemoteEngine
from apr_jax.inference.runtime import Codec, RunConfig, Runtime
from apr_jax.inference.sampling import GREEDY, Sampling
from apr_jax.inference.server import EngineService, key_to_seed, make_server, seed_to_key
from apr_jax.model import config, init

CFG = dataclasses.replace(config.tiny(128), max_seq_len=192)
CODEC = Codec(build_tokenizer("digits"), BOS_ID, EOS_ID)
JOIN = "<Sub Searches>"
PROBLEMS = [{"nums": [3, 7, 12, 40], "target": 25}, {"nums": [5, 9, 60, 2], "target": 31},
            {"nums": [8, 8, 14, 90], "target": 47}, {"nums": [1, 33, 20, 6], "target": 12}]


@pytest.fixture(scope="module")
def params():
    return init(CFG, jax.random.PRNGKey(11))


def engine(params, sampling=GREEDY, slots=4):
    return Engine(CFG, params, slots=slots, eos_id=EOS_ID, sampling=sampling, stop_sequences=[CODEC.ids(JOIN)])


class Server:
    """`apr-jax serve`'s server on a free loopback port, in this process."""

    def __init__(self, params, sampling=GREEDY):
        self.service = EngineService(engine(params, sampling), CODEC, device_stops=[JOIN])
        self.http = make_server(self.service, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.service.close()


@pytest.fixture(scope="module")
def server(params):
    s = Server(params)
    yield s
    s.close()


def post(url, body, raw=None):
    req = urllib.request.Request(url + "/v1/completions", data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def trees(results):
    return [(r["answer"], r["correct"], r["reason"], [(t["path"], t["output"], t["stop"]) for t in r["threads"]])
            for r in results]


def test_seed_and_key_round_trip():
    for key in ([0, 0], [1, 2], [2**32 - 1, 7]):
        assert seed_to_key(key_to_seed(key)).tolist() == key


@pytest.mark.parametrize("mode", ["apr", "sosp"])
def test_remote_backend_on_our_server_equals_the_in_process_engine(params, server, mode):
    run = RunConfig(mode=mode, seed=5)
    local = Runtime(engine(params), CODEC, run).solve(PROBLEMS)
    remote_engine = RemoteEngine(server.url, CODEC, context=CFG.max_seq_len, concurrency=3)
    remote = Runtime(remote_engine, CODEC, run).solve(PROBLEMS)
    assert trees(remote) == trees(local)
    assert remote_engine.failures == 0 and remote_engine.dispatches >= len(PROBLEMS)


def test_sampled_threads_match_too_through_the_seed(params):
    sampling = Sampling(temperature=1.0)
    srv = Server(params, sampling)
    try:
        run = RunConfig(mode="sc", samples=3, seed=9)
        local = Runtime(engine(params, sampling), CODEC, run).solve(PROBLEMS[:2])
        remote = Runtime(RemoteEngine(srv.url, CODEC, context=CFG.max_seq_len, sampling=sampling), CODEC,
                         run).solve(PROBLEMS[:2])
        assert trees(remote) == trees(local)
        assert len({t[1] for t in trees(local)[0][3]}) > 1  # the samples differ from each other
    finally:
        srv.close()


def test_server_validates_requests(server):
    ok_status, ok = post(server.url, {"prompt": "Current State: 25:[3, 7]", "max_tokens": 4, "temperature": 0})
    assert ok_status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length")
    assert ok["usage"]["completion_tokens"] == len(ok["choices"][0]["token_ids"]) <= 4
    cases = [(None, b"{not json", "malformed JSON"),
             ({"prompt": "x" * 300, "temperature": 0}, None, "leaves no room"),
             ({"prompt": "x", "max_tokens": 0, "temperature": 0}, None, "max_tokens"),
             ({"prompt": "x", "temperature": 0.7}, None, "samples with temperature"),
             ({"prompt": [1, 999], "temperature": 0}, None, "token ids must be in"),
             ({"prompt": "x", "temperature": 0, "n": 2}, None, "n = 1"),
             ({"max_tokens": 3}, None, "'prompt'")]
    for body, raw, message in cases:
        status, err = post(server.url, body, raw)
        assert status == 400 and message in err["error"]["message"], (body, err)
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/v2/nothing", timeout=10)
    assert info.value.code == 404


def test_a_server_killed_mid_run_fails_only_the_problems_it_did_not_finish(params):
    srv = Server(params)
    killed = []

    def on_result(result):
        if not killed:
            srv.close()  # the server goes away after the first finished problem
            killed.append(result["problem"]["id"])

    remote = RemoteEngine(srv.url, CODEC, context=CFG.max_seq_len, concurrency=1, retries=1, backoff=0.05,
                          timeout=5)
    results = Runtime(remote, CODEC, RunConfig(mode="sosp")).solve(PROBLEMS, on_result=on_result)
    assert len(results) == len(PROBLEMS) and all(r is not None for r in results)
    assert "backend error" not in results[0]["reason"]
    failed = [r for r in results if "backend error" in r["reason"]]
    assert failed and all(r["threads"][0]["stop"] == "error" and "Connection" in r["threads"][0]["error"]
                          for r in failed)


class _FakeServer:
    """A loopback server that answers every completion with ``reply(handler)`` (to fake faults)."""

    def __init__(self, reply):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                reply(self)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.calls = 0

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def _send(handler, status, body: bytes):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("fault,expected,attempts", [
    ("slow", "timed out", 2), ("garbage", "malformed response", 1), ("empty", "malformed response", 1),
    ("refused", "HTTP 400", 1), ("crash", "HTTP 500", 2)])
def test_faults_are_recorded_per_problem_and_the_run_finishes(fault, expected, attempts):
    calls = []

    def reply(handler):
        calls.append(1)
        if fault == "slow":
            time.sleep(1.0)
            _send(handler, 200, b"{}")
        elif fault == "garbage":
            _send(handler, 200, b"<html>not json")
        elif fault == "empty":
            _send(handler, 200, json.dumps({"choices": []}).encode())
        elif fault == "refused":
            _send(handler, 400, b'{"error": {"message": "prompt too long"}}')
        else:
            _send(handler, 500, b"internal error")

    fake = _FakeServer(reply)
    try:
        remote = RemoteEngine(fake.url, CODEC, context=CFG.max_seq_len, timeout=0.3, retries=1, backoff=0.01)
        t0 = time.perf_counter()
        results = Runtime(remote, CODEC, RunConfig(mode="apr")).solve(PROBLEMS[:2])
        assert time.perf_counter() - t0 < 10
    finally:
        fake.close()
    for r in results:
        assert not r["correct"] and r["reason"].startswith("backend error") and expected in r["reason"]
    assert len(calls) == attempts * 2  # retried only what retrying can fix


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_independent_server_transformers_serve_reproduces_the_in_process_trees(params, tmp_path):
    """The exported checkpoint served by `transformers serve` (FastAPI + torch, CPU): text prompts, stop
    strings applied by the client (it does not report which stop matched)."""
    import os
    import subprocess
    import sys

    from apr_jax.data.tokenizer import save_tokenizer
    from apr_jax.export.hf import export_hf

    tok_path = save_tokenizer(CODEC.tok, tmp_path / "tokenizer.json")
    hf_dir = tmp_path / "hf"
    export_hf(CFG, params, hf_dir, tokenizer_json_path=tok_path)
    port = _free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([cli, "serve", str(hf_dir), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, "transformers serve exited"
                time.sleep(0.5)
        for mode in ("sosp", "apr"):
            run = RunConfig(mode=mode, seed=1)
            local = Runtime(engine(params), CODEC, run).solve(PROBLEMS[:3])
            remote_engine = RemoteEngine(url, CODEC, context=CFG.max_seq_len, concurrency=2, model=str(hf_dir),
                                         prompt_as="text", server_stops=False, timeout=120)
            remote = Runtime(remote_engine, CODEC, run).solve(PROBLEMS[:3])
            assert remote_engine.failures == 0, [r["reason"] for r in remote]
            assert trees(remote) == trees(local)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
