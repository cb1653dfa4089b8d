"""Fuzzing the HTTP API of a real server process: every route, valid and invalid requests, with and without a key.

What runs, against one ``gemma-sessions serve`` process (the real model, a temp store, two API keys, a small KV
pool, ``--max-output-tokens 8`` so a valid generation request stays short):

- ``test_fuzz_route[METHOD /path]``: schemathesis (Hypothesis over the server's own ``/openapi.json``) generates
  requests for that operation: schema-valid ("positive") and schema-violating ("negative") bodies, path and query
  parameters, path parameters that name real objects of the key's owner, and an Authorization header drawn from:
  the right key, the other owner's key, a wrong key, none, an empty Bearer, a Basic scheme, a 10 kB key.
  ``test_every_route_is_fuzzed`` fails when the schema has an operation this list lacks.
- ``test_fuzz_import_bytes``: ``POST /v1/sessions/import`` takes raw bytes the schema does not describe: random
  bytes and real exports (plain, int8, zstd) truncated, bit-flipped, with a wrong header length, or with one
  safetensors header field (dtype, shape, offsets, a metadata string) replaced.
- ``test_handwritten_bad_request``: what a schema fuzzer does not produce: invalid UTF-8, 100k-deep JSON, lone
  surrogates ("\\ud800") in messages / items / metadata / instructions / stop strings, ``seed`` = 2**64, ``NaN``,
  ``conversation: {"id": 5}``, path traversal in ids, unknown paths, wrong methods, oversized bodies sent with
  ``Transfer-Encoding: chunked`` (no Content-Length), tokenizer-heavy bodies.
- A thread polls ``GET /health`` every 0.25 s for the whole module; ``test_health_stayed_responsive`` (last) fails
  when any answer took over 1 s (or was not 200 / 503), and ``test_server_still_serves`` when a plain request fails.
- After each fuzzed route, and after a hand-written case that failed, a one-token chat completion probes the server;
  when it no longer serves (a request killed its engine), that test fails saying so and the server is restarted
  on the same store, so the tests after it still test something.

Assertions on every answer: status < 500, except 503 *with* Retry-After (overload; reported when seen); every
non-2xx body is OpenAI's error shape ``{"error": {"message": str, "type": str, "param": ..., "code": ...}}``.
The hand-written cases must be 4xx (the oversized ones 413). A test collects every bad answer of its examples
(Hypothesis does not stop at the first) and fails listing them, grouped by what is wrong.

Budget: ~3 minutes on 2 cores (examples per route in ``EXAMPLES``; ``GEMMA_FUZZ_SCALE=0.3`` for a quicker run,
``=3`` for a deeper one). ``GEMMA_FUZZ_UNCAPPED=1`` runs against a server without ``--max-output-tokens``: the flag
is not passed and the test caps max_tokens / max_output_tokens in the bodies it sends instead (weaker: a body
without those fields is given one).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from servers import wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "fuzz-key-a-" + "x" * 20, "fuzz-key-b-" + "y" * 20
MAX_OUTPUT_TOKENS = 8
UNCAPPED = os.environ.get("GEMMA_FUZZ_UNCAPPED", "") not in ("", "0")
SCALE = float(os.environ.get("GEMMA_FUZZ_SCALE", "1"))
HEALTH_LIMIT_S = 1.0

# Every operation of /openapi.json and the examples it gets (DELETEs last: they remove the real objects).
EXAMPLES = {
    ("GET", "/health"): 6,
    ("GET", "/metrics"): 6,
    ("GET", "/v1/models"): 10,
    ("GET", "/v1/models/{model_id}"): 10,
    ("POST", "/tokenize"): 40,
    ("POST", "/detokenize"): 40,
    ("POST", "/v1/chat/completions"): 150,
    ("POST", "/v1/completions"): 100,
    ("POST", "/v1/responses"): 150,
    ("GET", "/v1/responses/{rid}"): 20,
    ("GET", "/v1/responses/{rid}/input_items"): 30,
    ("POST", "/v1/responses/{rid}/cancel"): 20,
    ("POST", "/v1/responses/input_tokens"): 60,
    ("POST", "/v1/conversations"): 80,
    ("GET", "/v1/conversations/{cid}"): 20,
    ("POST", "/v1/conversations/{cid}"): 60,
    ("GET", "/v1/conversations/{cid}/items"): 60,
    ("POST", "/v1/conversations/{cid}/items"): 80,
    ("GET", "/v1/sessions"): 10,
    ("GET", "/v1/sessions/{sid}"): 20,
    ("POST", "/v1/sessions/{sid}/fork"): 20,
    ("GET", "/v1/sessions/{sid}/export"): 24,
    ("GET", "/v1/sessions/{sid}/turns"): 20,
    ("GET", "/v1/stats"): 6,
    ("POST", "/v1/sessions/import"): 30,
    ("GET", "/v1/conversations/{cid}/items/{item_id}"): 20,
    ("DELETE", "/v1/conversations/{cid}/items/{item_id}"): 20,
    ("DELETE", "/v1/responses/{rid}"): 20,
    ("DELETE", "/v1/conversations/{cid}"): 20,
}

AUTH_HEADERS = [
    {"Authorization": f"Bearer {KEY_A}"},
    {"Authorization": f"Bearer {KEY_A}"},
    {"Authorization": f"Bearer {KEY_A}"},
    {"Authorization": f"Bearer {KEY_B}"},  # another owner: A's objects are 404 to it
    {"Authorization": "Bearer wrong-key"},
    {},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer " + "k" * 10_000},
]


# ------------------------------------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m gemma_sessions.cli serve`` on a free port; its output goes to a file (a pipe nobody reads
    would fill up with tracebacks and block the server). ``probe()`` asks whether it still serves a plain request;
    ``restart()`` replaces a process that stopped serving (same store and port), so one request that kills the
    engine fails the test that sent it and not every test after it."""

    def __init__(self, store, log_path):
        self.port, self.store, self.log_path = _free_port(), store, log_path
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.restarts: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "gemma_sessions.cli", "serve", "--store", str(self.store), "--port",
               str(self.port), "--api-key", KEY_A, "--api-key", KEY_B, "--kv-cache-bytes", str(96 << 20)]
        if not UNCAPPED:
            cmd += ["--max-output-tokens", str(MAX_OUTPUT_TOKENS)]
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        if wait_healthy(self.url, self.proc, 180):
            return self
        self.log.flush()
        out = open(self.log_path).read()[-3000:]
        hint = (" (this server has no --max-output-tokens flag; GEMMA_FUZZ_UNCAPPED=1 runs without it)"
                if "--max-output-tokens" in out else "")
        raise RuntimeError(f"server exited with status {self.proc.returncode}{hint}:\n{out}")

    def stop(self) -> int | None:
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        return code

    def probe(self) -> str | None:
        """None when a one-token chat completion works; else what the server answered (and /health with it)."""
        if self.proc.poll() is not None:
            return f"the server process exited with status {self.proc.returncode}"
        try:
            r = httpx.post(f"{self.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout=60)
        except httpx.HTTPError as exc:
            return f"a plain chat completion got no answer ({type(exc).__name__})"
        if r.status_code == 200:
            return None
        try:
            health = httpx.get(f"{self.url}/health", timeout=5)
            health = f"{health.status_code} {health.text[:120]}"
        except httpx.HTTPError as exc:
            health = type(exc).__name__
        return f"a plain chat completion got {r.status_code} {r.text[:200]!r}; /health answered {health}"

    def restart(self, why: str) -> None:
        self.restarts.append(why)
        self.poller.paused.set()
        try:
            self.stop()
            self.start()
        finally:
            self.poller.paused.clear()


class HealthPoller(threading.Thread):
    """GET /health every 0.25 s (not while the server restarts); remembers each answer's status and latency."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="health-poller")
        self.url, self.stop_event, self.paused = url, threading.Event(), threading.Event()
        self.samples: list[tuple[float, float, str]] = []  # (time since start, latency s, status or error)

    def run(self) -> None:
        t_start = time.perf_counter()
        with httpx.Client(timeout=10) as client:
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                if not self.paused.is_set():
                    try:
                        outcome = str(client.get(f"{self.url}/health").status_code)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    if not self.paused.is_set():  # a restart began meanwhile: not the server's latency
                        self.samples.append((t0 - t_start, time.perf_counter() - t0, outcome))
                self.stop_event.wait(0.25)

    def bad(self) -> list[tuple[float, float, str]]:
        """Answers later than 1 s, no answer, or a status other than 200 / 503 (503: the engine is dead, which
        the test whose request killed it reports)."""
        return [s for s in self.samples if s[2] not in ("200", "503") or s[1] > HEALTH_LIMIT_S]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_path):
    d = tmp_path_factory.mktemp("fuzz")
    srv = Server(d / "store", d / "server.log").start()
    srv.poller = HealthPoller(srv.url)
    srv.poller.start()
    srv.overloaded: list[str] = []  # 503 + Retry-After answers (allowed; reported)
    yield srv
    srv.poller.stop_event.set()
    srv.poller.join(timeout=15)
    code = srv.stop()
    tracebacks = open(d / "server.log").read().count("Traceback")
    print(f"\n[fuzz] server log {d / 'server.log'}: {tracebacks} tracebacks; SIGTERM exit status {code}; "
          f"restarts {len(srv.restarts)}; 503 overload answers: {len(srv.overloaded)}")


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def _make_objects(server) -> dict:
    """Objects owned by KEY_A that path parameters can name: a conversation with two turns, its items, the last
    response, the session's exports (plain, int8, zstd), and the served model's id."""
    h = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=server.url, headers=h, timeout=120) as c:
        model_id = c.get("/v1/models").json()["data"][0]["id"]
        cid = c.post("/v1/conversations", json={"metadata": {"fuzz": "yes"}}).json()["id"]
        rid = None
        for text in ("Hello, I am the fuzzer.", "Say one word."):
            r = c.post("/v1/responses", json={"conversation": cid, "input": text, "max_output_tokens": 4})
            assert r.status_code == 200, r.text
            rid = r.json()["id"]
        items = c.get(f"/v1/conversations/{cid}/items", params={"order": "asc"}).json()["data"]
        sid = cid.removeprefix("conv_")
        exports = []
        for p in ({}, {"quantize": "true"}, {"compress": "true"}):
            r = c.get(f"/v1/sessions/{sid}/export", params=p)
            assert r.status_code == 200 and r.content, f"export {p}: {r.status_code} {r.text[:200]}"
            exports.append(r.content)
    return {"cid": cid, "rid": rid, "sid": sid, "item_id": items[0]["id"], "exports": exports, "model_id": model_id}


@pytest.fixture(scope="module")
def real(server):
    """For the schema fuzzing (its DELETE examples may remove them)."""
    return _make_objects(server)


@pytest.fixture(scope="module")
def fresh(server):
    """For the hand-written cases: objects no fuzzing example has touched."""
    return _make_objects(server)


# ------------------------------------------------------------------------------------------------ checks


def answer_problems(status: int, headers, content: bytes) -> list[str]:
    """What is wrong with one answer (empty: nothing). ``headers``: a mapping of lowercase names."""
    problems = []
    if status >= 500 and not (status == 503 and headers.get("retry-after")):
        problems.append(f"status {status}")
    if status >= 300:
        problems += error_shape_problems(content)
    return problems


def error_shape_problems(content: bytes) -> list[str]:
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return ["error body is not JSON"]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return [f"error body is not OpenAI's shape (keys {sorted(body)[:4] if isinstance(body, dict) else '-'})"]
    out = []
    if not isinstance(err.get("message"), str) or not err["message"]:
        out.append("error.message is not a non-empty string")
    if not isinstance(err.get("type"), str) or not err["type"]:
        out.append("error.type is not a non-empty string")
    for key in ("param", "code"):
        if key not in err:
            out.append(f"error.{key} is missing")
    return out


class Failures:
    """Bad answers of one test, grouped by (what is wrong) with a few samples each."""

    def __init__(self) -> None:
        self.groups: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, problem: str, request: str, status, content: bytes | str) -> None:
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        self.groups[problem].append(f"{request} -> {status} {text[:300]!r}")

    def report(self) -> str:
        lines = []
        for problem, samples in self.groups.items():
            lines.append(f"{problem}: {len(samples)} answer(s), e.g.")
            lines += [f"    {s}" for s in samples[:4]]
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.groups)


def _short(value, n: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + f"...({len(text)} chars)"


def _cap_tokens(body) -> None:
    """GEMMA_FUZZ_UNCAPPED: keep generation short without the server's --max-output-tokens."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > MAX_OUTPUT_TOKENS:
            body[key] = MAX_OUTPUT_TOKENS
    if not any(k in body for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        body["max_tokens" if "messages" in body or "prompt" in body else "max_output_tokens"] = MAX_OUTPUT_TOKENS


def _continue(case, real: dict):
    """A generated Responses body pointed at the real conversation or response (its turn really runs)."""
    if isinstance(case.body, dict):
        case.body.pop("previous_response_id", None)
        case.body.pop("conversation", None)
        if len(str(case.body)) % 2:
            case.body["conversation"] = real["cid"]
        else:
            case.body["previous_response_id"] = real["rid"]
    return case


def _settings(n: int):
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                    print_blob=False)


# ------------------------------------------------------------------------------------------------ schema fuzzing


def test_every_route_is_fuzzed(schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert ops == set(EXAMPLES), f"schema operations not in EXAMPLES: {sorted(ops - set(EXAMPLES))}; " \
                                 f"in EXAMPLES, not in the schema: {sorted(set(EXAMPLES) - ops)}"


@pytest.mark.parametrize("method,path", list(EXAMPLES), ids=[f"{m} {p}" for m, p in EXAMPLES])
def test_fuzz_route(server, schema, real, method, path):
    try:
        op = schema[path][method]
    except KeyError:
        pytest.fail(f"{method} {path} is not in /openapi.json")
    names = re.findall(r"{(\w+)}", path)
    modes = [GenerationMode.POSITIVE]
    if len(op.body) or len(op.query) or names:  # an operation with nothing to violate has no negative cases
        modes.append(GenerationMode.NEGATIVE)
    strategies = []
    for mode in modes:
        strategies.append(op.as_strategy(mode))
        if names:  # the same, naming real objects (the example reaches the route's logic, not just a 404)
            strategies.append(op.as_strategy(mode, path_parameters={n: real[n] for n in names}))
    if (method, path) == ("POST", "/v1/responses"):  # generated bodies that continue real objects
        strategies.append(op.as_strategy(GenerationMode.POSITIVE).map(lambda c: _continue(c, real)))
    failures = Failures()
    session = requests.Session()
    sent = [0]

    @_settings(EXAMPLES[(method, path)])
    @given(case=st.one_of(strategies), auth=st.sampled_from(AUTH_HEADERS))
    def run(case, auth):
        if UNCAPPED:
            _cap_tokens(case.body)
        sent[0] += 1

        def desc(full: bool = False) -> str:
            body = "-" if isinstance(case.body, schemathesis.core.NotSet) else _short(_json(case.body),
                                                                                          2000 if full else 200)
            return f"{method} {case.formatted_path} query={_short(case.query)} auth={_short(auth, 40)} body={body}"

        try:
            r = case.call(base_url=server.url, session=session, headers=dict(auth), timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dropped connection or no answer is a finding
            failures.add(f"transport error {type(exc).__name__}", desc(True), "-", str(exc))
            return
        hdrs = {k: v[0] if isinstance(v, list) else v for k, v in r.headers.items()}
        if r.status_code == 503 and hdrs.get("retry-after"):
            server.overloaded.append(desc())
        for problem in answer_problems(r.status_code, hdrs, r.content):
            failures.add(problem, desc(problem.startswith("status")), r.status_code, r.content)

    run()
    print(f"[fuzz] {method} {path}: {sent[0]} requests")
    dead = server.probe()
    if dead:  # the first "status 5xx" samples above hold the request that did it
        failures.add("the server stopped serving during these examples (restarted for the next tests)",
                     "probe", "-", dead)
        server.restart(f"after {method} {path}: {dead}")
    assert not failures, f"{method} {path}: bad answers\n{failures.report()}"


def _json(body) -> str:
    if isinstance(body, bytes):
        return repr(body)
    try:
        return json.dumps(body, ensure_ascii=True)
    except (TypeError, ValueError):
        return repr(body)


@st.composite
def _mutated_export(draw, exports: list[bytes]):
    data = draw(st.sampled_from(exports))
    kind = draw(st.sampled_from(["random", "truncate", "flip", "header_len", "header_field", "append"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    n = int.from_bytes(data[:8], "little")
    if kind == "header_len":
        value = draw(st.sampled_from([0, 1, 7, n - 1, n + 1, len(data), 2**31, 2**63 - 1, 2**64 - 1]))
        return value.to_bytes(8, "little") + data[8:]
    try:  # header_field: a plain (not zstd) safetensors file
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        return data[:draw(st.integers(0, len(data) - 1))]
    key = draw(st.sampled_from(sorted(header)))
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=30),
                     st.lists(st.integers(-2**40, 2**40), max_size=4), st.just([2**40]), st.just([-1]))
    if key == "__metadata__":
        meta = dict(header[key])
        mkey = draw(st.sampled_from(sorted(meta)))
        meta[mkey] = draw(st.one_of(st.text(max_size=40), st.sampled_from(
            ["", "{}", "[]", "null", "1e999", json.dumps([2**70]), json.dumps({"a": [1, 2]}), meta[mkey][:-3]])))
        header[key] = meta
    else:
        entry = dict(header[key])
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(junk)
        header[key] = entry
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def test_fuzz_import_bytes(server, real):
    failures = Failures()
    h = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/octet-stream"}
    client = httpx.Client(base_url=server.url, headers=h, timeout=60)
    outcomes = collections.Counter()

    @_settings(120)
    @given(data=_mutated_export(real["exports"]), history_only=st.booleans())
    def run(data, history_only):
        desc = f"POST /v1/sessions/import?history_only={history_only} ({len(data)} bytes)"
        try:
            r = client.post("/v1/sessions/import", content=data, params={"history_only": history_only})
        except httpx.HTTPError as exc:
            failures.add(f"transport error {type(exc).__name__}", desc, "-", str(exc))
            return
        outcomes[r.status_code] += 1
        for problem in answer_problems(r.status_code, r.headers, r.content):
            failures.add(problem, desc, r.status_code, r.content)

    with client:
        for data in real["exports"]:  # the unmodified files import (what the mutations start from is valid)
            r = client.post("/v1/sessions/import", content=data)
            assert r.status_code == 200, f"importing an unmodified export: {r.status_code} {r.text[:300]}"
        run()
    print(f"[fuzz] import: {dict(outcomes)}")
    assert not failures, f"POST /v1/sessions/import: bad answers\n{failures.report()}"


# ------------------------------------------------------------------------------------------------ hand-written


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _chunks(total: int, prefix: bytes, suffix: bytes, piece: bytes = b"a" * 65536):
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    def gen():
        yield prefix
        sent = 0
        while sent < total:
            yield piece
            sent += len(piece)
        yield suffix
    return gen


SURR = "a\\ud800b"  # a JSON escape of a lone surrogate (the body itself is valid UTF-8)
HI = '[{"role":"user","content":"hi"}]'
BIG = 8 << 20  # over the default 4 MiB body limit

# (id, method, path, body: bytes | str | callable generator | None, extra headers, expected: "4xx" | int)
CASES = [
    ("utf8-chat", "POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff\xfe\xfd"}]}', {},
     "4xx"),
    ("utf8-responses", "POST", "/v1/responses", b'{"input":"\xc3\x28","max_output_tokens":4}', {}, "4xx"),
    ("utf8-conversation-metadata", "POST", "/v1/conversations", b'{"metadata":{"k":"\xed\xa0\x80"}}', {}, "4xx"),
    ("utf8-items", "POST", "/v1/conversations/{cid}/items",
     b'{"items":[{"type":"message","role":"user","content":"\x80abc"}]}', {}, "4xx"),
    ("nested-100k-top", "POST", "/v1/chat/completions", _deep(100_000), {}, "4xx"),
    ("nested-100k-messages", "POST", "/v1/chat/completions", b'{"messages":' + _deep(100_000) + b"}", {}, "4xx"),
    ("nested-100k-input", "POST", "/v1/responses", b'{"input":' + _deep(100_000) + b"}", {}, "4xx"),
    ("nested-50k-metadata", "POST", "/v1/conversations",
     b'{"metadata":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, {}, "4xx"),
    ("nested-100k-items", "POST", "/v1/conversations/{cid}/items", b'{"items":[' + _deep(100_000) + b"]}", {},
     "4xx"),
    ("surrogate-chat-content", "POST", "/v1/chat/completions",
     f'{{"messages":[{{"role":"user","content":"{SURR}"}}],"max_tokens":4}}', {}, "4xx"),
    ("surrogate-chat-system", "POST", "/v1/chat/completions",
     f'{{"messages":[{{"role":"system","content":"{SURR}"}},{{"role":"user","content":"hi"}}],"max_tokens":4}}',
     {}, "4xx"),
    ("surrogate-chat-part", "POST", "/v1/chat/completions",
     f'{{"messages":[{{"role":"user","content":[{{"type":"text","text":"{SURR}"}}]}}],"max_tokens":4}}', {}, "4xx"),
    ("surrogate-chat-stop", "POST", "/v1/chat/completions",
     f'{{"messages":{HI},"stop":["{SURR}"],"max_tokens":4}}', {}, "4xx"),
    ("surrogate-responses-input", "POST", "/v1/responses", f'{{"input":"{SURR}","max_output_tokens":4}}', {}, "4xx"),
    ("surrogate-responses-item", "POST", "/v1/responses",
     f'{{"input":[{{"type":"message","role":"user","content":"{SURR}"}}],"max_output_tokens":4}}', {}, "4xx"),
    ("surrogate-responses-instructions", "POST", "/v1/responses",
     f'{{"input":"hi","instructions":"{SURR}","max_output_tokens":4}}', {}, "4xx"),
    ("surrogate-responses-metadata", "POST", "/v1/responses",
     f'{{"input":"hi","metadata":{{"k":"{SURR}"}},"max_output_tokens":4}}', {}, "4xx"),
    ("surrogate-conversation-metadata-value", "POST", "/v1/conversations", f'{{"metadata":{{"k":"{SURR}"}}}}', {},
     "4xx"),
    ("surrogate-conversation-metadata-key", "POST", "/v1/conversations", f'{{"metadata":{{"{SURR}":"v"}}}}', {},
     "4xx"),
    ("surrogate-conversation-item", "POST", "/v1/conversations",
     f'{{"items":[{{"type":"message","role":"user","content":"{SURR}"}}]}}', {}, "4xx"),
    ("surrogate-update-metadata", "POST", "/v1/conversations/{cid}", f'{{"metadata":{{"k":"{SURR}"}}}}', {}, "4xx"),
    ("surrogate-add-item", "POST", "/v1/conversations/{cid}/items",
     f'{{"items":[{{"type":"message","role":"user","content":"{SURR}"}}]}}', {}, "4xx"),
    ("surrogate-turn-on-conversation", "POST", "/v1/responses",
     f'{{"conversation":"{{cid}}","input":"{SURR}","max_output_tokens":4}}', {}, "4xx"),
    ("seed-2**64-chat", "POST", "/v1/chat/completions", f'{{"messages":{HI},"seed":{2**64},"max_tokens":4}}', {},
     "4xx"),
    ("seed-2**64-responses", "POST", "/v1/responses", f'{{"input":"hi","seed":{2**64},"max_output_tokens":4}}', {},
     "4xx"),
    ("seed-minus-2**63-1", "POST", "/v1/chat/completions",
     f'{{"messages":{HI},"seed":{-2**63 - 1},"max_tokens":4}}', {}, "4xx"),
    ("temperature-NaN", "POST", "/v1/chat/completions", f'{{"messages":{HI},"temperature":NaN,"max_tokens":4}}', {},
     "4xx"),
    ("top_p-Infinity", "POST", "/v1/chat/completions", f'{{"messages":{HI},"top_p":Infinity,"max_tokens":4}}', {},
     "4xx"),
    ("top_k-10**12", "POST", "/v1/chat/completions", f'{{"messages":{HI},"top_k":{10**12},"max_tokens":4}}', {},
     "any"),
    # Sampling values at the edge of float range: clamped (200) or refused (4xx), never the engine's death.
    ("temperature-1e-45", "POST", "/v1/chat/completions", f'{{"messages":{HI},"temperature":1e-45,"max_tokens":4}}',
     {}, "any"),
    ("temperature-1e-300-responses", "POST", "/v1/responses",
     '{"input":"hi","temperature":1e-300,"max_output_tokens":4}', {}, "any"),
    ("top_p-5e-324", "POST", "/v1/chat/completions", f'{{"messages":{HI},"top_p":5e-324,"max_tokens":4}}', {}, "any"),
    ("top_p-1e-300-stream", "POST", "/v1/chat/completions",
     f'{{"messages":{HI},"top_p":1e-300,"max_tokens":4,"stream":true}}', {}, "any"),
    ("min_p-1", "POST", "/v1/chat/completions", f'{{"messages":{HI},"min_p":1,"max_tokens":4}}', {}, "any"),
    ("conversation-id-int", "POST", "/v1/responses", '{"conversation":{"id":5},"input":"hi","max_output_tokens":4}',
     {}, "4xx"),
    ("conversation-id-null", "POST", "/v1/responses",
     '{"conversation":{"id":null},"input":"hi","max_output_tokens":4}', {}, "4xx"),
    ("conversation-empty-object", "POST", "/v1/responses", '{"conversation":{},"input":"hi","max_output_tokens":4}',
     {}, "4xx"),
    ("input-item-content-int", "POST", "/v1/responses",
     '{"input":[{"type":"message","role":"user","content":123}],"max_output_tokens":4}', {}, "4xx"),
    ("input-item-content-object", "POST", "/v1/responses",
     '{"input":[{"type":"message","role":"user","content":{"text":"hi"}}],"max_output_tokens":4}', {}, "4xx"),
    ("items-content-int", "POST", "/v1/conversations",
     '{"items":[{"type":"message","role":"user","content":7}]}', {}, "4xx"),
    ("traversal-conversation", "GET", "/v1/conversations/conv_..%2F..%2F..%2Fetc%2Fpasswd", None, {}, "4xx"),
    ("traversal-session", "GET", "/v1/sessions/..%2F..%2F..%2Fetc%2Fpasswd", None, {}, "4xx"),
    ("traversal-export", "GET", "/v1/sessions/..%2F..%2Fkv/export", None, {}, "4xx"),
    ("traversal-in-body", "POST", "/v1/responses",
     '{"conversation":"conv_../../../../tmp/x","input":"hi","max_output_tokens":4}', {}, "4xx"),
    ("long-id", "GET", "/v1/conversations/conv_" + "a" * 6000, None, {}, "4xx"),
    ("unknown-path-get", "GET", "/v1/nope", None, {}, "4xx"),
    ("unknown-path-post", "POST", "/v1/engines/x/completions", '{"prompt":"hi"}', {}, "4xx"),
    ("unknown-path-root", "GET", "/nope", None, {}, "4xx"),
    ("unknown-path-no-key", "GET", "/v1/nope", None, {"Authorization": None}, "4xx"),
    ("unknown-subpath", "GET", "/v1/conversations/{cid}/nope", None, {}, "4xx"),
    ("wrong-method-put-chat", "PUT", "/v1/chat/completions", f'{{"messages":{HI}}}', {}, "4xx"),
    ("wrong-method-get-chat", "GET", "/v1/chat/completions", None, {}, "4xx"),
    ("wrong-method-delete-models", "DELETE", "/v1/models", None, {}, "4xx"),
    ("wrong-method-patch-conversation", "PATCH", "/v1/conversations/{cid}", '{"metadata":{}}', {}, "4xx"),
    ("wrong-method-post-health", "POST", "/health", None, {}, "4xx"),
    ("wrong-method-get-import", "GET", "/v1/sessions/import", None, {}, "4xx"),
    ("empty-body", "POST", "/v1/chat/completions", b"", {}, "4xx"),
    ("json-null", "POST", "/v1/responses", "null", {}, "4xx"),
    ("not-an-object", "POST", "/v1/conversations", "[1,2,3]", {}, "4xx"),
    ("text-plain-content-type", "POST", "/v1/conversations", '{"metadata":{}}', {"Content-Type": "text/plain"},
     "any"),
    ("items-limit-0", "GET", "/v1/conversations/{cid}/items?limit=0", None, {}, "4xx"),
    ("items-limit-text", "GET", "/v1/conversations/{cid}/items?limit=abc", None, {}, "4xx"),
    ("items-order", "GET", "/v1/conversations/{cid}/items?order=sideways", None, {}, "4xx"),
    ("export-quantize-text", "GET", "/v1/sessions/{sid}/export?quantize=maybe", None, {}, "4xx"),
    ("import-empty", "POST", "/v1/sessions/import", b"", {}, "4xx"),
    ("import-json", "POST", "/v1/sessions/import", '{"messages":[]}', {}, "4xx"),
    ("both-conversation-and-previous", "POST", "/v1/responses",
     '{"conversation":"{cid}","previous_response_id":"{rid}","input":"hi","max_output_tokens":4}', {}, "4xx"),
    ("auth-latin1-key", "GET", "/v1/models", None, {"Authorization": b"Bearer \xff\xfe"}, 401),
    # Oversized bodies the route would otherwise reject (or accept) cheaply: without a limit while the body streams
    # in, the server holds all of it in memory; the answer must be 413 either way.
    ("chunked-oversized-chat", "POST", "/v1/chat/completions", _chunks(BIG, b'{"messages":"', b'"}'), {}, 413),
    ("chunked-oversized-conversation", "POST", "/v1/conversations", _chunks(BIG, b'{"metadata":{"k":"', b'"}}'), {},
     413),
    ("chunked-oversized-items", "POST", "/v1/conversations/{cid}/items", _chunks(BIG, b'{"items":"', b'"}'), {}, 413),
    ("chunked-oversized-garbage", "POST", "/v1/responses", _chunks(BIG, b"", b""), {}, 413),
    ("chunked-oversized-no-key", "POST", "/v1/chat/completions", _chunks(BIG, b'{"messages":"', b'"}'),
     {"Authorization": None}, "4xx"),
    ("content-length-oversized", "POST", "/v1/chat/completions", b"{" + b" " * (5 << 20) + b"}", {}, 413),
    ("tokenizer-heavy-3.9MB", "POST", "/v1/chat/completions",
     '{"messages":[{"role":"user","content":"' + "ab " * 1_300_000 + '"}],"max_tokens":4}', {}, "4xx"),
    ("tokenizer-heavy-100k-messages", "POST", "/v1/chat/completions",
     '{"messages":[' + ",".join(['{"role":"user","content":"a"}'] * 100_000) + '],"max_tokens":4}', {}, "4xx"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_handwritten_bad_request(server, fresh, case):
    name, method, path, body, extra, expected = case
    fill = {"{cid}": fresh["cid"], "{sid}": fresh["sid"], "{rid}": fresh["rid"]}
    for k, v in fill.items():
        path = path.replace(k, v)
        if isinstance(body, str):
            body = body.replace(k, v)
    headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    headers.update(extra)
    headers = {k: v for k, v in headers.items() if v is not None}
    if callable(body):
        body = body()
    elif isinstance(body, str):
        body = body.encode("utf-8")
    t0 = time.perf_counter()
    try:
        r = httpx.request(method, f"{server.url}{path}", content=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        dead = server.probe()
        if dead:
            server.restart(f"after {name}: {dead}")
        pytest.fail(f"{name}: {method} {path[:80]}: no (complete) answer ({type(exc).__name__}: {exc})"
                    + (f"; afterwards the server stopped serving ({dead}); restarted for the next tests" if dead
                       else ""))
    took = time.perf_counter() - t0
    problems = answer_problems(r.status_code, r.headers, r.content)
    if expected == "4xx" and not 400 <= r.status_code < 500:
        problems.append(f"expected a 4xx, got {r.status_code}")
    elif isinstance(expected, int) and r.status_code != expected:
        problems.append(f"expected {expected}, got {r.status_code}")
    if problems or expected == "any":
        dead = server.probe()
        if dead:
            problems.append(f"afterwards the server stopped serving ({dead}); restarted for the next tests")
            server.restart(f"after {name}: {dead}")
    assert not problems, f"{name}: {method} {path[:80]} -> {r.status_code} {r.text[:300]!r} ({took:.1f} s): " \
                         f"{'; '.join(problems)}"


# ------------------------------------------------------------------------------------------------ afterwards


def test_server_still_serves(server):
    h = {"Authorization": f"Bearer {KEY_A}"}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=h, timeout=120,
                   json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_health_stayed_responsive(server):
    """Last in the module: every /health poll during all the tests above was answered within 1 s (200, or 503
    while an engine a request had killed was dead; restarts are not polled)."""
    time.sleep(0.5)
    samples = list(server.poller.samples)
    bad = server.poller.bad()
    worst = max((s[1] for s in samples), default=float("nan"))
    dead = sum(1 for s in samples if s[2] == "503")
    print(f"[fuzz] /health: {len(samples)} polls, worst {worst:.3f} s, {len(bad)} bad, {dead} answered 503; "
          f"restarts {server.restarts}; 503 overload answers seen: {len(server.overloaded)} {server.overloaded[:3]}")
    assert len(samples) > 10
    assert not bad, f"{len(bad)} of {len(samples)} /health polls were not answered within {HEALTH_LIMIT_S} s " \
                    f"(t, latency, outcome): {[(round(t, 1), round(lat, 3), o) for t, lat, o in bad[:10]]}"
