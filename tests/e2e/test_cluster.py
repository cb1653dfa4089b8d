"""Scale-out end to end: a real redis-server, two real `gemma-sessions serve` replicas over it (``--store redis://``)
and a real nginx in front hashing on ``X-Session-Id`` (deploy/cluster.py starts them, once for the module), driven by
the official openai client.

What must hold (issue 20): conversations stick to their replica and reuse its KV; kill -9 of a replica mid-stream
loses no completed turn and leaves no half turn, and its conversations continue on the other replica from the KV in
Redis with the same greedy output; a replica whose memory is stale reloads, and a turn it generated from a stale
version is refused; Redis restarted (AOF) or gone for a while loses and duplicates nothing (503 + Retry-After while
it is gone); an unreachable Redis at start is a clear error; requests without the header work on any replica.

The model is a tiny random Gemma 3 (float32; sliding window 8, shorter than every history) written to a temp dir:
greedy output is exact, so "same output as without the failure" compares text against an in-process run, and a wrong
KV (positions, window, a lost or doubled turn) changes it. Its weights are small (std 0.02), so the greedy text varies
with the context instead of repeating one token; its global layer's attention counts double (norm weights 2.0), so
every reply depends on the whole history, not only on the window's last tokens (with all weights small, changing a
conversation's first message changed its third reply in only 3 of 8 conversations; with it, in 8 of 8); and <eos> and
<end_of_turn> have zero embeddings (logit 0 through the tied head), so greedy never ends a reply early: every turn
runs to its max tokens, and a long one is surely still running when its replica is killed or paused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from gemma_sessions.config import ModelConfig
from gemma_sessions.testing import random_tensors, tiny_hf_config, tiny_tokenizer, write_sentencepiece_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from cluster import Cluster, free_port  # noqa: E402  (deploy/ is scripts, not a package)

pytestmark = pytest.mark.slow

KEY = "cluster-key-" + "z" * 20
MODEL = "tiny-gemma3"
BLOCK = 16         # the engine's page size: KV restored from blobs is whole pages
MAX = 12           # output tokens of a normal turn
LONG = 400         # output tokens of a turn that must still be running when its replica is killed or paused
N_CONV = 8
WORDS = ["sea", "moon", "river", "stone", "garden", "winter", "lamp", "bridge"]


def prompts(tag: str, i: int) -> list[str]:
    """Conversation i's user messages in the test ``tag``: distinct per conversation and per test, so no history is a
    prefix of another's and every cached token a turn reports is its own conversation's."""
    return [f"{tag} conversation {i} turn {t}: tell me about the {WORDS[(i + t) % len(WORDS)]}" for t in range(6)]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma3")
    config = dict(tiny_hf_config("gemma3"), max_position_embeddings=4096)
    tensors = random_tensors(ModelConfig.from_hf_config(config), seed=1, std=0.02)
    for name in ("layers.5.post_attention_layernorm", "layers.5.self_attn.q_norm", "layers.5.self_attn.k_norm"):
        tensors[name] = torch.full_like(tensors[name], 2.0)  # layer 5 is the global one ((i + 1) % 6 == 0)
    tensors["embed_tokens"][[config["eos_token_id"], 5]] = 0.0  # <eos>, <end_of_turn> (tiny_tokenizer's id 5)
    save_file({f"model.{k}.weight": v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    write_sentencepiece_model(path / "tokenizer.model", tiny_tokenizer(config["vocab_size"]))
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """``reference(texts, max_tokens)``: the replies of a conversation with no failure, computed in this process by
    the Python API on its own engine (memory only: no server, store or KV of the cluster takes part), memoized."""
    import gemma_sessions as gs
    from gemma_sessions.sampling import SamplingParams

    engine = gs.Engine(gs.load_model(str(model_dir), dtype="float32", progress=False), kv_cache_bytes=32 << 20)
    manager = gs.SessionManager(engine)
    memo: dict[tuple, list[str]] = {}

    def run(texts: list[str], max_tokens: list[int]) -> list[str]:
        key = (tuple(texts), tuple(max_tokens))
        if key not in memo:
            s = manager.create()
            memo[key] = [s.send(t, sampling=SamplingParams(temperature=0.0, max_tokens=n)).text
                         for t, n in zip(texts, max_tokens)]
            manager.delete(s.id)
        return memo[key]

    yield run
    manager.close()
    engine.close()


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    serve = ["--dtype", "float32", "--kv-cache-bytes", str(32 << 20), "--api-key", KEY,
             "--served-model-name", MODEL, "--shutdown-grace", "1"]
    c = Cluster(tmp_path_factory.mktemp("cluster"), n=2, model=str(model_dir), serve_args=serve).start()
    try:
        yield c
    finally:
        c.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def headers(sid: str | None = None, key: str | None = None) -> dict:
    h = {"Authorization": f"Bearer {KEY}"}
    if sid:
        h["X-Session-Id"] = sid
    if key:
        h["Idempotency-Key"] = key
    return h


# ------------------------------------------------------------------------------------------------ helpers


def turn(url: str, conv: str, text: str, max_tokens: int = MAX, sticky: bool = True, key: str | None = None):
    """One turn through the openai client: (response, the replica that answered)."""
    extra = {"X-Session-Id": conv} if sticky else {}
    if key:
        extra["Idempotency-Key"] = key
    raw = client(url).responses.with_raw_response.create(model=MODEL, conversation=conv, input=text,
                                                         max_output_tokens=max_tokens, temperature=0,
                                                         extra_headers=extra)
    return raw.parse(), raw.headers["x-replica"]


def turn_retrying(url: str, conv: str, text: str, max_tokens: int = MAX, key: str | None = None,
                  timeout: float = 20.0):
    """A turn as a careful client sends it: one Idempotency-Key, resent while the answer is 503 (Retry-After)."""
    key, deadline = key or uuid.uuid4().hex, time.monotonic() + timeout
    while True:
        try:
            return turn(url, conv, text, max_tokens, key=key)
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(min(float(exc.response.headers.get("retry-after", "1")), 0.5))


def replica_of(url: str, conv: str) -> str:
    r = httpx.get(f"{url}/v1/conversations/{conv}", headers=headers(conv), timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-replica"]


def new_conversations(url: str, per_replica: int, names=("r1", "r2")) -> dict[str, list[str]]:
    """Conversations created through nginx until each replica is the hash target of ``per_replica`` of them."""
    placed: dict[str, list[str]] = {n: [] for n in names}
    for _ in range(20 * per_replica):
        conv = client(url).conversations.create().id
        where = replica_of(url, conv)
        if len(placed[where]) < per_replica:
            placed[where].append(conv)
        else:
            httpx.delete(f"{url}/v1/conversations/{conv}", headers=headers(conv), timeout=30)
        if all(len(v) == per_replica for v in placed.values()):
            return placed
    raise AssertionError(f"consistent hashing never placed {per_replica} on each replica: {placed}")


def items(url: str, conv: str, timeout: float = 20.0) -> list[tuple[str, str]]:
    """The conversation's stored messages, oldest first, as (role, text) (asked again while the answer is 503)."""
    deadline = time.monotonic() + timeout
    while (r := httpx.get(f"{url}/v1/conversations/{conv}/items", params={"order": "asc", "limit": 100},
                          headers=headers(conv), timeout=30)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    return [(d["role"], d["content"][0]["text"]) for d in r.json()["data"]]


def previous_context(prev) -> int:
    return prev.usage.input_tokens + prev.usage.output_tokens


def assert_reused(prev, cur) -> None:
    """``cur`` reused the KV of everything before it (whole pages of it) and prefilled about the new message only."""
    context, cached = previous_context(prev), cur.usage.input_tokens_details.cached_tokens
    assert context - BLOCK < cached <= context, (cached, context)


class SSE:
    """A streamed turn read event by event with httpx (so the test decides when to kill or pause a replica)."""

    def __init__(self, url: str, conv: str, text: str, max_tokens: int, sticky: bool = True,
                 key: str | None = None):
        body = {"model": MODEL, "conversation": conv, "input": text, "max_output_tokens": max_tokens,
                "temperature": 0, "stream": True}
        self._cm = httpx.stream("POST", f"{url}/v1/responses", json=body,
                                headers=headers(conv if sticky else None, key), timeout=60)
        self.response = self._cm.__enter__()
        self._lines = self.response.iter_lines()
        self.events: list[dict] = []

    def next_event(self) -> dict | None:
        try:
            for line in self._lines:
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    return self.events[-1]
        except (httpx.HTTPError, json.JSONDecodeError):  # the replica died under the stream
            pass
        return None

    def until(self, kind: str) -> dict | None:
        while (e := self.next_event()) is not None:
            if e["type"] == kind:
                return e
        return None

    def rest(self) -> list[str]:
        while self.next_event() is not None:
            pass
        self.close()
        return [e["type"] for e in self.events]

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def max_tokens_of(i: int) -> list[int]:
    """Conversation 0's third turn is long (it is the one running when its replica is killed)."""
    return [LONG if (i, t) == (0, 2) else MAX for t in range(6)]


# ------------------------------------------------------------------------------------------------ tests


def test_unreachable_redis_at_start_is_a_clear_error(model_dir):
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "gemma_sessions.cli", "serve", "--model", str(model_dir),
                           "--store", url, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert url.split("://")[1].split("/")[0] in proc.stderr and "error:" in proc.stderr, proc.stderr


def test_replica_name_defaults_to_host_port_and_is_checked(model_dir):
    bad = subprocess.run([sys.executable, "-m", "gemma_sessions.cli", "serve", "--model", str(model_dir), "--no-store",
                          "--replica-name", "r 1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--replica-name" in bad.stderr, bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_sessions.cli", "serve", "--model", str(model_dir),
                             "--dtype", "float32", "--no-store", "--kv-cache-bytes", str(8 << 20), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert r.headers["x-replica"] == f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_every_response_names_its_replica_and_headerless_requests_spread(cluster, reference):
    seen = set()
    for _ in range(16):
        r = httpx.post(f"{cluster.url}/v1/chat/completions", headers=headers(), timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
                             "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-replica"])
    assert seen == {"r1", "r2"}  # no header: a random key per request (P(one replica 16 times) = 2^-15)
    for r in cluster.replicas:
        assert httpx.get(f"{r.url}/health").headers["x-replica"] == r.name
        assert httpx.get(f"{r.url}/v1/models").headers["x-replica"] == r.name  # an error (401) too
        assert httpx.get(f"{cluster.url}/v1/nothing", headers=headers()).headers["x-replica"] in ("r1", "r2")
    # a conversation continued without the header, on whichever replica each request lands: correct, from Redis
    conv = client(cluster.url).conversations.create().id
    texts = prompts("headerless", 0)[:4]
    outs = [turn(cluster.url, conv, text, sticky=False)[0].output_text for text in texts]
    assert outs == reference(texts, [MAX] * 4)


def test_reads_on_a_replica_that_missed_turns_are_current(cluster):
    """A replica that holds a conversation in memory and missed later turns (they went to the other one) answers a
    read (items, the conversation, the session) from the store's current version, not from its stale copy."""
    r1, r2 = cluster.replica("r1"), cluster.replica("r2")
    conv = client(cluster.url).conversations.create().id
    texts = prompts("reads", 0)[:3]
    turn(r1.url, conv, texts[0], sticky=False)
    assert len(items(r1.url, conv)) == 2  # r1 holds it in memory now
    for text in texts[1:]:
        turn(r2.url, conv, text, sticky=False)
    assert [t for r, t in items(r1.url, conv) if r == "user"] == texts
    session = httpx.get(f"{r1.url}/v1/sessions/{conv[5:]}", headers=headers(), timeout=30).json()
    assert session["stats"]["turns"] == 3


def test_conversations_stick_to_their_replica_and_reuse_kv(cluster, reference):
    placed = new_conversations(cluster.url, N_CONV // 2)
    convs = [c for pair in zip(placed["r1"], placed["r2"]) for c in pair]  # conversation i: r1 if i is even
    outputs: dict[int, list[str]] = {i: [] for i in range(N_CONV)}
    prev = {}
    for t in range(3):
        for i, conv in enumerate(convs):
            resp, name = turn(cluster.url, conv, prompts("stick", i)[t], max_tokens_of(i)[t])
            assert name == ("r1" if i % 2 == 0 else "r2")  # sticky: the hash target, every turn
            assert resp.usage.output_tokens > 0
            if t > 0:
                assert_reused(prev[i], resp)
            prev[i] = resp
            outputs[i].append(resp.output_text)
    assert len({o[0] for o in outputs.values()}) > 1  # outputs depend on the conversation
    for i in range(N_CONV):
        assert outputs[i] == reference(prompts("stick", i)[:3], max_tokens_of(i)[:3])


def test_kill_9_mid_stream_fails_over_with_nothing_lost(cluster, reference):
    r1, r2 = cluster.replica("r1"), cluster.replica("r2")
    placed = new_conversations(cluster.url, N_CONV // 2)
    convs = [c for pair in zip(placed["r1"], placed["r2"]) for c in pair]
    done: dict[str, list[str]] = {c: [] for c in convs}  # the replies reported complete, per conversation
    last = {}
    for t in range(2):
        for i, conv in enumerate(convs):
            resp, _ = turn(cluster.url, conv, prompts("failover", i)[t], max_tokens_of(i)[t])
            done[conv].append(resp.output_text)
            last[i] = resp
    cluster.wait_kv_written(r1)  # the turn-end KV blobs reach Redis (a background writer, after the reply)

    stream = SSE(cluster.url, convs[0], prompts("failover", 0)[2], LONG)
    assert stream.response.headers["x-replica"] == "r1"
    assert stream.until("response.output_text.delta") is not None  # r1 is generating turn 3 ...
    r1.kill()  # ... and dies: SIGKILL, nothing flushed
    kinds = stream.rest()
    assert "response.completed" not in kinds  # the client never saw it complete

    for i, conv in enumerate(convs):  # every conversation's next turn, through nginx
        resp, name = turn(cluster.url, conv, prompts("failover", i)[2], max_tokens_of(i)[2])
        assert name == "r2"
        assert resp.output_text == reference(prompts("failover", i)[:3], max_tokens_of(i)[:3])[2]  # as if no failure
        assert_reused(last[i], resp)  # r1's conversations too: their KV from Redis, only the new message prefilled
        done[conv].append(resp.output_text)

    for i, conv in enumerate(convs):  # each completed turn exactly once, no half turn (r1's was never committed)
        stored = items(cluster.url, conv)
        assert [r for r, _ in stored] == ["user", "assistant"] * 3
        assert [t for r, t in stored if r == "user"] == prompts("failover", i)[:3]
        assert [t for r, t in stored if r == "assistant"] == done[conv]
    cluster.failover = (convs, done)


def test_returning_replica_reloads_and_stale_writes_are_refused(cluster, reference):
    r1, r2 = cluster.replica("r1"), cluster.replica("r2")
    convs, done = cluster.failover
    r1.start()
    deadline = time.monotonic() + 30  # nginx tries r1 again once its fail_timeout is over
    while replica_of(cluster.url, convs[0]) != "r1":
        assert time.monotonic() < deadline, "nginx never sent conversation 0 back to r1"
        time.sleep(0.2)
    texts = prompts("failover", 0)
    ref = reference(texts, max_tokens_of(0))
    # the returned replica gets a turn of a conversation that moved on while it was dead
    resp, name = turn(cluster.url, convs[0], texts[3])
    assert name == "r1" and resp.output_text == ref[3]

    # a stale in-memory session: r1 holds conversation 0 as of turn 4; r2 appends turn 5; r1 gets turn 6
    resp5, name = turn(r2.url, convs[0], texts[4], sticky=False)
    assert name == "r2" and resp5.output_text == ref[4]
    resp6, name = turn(r1.url, convs[0], texts[5], sticky=False)
    assert name == "r1" and resp6.output_text == ref[5]  # reloaded: it answered from turn 5's history, not its own

    # the race, forced: r1 generates from version v, r2 commits v+1 meanwhile, r1's commit is refused
    race = prompts("race", 0)[0]
    stream = SSE(r1.url, convs[0], race, LONG, sticky=False)
    assert stream.until("response.output_text.delta") is not None
    r1.send(signal.SIGSTOP)  # r1 is mid-turn on version v
    try:
        resp7, name = turn(r2.url, convs[0], "the other replica's turn", sticky=False)
        assert name == "r2"
    finally:
        r1.send(signal.SIGCONT)
    kinds = stream.rest()
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds, kinds
    assert "stale" in json.dumps(stream.events[-1]).lower() or "another replica" in json.dumps(stream.events[-1])
    stored = items(r2.url, convs[0])
    assert [t for r, t in stored if r == "user"] == [*texts, "the other replica's turn"]  # r1's turn: not there
    assert stored[-1] == ("assistant", resp7.output_text)
    # and r1, stale once more, reloads for its next turn
    resp8, name = turn(r1.url, convs[0], "and now r1 again", sticky=False)
    assert name == "r1" and items(r1.url, convs[0]) == [*stored, ("user", "and now r1 again"),
                                                        ("assistant", resp8.output_text)]


def test_redis_restart_keeps_every_session(cluster):
    convs, done = cluster.failover
    before = {c: items(cluster.url, c) for c in convs}
    cluster.redis.stop()  # SIGTERM: Redis fsyncs its AOF and exits
    cluster.redis.start()  # same port, same directory: the AOF is replayed
    for i, conv in enumerate(convs):
        assert items(cluster.url, conv) == before[conv]
        resp, _ = turn_retrying(cluster.url, conv, "after the restart")
        assert resp.status in ("completed", "incomplete")
        assert items(cluster.url, conv) == [*before[conv], ("user", "after the restart"),
                                            ("assistant", resp.output_text)]


def test_redis_gone_gives_503_and_nothing_is_lost_or_doubled(cluster):
    r2 = cluster.replica("r2")
    convs, _ = cluster.failover
    conv = convs[1]  # an r2 conversation
    before = items(cluster.url, conv)

    # Redis dies while a turn is being generated: its commit fails, nothing is appended
    key, text = uuid.uuid4().hex, "a turn across the outage"
    stream = SSE(r2.url, conv, text, LONG, sticky=False, key=key)
    assert stream.until("response.output_text.delta") is not None
    cluster.redis.kill()
    kinds = stream.rest()
    assert kinds[-1] == "response.failed", kinds

    # while it is gone: 503 + Retry-After (from the replica, named), through nginx and directly, streaming or not
    for url in (cluster.url, r2.url):
        r = httpx.post(f"{url}/v1/responses", headers=headers(conv, key), timeout=60,
                       json={"model": MODEL, "conversation": conv, "input": text, "max_output_tokens": MAX,
                             "temperature": 0})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert r.headers["x-replica"] == "r2"
    r = httpx.post(f"{cluster.url}/v1/responses", headers=headers(conv), timeout=60,
                   json={"model": MODEL, "conversation": conv, "input": "x", "stream": True})
    assert r.status_code == 503 and "retry-after" in r.headers

    cluster.redis.start()  # back: the client's retry (same key) now succeeds, once
    resp, _ = turn_retrying(cluster.url, conv, text, key=key)
    after = items(cluster.url, conv)
    assert after == [*before, ("user", text), ("assistant", resp.output_text)]  # nothing lost, nothing doubled
    replay, _ = turn(cluster.url, conv, text, key=key)  # sent once more: the key is committed, so it is replayed
    assert replay.output_text == resp.output_text and items(cluster.url, conv) == after
