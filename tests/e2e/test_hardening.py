"""One bad request or file never takes down the engine, exhausts memory or loses history (a real server process).

Each test reproduces a defect first seen by attacking a real `gemma-sessions serve` with two API keys: a forged
session file, bodies that are too large or malformed, a refused or abandoned turn, ownership through metadata,
responses lost by a restart, a shutdown that hung on a runaway generation.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import zstandard
from safetensors.torch import load, save
from servers import KEY_A, KEY_B, Server, free_port

from gemma_sessions.sessions.sessionfile import _checksum

pytestmark = pytest.mark.slow
CAP = 300  # the server's --max-output-tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_path):
    s = Server(tmp_path_factory.mktemp("store"), free_port(), extra=["--max-output-tokens", str(CAP)]).start()
    yield s
    s.stop()


def key_hash(key: str) -> str:
    """The owner id the server derives from an API key (what a forger would write into metadata)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _post(server, path: str, key: str = KEY_A, headers: dict | None = None, **kw) -> httpx.Response:
    kw.setdefault("timeout", 120)
    return httpx.post(f"{server.url}{path}", headers=server.headers(key) | (headers or {}), **kw)


def _get(server, path: str, key: str = KEY_A) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers=server.headers(key), timeout=60)


def _error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _conversation(server, turns: list[str], key: str = KEY_A, max_tokens: int = 6) -> str:
    cid = _post(server, "/v1/conversations", key, json={}).json()["id"]
    for text in turns:
        r = _post(server, "/v1/responses", key, json={"conversation": cid, "input": text,
                                                      "max_output_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
    return cid


def _items(server, cid: str, key: str = KEY_A) -> list[tuple[str, str]]:
    data = _get(server, f"/v1/conversations/{cid}/items?order=asc&limit=100", key).json()["data"]
    return [(i["role"], i["content"][0]["text"]) for i in data]


def _pages(server, key: str = KEY_A, order: str = "asc", limit: int = 100) -> list[dict]:
    """Every page of ``key``'s GET /v1/sessions, each checked: its first_id / last_id, has_more false only last."""
    pages, after = [], ""
    while True:
        r = _get(server, f"/v1/sessions?limit={limit}&order={order}{after}", key)
        assert r.status_code == 200, r.text
        page = r.json()
        ids = [s["id"] for s in page["data"]]
        assert page["object"] == "list" and len(ids) <= limit and (ids or not pages)
        assert (page["first_id"], page["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
        pages.append(page)
        if not page["has_more"]:
            return pages
        assert len(ids) == limit and len(pages) < 1000
        after = f"&after={ids[-1]}"


def _sessions(server, key: str = KEY_A) -> set[str]:
    return {s["id"] for page in _pages(server, key) for s in page["data"]}


def _idle(server, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(f"{server.url}/health", timeout=5).json()
        if h["running"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the engine did not go idle")


def _forge(data: bytes, change) -> bytes:
    """A session file whose tensors or metadata ``change`` edited, with a recomputed (valid) checksum."""
    n = int.from_bytes(data[:8], "little")
    meta = dict(json.loads(data[8:8 + n])["__metadata__"])
    tensors = load(data)
    change(tensors, meta)
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def _export(server, cid: str) -> bytes:
    r = _get(server, f"/v1/sessions/{cid[5:]}/export")
    assert r.status_code == 200
    return r.content


# ------------------------------------------------------------------------------------------------ forged files


def _poison(value: float):
    def change(tensors, meta):
        tensors["kv.g0"] = tensors["kv.g0"].clone()
        tensors["kv.g0"].view(-1)[::7] = value
    return change


def _set_meta(key: str, value):
    def change(tensors, meta):
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return change


def _drop_tensor(name: str):
    def change(tensors, meta):
        tensors.pop(name)
    return change


def _index(value: int):
    def change(tensors, meta):
        tensors["kv.g0.index"] = tensors["kv.g0.index"].clone()
        tensors["kv.g0.index"][-1] = value
    return change


def _extra(tensors, meta):
    tensors["payload"] = torch.zeros(4)


FORGERIES = {
    "nan": _poison(float("nan")), "inf": _poison(float("inf")), "huge": _poison(1e30),
    "missing kv.g0": _drop_tensor("kv.g0"), "bad layout": _set_meta("layout", "{not json"),
    "session is a list": _set_meta("session", "[1, 2]"), "format_version x": _set_meta("format_version", "x"),
    "no tokenizer fingerprint": _set_meta("tokenizer_fingerprint", None), "block index 1e9": _index(10 ** 9),
    "unnamed tensor": _extra,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_session_file_is_refused_and_harms_nobody(server, forgery):
    cid = _conversation(server, ["Tell me about the sea."])
    before = _sessions(server)
    bad = _forge(_export(server, cid), FORGERIES[forgery])
    err = _error_shape(_post(server, "/v1/sessions/import", content=bad), 400)
    assert "/tmp" not in err["message"] and "session" in err["message"]
    assert _sessions(server) == before, "a refused import left a session behind"
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = _post(server, "/v1/responses", json={"conversation": cid, "input": "And the sky?",
                                             "max_output_tokens": 4, "temperature": 0})
    assert r.status_code == 200  # the engine loop is alive for everyone


def test_imported_kv_is_private_to_its_session(tmp_path, real_model_path):
    """Another key's request with the same text must compute its own KV, not adopt the imported one."""
    messages = [{"role": "user", "content": "A shared opening line that is long enough to fill whole blocks of "
                                            "the cache, so that the prefix cache could match it."}]
    first = Server(tmp_path / "one", free_port()).start()
    try:
        cid = _post(first, "/v1/conversations", json={"items": [{"type": "message", **messages[0]}]}).json()["id"]
        _post(first, "/v1/responses", json={"conversation": cid, "input": "Go on.", "max_output_tokens": 4})
        data = _export(first, cid)
    finally:
        first.stop()
    fresh = Server(tmp_path / "two", free_port()).start()
    try:
        r = _post(fresh, "/v1/sessions/import", KEY_B, content=data)
        assert r.status_code == 200, r.text
        out = _post(fresh, "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}).json()
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        again = _post(fresh, "/v1/chat/completions", json={"messages": messages, "max_tokens": 4}).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # its own KV is shared as usual
    finally:
        fresh.stop()


def _bomb(prefix: bytes, gib: int) -> bytes:
    """``prefix`` then ``gib`` GiB of zeros, zstd-compressed (tens of KB)."""
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    return comp.compress(prefix) + b"".join(comp.compress(zeros) for _ in range(gib << 10)) + comp.flush()


def test_a_decompression_bomb_is_refused_within_bounded_memory(server):
    header = json.dumps({"__metadata__": {"format": "gemma-sessions/session"},
                         "kv.g0": {"dtype": "F32", "shape": [1 << 29], "data_offsets": [0, 1 << 31]}}).encode()
    for bomb in (_bomb(b"", 2), _bomb(len(header).to_bytes(8, "little") + header, 2)):
        assert len(bomb) < 1 << 20
        rss = server.rss()
        _error_shape(_post(server, "/v1/sessions/import", content=bomb), 400)
        assert server.rss() - rss < 64 << 20


def test_an_export_over_the_body_limit_round_trips(server):
    cid = _conversation(server, ["word " * 600], max_tokens=4)
    data = _export(server, cid)
    assert len(data) > 4 << 20  # over the ordinary body limit
    r = _post(server, "/v1/sessions/import", content=data)
    assert r.status_code == 200, r.text
    assert r.json()["stats"]["tokens"] == _get(server, f"/v1/sessions/{cid[5:]}").json()["stats"]["tokens"]


# ------------------------------------------------------------------------------------------------ bodies


def _chunked(server, key: str | None, chunks: int, chunk: bytes) -> tuple[bytes, int]:
    """POST a chunked body of ``chunks`` chunks over a raw socket; (the response head, chunks sent)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent = 0
    try:
        for _ in range(chunks):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += 1
            sock.settimeout(0.001)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered before the body ended
            except (BlockingIOError, TimeoutError, socket.timeout):
                pass
            finally:
                sock.settimeout(30)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            part = sock.recv(4096)
            if not part:
                break
            head += part
    finally:
        sock.close()
    return head, sent


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server):
    rss = server.rss()
    head, sent = _chunked(server, KEY_A, 150, b"[" * (1 << 20))  # 150 MB announced by nothing
    assert head.startswith(b"HTTP/1.1 413"), head
    assert sent < 40 and server.rss() - rss < 64 << 20
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_no_key_is_refused_before_the_body_is_read(server):
    head, sent = _chunked(server, None, 100, b" " * (1 << 20))
    assert head.startswith(b"HTTP/1.1 401"), head
    assert sent < 20


def test_a_huge_message_is_refused_and_tokenizing_never_blocks_health(server):
    slow: list[float] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            slow.append(time.perf_counter() - t0)
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    try:
        err = _error_shape(_post(server, "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x" * (3 << 20)}]}), 400)
        assert err["code"] == "context_length_exceeded"
        # just under the character bound: tokenized (on the thread pool) and refused by its token count
        limit = 8 * 32768
        err = _error_shape(_post(server, "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "ab " * (limit // 3 - 10)}]}), 400)
        assert "context" in err["message"]
    finally:
        stop.set()
        t.join()
    assert slow and max(slow) < 1.0, f"/health took {max(slow):.2f} s"


@pytest.mark.parametrize("raw,status", [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    (b"[" * 100_000 + b"]" * 100_000, 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": -(2 ** 64)}).encode(), 400),
])
def test_malformed_bodies_are_400_in_openai_shape(server, raw, status):
    _error_shape(_post(server, "/v1/chat/completions", content=raw,
                       headers={"Content-Type": "application/json"}), status)


def test_other_errors_are_in_openai_shape(server):
    _error_shape(_post(server, "/v1/responses", json={"conversation": {"id": 5}, "input": "x"}), 400)
    _error_shape(_get(server, "/v1/nowhere"), 404)
    _error_shape(httpx.get(f"{server.url}/nowhere"), 404)
    _error_shape(httpx.put(f"{server.url}/v1/chat/completions", headers=server.headers()), 405)
    _error_shape(_get(server, "/v1/models", key="wrong"), 401)
    ok = _post(server, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "seed": 2 ** 63 - 1, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_lone_surrogate_is_refused_and_the_conversation_is_unharmed(server):
    cid = _conversation(server, ["Hello."])
    before = _items(server, cid)
    bodies = [("/v1/responses", {"conversation": cid, "input": "bad \ud800 text"}),
              ("/v1/responses", {"input": [{"role": "user", "content": "\udfff"}]}),
              (f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "x\ud800"}]}),
              (f"/v1/conversations/{cid}", {"metadata": {"k": "\ud800"}}),
              ("/v1/conversations", {"metadata": {"\ud800": "v"}}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]})]
    for path, body in bodies:
        # json.dumps writes the surrogate as the escape "\ud800": valid JSON, invalid text
        _error_shape(_post(server, path, content=json.dumps(body), headers={"Content-Type": "application/json"}),
                     400)
    assert _items(server, cid) == before
    assert _post(server, "/v1/responses", json={"conversation": cid, "input": "Still there?",
                                                "max_output_tokens": 4}).status_code == 200


# ------------------------------------------------------------------------------------------------ ownership


def test_ownership_cannot_move_through_metadata(server):
    cid = _conversation(server, [])
    r = _post(server, f"/v1/conversations/{cid}", json={"metadata": {"_owner": key_hash(KEY_B)}})
    assert r.status_code == 200
    assert _get(server, f"/v1/conversations/{cid}").status_code == 200
    assert _get(server, f"/v1/conversations/{cid}", KEY_B).status_code == 404
    made = _post(server, "/v1/conversations", KEY_B, json={"metadata": {"_owner": key_hash(KEY_A)}}).json()
    assert _get(server, f"/v1/conversations/{made['id']}", KEY_A).status_code == 404
    assert _get(server, f"/v1/conversations/{made['id']}", KEY_B).status_code == 200


def test_the_session_list_pages_and_keeps_to_its_key(server):
    """GET /v1/sessions pages like OpenAI's lists: pages of 2 visit each of a key's sessions once, by (created_at, id)
    both ways (asc by default); a bad limit or order is a 400 in OpenAI's shape; an ``after`` that is another key's
    session is refused with the very words an unknown id gets; another key's sessions never appear."""
    mine = [_post(server, "/v1/conversations", KEY_B, json={}).json()["id"][5:] for _ in range(5)]
    theirs = _post(server, "/v1/conversations", KEY_A, json={}).json()["id"][5:]
    asc = [s for page in _pages(server, KEY_B, "asc", limit=2) for s in page["data"]]
    ids = [s["id"] for s in asc]
    assert len(ids) == len(set(ids)) >= 5 and ids[-5:] == mine and theirs not in ids
    assert ids == [s["id"] for s in sorted(asc, key=lambda s: (s["created_at"], s["id"]))]
    assert [s["id"] for page in _pages(server, KEY_B, "desc", limit=2) for s in page["data"]] == ids[::-1]
    first = _get(server, "/v1/sessions", KEY_B).json()  # the defaults: 20, oldest first
    assert [s["id"] for s in first["data"]] == ids[:20] and first["has_more"] == (len(ids) > 20)
    assert {"id", "object", "created_at", "metadata", "stats", "last_used_at"} <= set(first["data"][0])
    assert not set(mine) & _sessions(server, KEY_A) and theirs in _sessions(server, KEY_A)
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("limit=-3", "limit"),
                         ("limit=many", "query.limit"), ("order=sideways", "order")):
        err = _error_shape(_get(server, f"/v1/sessions?{query}", KEY_B), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param, query
    unknown = _error_shape(_get(server, f"/v1/sessions?after={'f' * 32}", KEY_B), 400)
    foreign = _error_shape(_get(server, f"/v1/sessions?after={theirs}", KEY_B), 400)
    assert unknown == foreign and unknown["param"] == "after"
    assert _get(server, f"/v1/sessions?after={theirs}", KEY_A).status_code == 200  # its own key may


def test_an_import_belongs_to_the_key_that_imported_it(server):
    cid = _conversation(server, ["Mine."])
    r = _post(server, "/v1/sessions/import", KEY_B, content=_export(server, cid))
    sid = r.json()["id"]
    assert _get(server, f"/v1/sessions/{sid}", KEY_B).status_code == 200
    assert _get(server, f"/v1/sessions/{sid}", KEY_A).status_code == 404


# ------------------------------------------------------------------------------------------------ turns


def test_a_too_long_message_keeps_the_history(server):
    cid = _conversation(server, ["One.", "Two."])
    before = _items(server, cid)
    r = _post(server, "/v1/responses", json={"conversation": cid, "input": "x " * 40000})
    assert r.status_code == 400
    assert _items(server, cid) == before
    _post(server, "/v1/responses", json={"conversation": cid, "input": "Three.", "max_output_tokens": 4})
    after = _items(server, cid)
    assert after[:4] == before and after[4] == ("user", "Three.") and len(after) == 6


def test_max_output_tokens_is_capped_and_keeps_history(server):
    cid = _conversation(server, ["One."])
    before = _items(server, cid)
    r = _post(server, "/v1/responses", json={"conversation": cid, "input": "Write at length.",
                                             "max_output_tokens": 10 ** 6, "temperature": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["output_tokens"] <= CAP
    assert _items(server, cid)[:2] == before
    chat = _post(server, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Go on."}],
                                                       "max_tokens": 10 ** 9, "seed": 4}).json()
    assert chat["usage"]["completion_tokens"] <= CAP


def test_a_client_that_leaves_a_non_streaming_turn_cancels_it(server):
    cid = _conversation(server, ["One."])
    before = _items(server, cid)
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/responses", json={"conversation": cid, "input": "Write a very long essay.",
                                             "max_output_tokens": CAP, "temperature": 1.0},
              timeout=httpx.Timeout(60, read=0.5))
    _idle(server)
    assert _items(server, cid) == before, "the abandoned turn ran to its end and was committed"
    r = httpx.post(f"{server.url}/v1/responses", json={"conversation": cid, "input": "Short.",
                                                        "max_output_tokens": 2},
                   headers=server.headers() | {"x-gemma-wait": "0"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [True, False])
def test_store_false_leaves_no_session_even_when_the_client_leaves(server, stream):
    before = _sessions(server)
    body = {"input": "Write a very long essay.", "store": False, "max_output_tokens": CAP, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=server.headers(),
                          timeout=60) as r:
            for _ in r.iter_lines():
                break
    else:
        with pytest.raises(httpx.ReadTimeout):
            _post(server, "/v1/responses", json=body, timeout=httpx.Timeout(60, read=0.5))
    _idle(server)
    assert _sessions(server) == before


def test_health_reports_liveness_without_the_engine_loop(server):
    h = httpx.get(f"{server.url}/health", timeout=5)
    assert h.status_code == 200 and h.json()["status"] == "ok"


# ------------------------------------------------------------------------------------------------ restarts


def test_responses_and_history_survive_a_restart_and_sigterm_is_bounded(tmp_path, real_model_path):
    srv = Server(tmp_path / "store", free_port(), extra=["--max-output-tokens", "5000",
                                                         "--shutdown-grace", "2"]).start()
    try:
        cid = _conversation(srv, ["One.", "Two."])
        assert _post(srv, "/v1/responses", json={"conversation": cid, "input": "x " * 40000}).status_code == 400
        _post(srv, "/v1/responses", json={"conversation": cid, "input": "Three.", "max_output_tokens": 4})
        r1 = _post(srv, "/v1/responses", json={"input": "Count: one, two,", "max_output_tokens": 6}).json()
        history = _items(srv, cid)
        # a runaway generation on the conversation, then SIGTERM
        stream = httpx.stream("POST", f"{srv.url}/v1/responses", headers=srv.headers(), timeout=60,
                              json={"conversation": cid, "input": "Write forever.", "max_output_tokens": 5000,
                                    "stream": True, "temperature": 1.0})
        resp = stream.__enter__()
        next(resp.iter_lines())
        t0 = time.time()
        code = srv.stop(__import__("signal").SIGTERM, timeout=30)
        took = time.time() - t0
        log = srv.proc.stdout.read()
        try:
            stream.__exit__(None, None, None)
        except httpx.HTTPError:
            pass
        assert code == 0, log
        assert took < 20, f"shutdown took {took:.1f} s"
        assert "CancelledError" not in log and "Traceback" not in log, log
    finally:
        srv.stop()
    srv = Server(tmp_path / "store", free_port()).start()
    try:
        assert _items(srv, cid) == history  # the cancelled turn left nothing, the rest is in order
        r2 = _post(srv, "/v1/responses", json={"previous_response_id": r1["id"], "input": "Go on.",
                                               "max_output_tokens": 4})
        assert r2.status_code == 200, r2.text
        assert _get(srv, f"/v1/responses/{r1['id']}").json()["id"] == r1["id"]
        assert _get(srv, f"/v1/responses/{r1['id']}", KEY_B).status_code == 404
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ one bad session


def _stream_turn(server, cid: str, text: str) -> str:
    body = {"conversation": cid, "input": text, "max_output_tokens": 16, "temperature": 0, "stream": True}
    out = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=server.headers(),
                      timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "response.output_text.delta":
                    out.append(event["delta"])
                assert event["type"] != "response.failed", event
    return "".join(out)


def test_one_bad_session_harms_none_of_sixteen_healthy_ones(tmp_path, real_model_path):
    """16 sessions stream while one is fed a poisoned KV file, a huge body, an overflowing and then abandoned
    turn and invalid text: the 16 produce exactly the tokens they produce alone (float32: greedy is exact)."""
    srv = Server(tmp_path / "store", free_port(), extra=["--dtype", "float32", "--max-output-tokens", "64"]).start()
    try:
        topics = ["rivers", "bread", "chess", "owls", "glass", "maps", "tea", "bells", "kites", "salt", "clocks",
                  "ferns", "ink", "wool", "coral", "lamps"]
        convs = []
        for t in topics:
            items = [{"type": "message", "role": "user", "content": f"Let us talk about {t}."},
                     {"type": "message", "role": "assistant", "content": f"Gladly: {t} are interesting."}]
            convs.append(_post(srv, "/v1/conversations", json={"items": items}).json()["id"])
        alone = []
        for cid in convs:  # each alone, on a fork (same history), one after another
            fork = _post(srv, f"/v1/sessions/{cid[5:]}/fork").json()["conversation_id"]
            alone.append(_stream_turn(srv, fork, "Tell me one fact."))
        bad = _conversation(srv, ["Hello."])
        bad_items = _items(srv, bad)
        poisoned = _forge(_export(srv, bad), _poison(float("nan")))

        def attack():
            assert _post(srv, "/v1/sessions/import", content=poisoned).status_code == 400
            head, _ = _chunked(srv, KEY_A, 200, b"[" * (1 << 20))
            assert head.startswith(b"HTTP/1.1 413")
            assert _post(srv, "/v1/responses", json={"conversation": bad, "input": "x " * 40000}).status_code == 400
            with httpx.stream("POST", f"{srv.url}/v1/responses", headers=srv.headers(), timeout=60,
                              json={"conversation": bad, "input": "Write forever.", "max_output_tokens": 64,
                                    "stream": True}) as r:
                for _ in r.iter_lines():
                    break
            r = _post(srv, "/v1/responses", content=json.dumps({"conversation": bad, "input": "\ud800"}),
                      headers={"Content-Type": "application/json"})
            assert r.status_code == 400

        results: dict[int, str] = {}

        def healthy(i: int) -> None:
            results[i] = _stream_turn(srv, convs[i], "Tell me one fact.")

        threads = [threading.Thread(target=healthy, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        attack()
        for t in threads:
            t.join()
        assert [results[i] for i in range(16)] == alone
        _idle(srv)
        assert _items(srv, bad) == bad_items
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()
