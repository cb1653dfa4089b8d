"""RedisStore against a real redis-server (its own, on a free port, per test) on a tiny random Gemma 3 (float32).

Two SessionManagers on two engines over one Redis are two replicas. What must hold: a session continues on the other
replica from the shared KV with the greedy output of a single replica; two replicas racing for turn N: exactly one
wins, the other gets StaleSessionError and nothing changed; an idempotency key commits once; Redis restarted (AOF)
keeps every session; Redis gone gives StoreUnavailableError with memory and store unchanged, and the next turn works
once it is back; the SQLite store's invariants (restart, delete, responses) hold for both stores.
"""

from __future__ import annotations

import json

import pytest
import redis

import gemma_sessions as gs
from gemma_sessions.sessions import SessionStore, open_store
from gemma_sessions.sessions.redis_store import RedisStore
from gemma_sessions.sessions.store import Store
from gemma_sessions.testing import RedisServer, _free_port, tiny_model

P = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
QUESTIONS = ["first question", "second one", "a third", "the fourth"]
SYSTEM = "you are a terse assistant for the tests"


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=11)


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as srv:
        yield srv


def _engine(model, **kw):
    return gs.Engine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 4 << 20), block_size=4, **kw)


def _reference(model, questions=QUESTIONS) -> list[gs.Reply]:
    """One replica, no store: the replies every setup must reproduce."""
    with _engine(model) as e:
        s = gs.SessionManager(e).create(system=SYSTEM, sampling=P)
        return [s.send(q) for q in questions]


def _client(srv: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(srv.url)


# ------------------------------------------------------------------------------------------------ the interface


def test_open_store_picks_the_store_by_spec(server, tmp_path):
    r = open_store(server.url)
    d = open_store(tmp_path / "dir")
    try:
        assert isinstance(r, RedisStore) and isinstance(d, Store)
        assert isinstance(r, SessionStore) and isinstance(d, SessionStore)
        assert r.path == server.url
    finally:
        r.close()
        d.close()


def test_unreachable_redis_at_start_is_a_clear_error():
    url = f"redis://:secret@127.0.0.1:{_free_port()}/0"
    with pytest.raises(gs.StoreUnavailableError) as info:
        open_store(url, retries=0)
    msg = str(info.value)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in msg and "secret" not in msg and "***" in msg


# ------------------------------------------------------------------------------------------------ two replicas


def test_a_session_continues_on_the_other_replica_from_the_shared_kv(model, server):
    ref = _reference(model)
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(system=SYSTEM, sampling=P)
        got = [s.send(q) for q in QUESTIONS[:2]]
        a.store.flush()
        on_b = b.get(s.id)  # never seen by B: loaded from the log
        assert on_b.token_ids == s.token_ids and on_b.store_version == 2
        r = on_b.send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot" and b.store.stats()["blobs_fetched"] > 0
        assert r.stats.cached_tokens == ref[2].stats.cached_tokens  # the whole history's KV came from Redis
        got.append(r)
        b.store.flush()
        r = s.send(QUESTIONS[3])  # A is stale: it reloads B's turn, takes its KV from the blobs
        assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens == ref[3].stats.cached_tokens
        got.append(r)
        assert s.store_version == 4 and s.messages == b.store.messages(s.id)  # memory is the log
        a.close()
        b.close()
    assert [x.token_ids for x in got] == [x.token_ids for x in ref]


def test_sessions_sharing_a_system_prompt_share_its_blobs(model, server):
    long_system = "a long shared system prompt " * 6
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        m.create(system=long_system, sampling=P).send("one question")
        m.store.flush()
        first = m.store.blobs_written
        m.create(system=long_system, sampling=P).send("another question")
        m.store.flush()
        second = m.store.blobs_written - first
        assert 0 < second < first // 2  # only the pages after the shared prefix were new
        m.close()


def test_a_forced_race_for_turn_n_has_exactly_one_winner(model, server):
    with _engine(model) as e:  # the reference: the winner's turn, then the loser's turn retried after it
        ref = gs.SessionManager(e).create(system=SYSTEM, sampling=P)
        ref_replies = [ref.send(q) for q in (QUESTIONS[0], "from A", "from B")]
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        sa = a.create(system=SYSTEM, sampling=P)
        sa.send(QUESTIONS[0])
        sb = b.get(sa.id)
        before = sb.messages
        loser = sb.stream("from B")  # B passes its version check (version 1) and generates turn 2 ...
        won = sa.send("from A")      # ... while A commits turn 2 first
        with pytest.raises(gs.StaleSessionError):
            for _ in loser:
                pass
        assert loser.reply is None and sb.messages == before and sb.store_version == 1  # memory unchanged
        stored = b.store.messages(sa.id)
        assert [m.text for m in stored if m.role == "user"] == [QUESTIONS[0], "from A"]  # store: only the winner
        with pytest.raises(gs.StaleSessionError):  # any other write on the stale version is refused too
            b.store.metadata_changed(sb, {"k": "v"})
        a.store.flush()
        retried = sb.send("from B")  # the retry reloads (history from the log, KV from the blobs) and goes on
        assert retried.stats.kv_source == "snapshot"
        assert retried.stats.cached_tokens == ref_replies[2].stats.cached_tokens
        assert [won.token_ids, retried.token_ids] == [ref_replies[1].token_ids, ref_replies[2].token_ids]
        assert [m.text for m in b.store.messages(sa.id) if m.role == "user"] == [QUESTIONS[0], "from A", "from B"]
        a.close()
        b.close()


def test_a_retried_idempotency_key_appends_once_on_any_replica(model, server):
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(sampling=P)
        first = s.send("hello", idempotency_key="req-1")
        again = s.send("hello", idempotency_key="req-1")
        elsewhere = b.get(s.id).send("hello", idempotency_key="req-1")
        for r in (again, elsewhere):
            assert (r.text, r.token_ids, r.finish_reason, r.stats) == (first.text, first.token_ids, first.finish_reason,
                                                                       first.stats)
        assert len(a.store.messages(s.id)) == 2 and len(s.messages) == 2 and s.store_version == 1
        assert list(b.get(s.id).stream("hello", idempotency_key="req-1")) == [first.text]  # a stream replays too
        replayed = b.get(s.id).stream("hello", idempotency_key="req-1")  # and names the reply it recorded
        assert replayed.reply_id == s.messages[-1].id == a.store.messages(s.id)[-1].id
        replayed.close()
        s.send("hello")  # a new key is a new turn
        assert len(a.store.messages(s.id)) == 4
        a.close()
        b.close()


def test_a_commit_whose_reply_was_lost_is_not_appended_again(model, server):
    """The commit applied in Redis but its answer never came back: the turn is reported failed (503), memory is
    unchanged; the client's retry with the same key gets the committed reply and nothing is appended twice."""
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        s = m.create(sampling=P)
        commit = m.store._scripts["commit"]

        def lost_reply(*args, **kw):
            commit(*args, **kw)
            raise redis.ConnectionError("connection reset after the write")

        m.store._scripts["commit"] = lost_reply
        with pytest.raises(gs.StoreUnavailableError):
            s.send("hello", idempotency_key="req-7")
        assert s.messages == [] and s.store_version == 0
        m.store._scripts["commit"] = commit
        r = s.send("hello", idempotency_key="req-7")
        assert len(s.messages) == 2 and len(m.store.messages(s.id)) == 2 and s.store_version == 1
        assert r.text == s.messages[1].text and r.finish_reason == "length" and len(r.token_ids) == 8
        m.close()


def test_a_session_deleted_through_another_replica_is_gone_on_both(model, server):
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(sampling=P)
        s.send("hello")
        b.delete(s.id)
        with pytest.raises(gs.SessionNotFoundError):
            s.send("again")
        with pytest.raises(gs.SessionNotFoundError):
            a.get(s.id)
        assert a.store.session_ids() == [] and b.list() == []
        a.close()
        b.close()


def test_reads_on_a_replica_that_missed_turns_are_current(model, server):
    """A replica holding a session in memory reads it at the store's version: another replica's turns, metadata and
    deletion show in get() and list() without a turn here."""
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(sampling=P)
        s.send("hello")
        assert len(b.get(s.id).conversation.messages) == 2  # now in b's memory
        s.send("again")
        a.update_metadata(s.id, {"title": "renamed"})
        seen = b.get(s.id)
        assert [m.text for m in seen.conversation.messages] == [m.text for m in s.conversation.messages]
        assert seen.metadata["title"] == "renamed" and len(b.list()) == 1
        a.delete(s.id)
        assert b.list() == []
        with pytest.raises(gs.SessionNotFoundError):
            b.get(s.id)
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------------ Redis failures


def test_redis_restarted_with_aof_every_session_continues(model, server):
    ref = _reference(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        sessions = [m.create(system=SYSTEM, sampling=P) for _ in range(3)]
        for s in sessions:
            for q in QUESTIONS[:2]:
                s.send(q)
        m.store.flush()
        server.stop()
        server.start()  # the AOF is replayed; the client reconnects by itself
        assert [s.send(QUESTIONS[2]).token_ids for s in sessions] == [ref[2].token_ids] * 3
        ids = [s.id for s in sessions]
        m.close()
    server.stop()
    server.start()
    with _engine(model) as e:  # and a new process finds them all
        m = gs.SessionManager(e, store=server.url)
        assert [s.id for s in m.list()] == ids
        replies = [m.get(i).send(QUESTIONS[3]) for i in ids]
        assert [r.token_ids for r in replies] == [ref[3].token_ids] * 3
        assert all(r.stats.kv_source == "snapshot" for r in replies)
        m.close()


def test_redis_gone_mid_run_changes_nothing_and_the_next_turn_works_once_it_is_back(model, server):
    ref = _reference(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=RedisStore(server.url, retries=1, connect_timeout_s=0.5))
        s = m.create(system=SYSTEM, sampling=P)
        s.send(QUESTIONS[0])
        m.store.flush()
        before, version = s.messages, s.store_version
        turn = s.stream(QUESTIONS[1])  # started (version checked) ...
        server.kill()                  # ... and Redis dies before it commits
        with pytest.raises(gs.StoreUnavailableError):
            for _ in turn:
                pass
        with pytest.raises(gs.StoreUnavailableError, match=f"127.0.0.1:{server.port}"):
            s.send(QUESTIONS[1])  # a new turn fails at its version check, before generating
        assert s.messages == before and s.store_version == version and not s.busy
        server.start()  # appendfsync always: everything acknowledged is there
        r = s.send(QUESTIONS[1])
        assert r.token_ids == ref[1].token_ids
        assert [x.text for x in m.store.messages(s.id) if x.role == "user"] == QUESTIONS[:2]  # no half, no double
        assert s.send(QUESTIONS[2]).token_ids == ref[2].token_ids
        m.close()


# ------------------------------------------------------------------------------------------------ untrusted reads


def test_a_corrupt_or_evicted_blob_costs_a_recompute_never_a_wrong_answer(model, server):
    ref = _reference(model)
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(system=SYSTEM, sampling=P)
        s.send(QUESTIONS[0])
        s.send(QUESTIONS[1])
        a.store.flush()
        c = _client(server)
        keys = sorted(c.scan_iter("gs:kv:*"))
        assert keys and all(0 < c.ttl(k) <= a.store.kv_ttl_s for k in keys)  # only KV carries a TTL
        assert all(c.ttl(k) == -1 for k in c.scan_iter("gs:s:*"))          # never the log
        for k in keys:  # flip a byte in every page
            v = bytearray(c.get(k))
            v[-1] ^= 1
            c.set(k, bytes(v))
        r = b.get(s.id).send(QUESTIONS[2])
        assert r.stats.kv_source == "recompute" and r.token_ids == ref[2].token_ids
        a.close()
        b.close()


def test_a_malformed_log_is_refused_with_its_reason(model, server):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        s = m.create(sampling=P)
        s.send("hello")
        c = _client(server)
        c.lset(f"gs:s:{s.id}:msgs", 0, json.dumps({"role": "user", "text": "x", "created_at": 0,
                                                   "token_ids": [10 ** 9]}))
        with _engine(model) as e2:
            other = gs.SessionManager(e2, store=server.url)
            with pytest.raises(gs.SessionFileError, match="vocabulary"):
                other.get(s.id)
            c.lset(f"gs:s:{s.id}:msgs", 0, b"\x80not json")
            with pytest.raises(gs.SessionFileError, match="malformed"):
                other.get(s.id)
            other.store.max_read_bytes = 100  # a log over the bound never travels
            with pytest.raises(gs.StoreError, match="over 100 bytes"):
                other.get(s.id)
            other.close()
        m.close()


# ------------------------------------------------------------------------------------------------ both stores


@pytest.fixture(params=["sqlite", "redis"])
def spec(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "store")
    else:
        with RedisServer(tmp_path / "redis") as srv:
            yield srv.url


def test_restart_continues_equal_to_never_saved(model, spec):
    ref = _reference(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        s = m.create(system=SYSTEM, sampling=P)
        got = [s.send(q).token_ids for q in QUESTIONS[:2]]
        sid = s.id
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        assert [x.id for x in m.list()] == [sid]
        s = m.get(sid)
        r = s.send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens == ref[2].stats.cached_tokens
        got += [r.token_ids, s.send(QUESTIONS[3]).token_ids]
        assert m.store.summaries()[0]["messages"] == 8
        m.close()
    assert got == [x.token_ids for x in ref]


def test_listing_one_owners_sessions_never_loads_the_others(model, spec):
    """/v1/sessions lists a key's sessions: after a restart, list(owner=) loads only that owner's sessions into memory
    (a key's listing does not bring every user's sessions, or their histories, into this process)."""
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        mine = [m.create(sampling=P, owner="a").id for _ in range(2)]
        theirs = [m.create(sampling=P, owner="b").id for _ in range(3)]
        assert [x.id for x in m.list(owner="a")] == mine and [x.id for x in m.list(owner="b")] == theirs
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        assert m.store.session_ids("a") == mine and m.store.session_ids("nobody") == []
        assert [x.id for x in m.list(owner="a")] == mine
        assert {x.id for x in m.loaded_sessions()} == set(mine)
        assert {r["id"]: r["owner"] for r in m.store.summaries()} == {**dict.fromkeys(mine, "a"),
                                                                      **dict.fromkeys(theirs, "b")}
        assert [x.id for x in m.list()] == mine + theirs
        m.close()


# Owner "a"'s sessions as (created_at, id), three created at the same instant; "b"'s interleave in time.
MINE = [(100.0, "3" * 32), (100.0, "1" * 32), (300.0, "0" * 32), (100.0, "2" * 32), (50.0, "9" * 32)]
THEIRS = [(100.0, "b1" * 16), (60.0, "b2" * 16), (400.0, "b3" * 16)]
# Pages of 2 by (created_at, id): the tie at 100.0 goes by id.
ASC_PAGES = [["9" * 32, "1" * 32], ["2" * 32, "3" * 32], ["0" * 32]]


def _add_sessions(m) -> None:
    """MINE for owner a, THEIRS for owner b, with their exact creation times (the tie cannot come from a clock)."""
    from gemma_sessions.sessions.session import Session

    for owner, rows in (("a", MINE), ("b", THEIRS)):
        for created, sid in rows:
            m._register(Session(m, sampling=P, session_id=sid, created_at=created, owner=owner))


def _walk(page, order: str) -> list[tuple[list[str], bool]]:
    """Every page of 2 in ``order``; ``page(limit=, after=, order=)`` -> (ids, has_more)."""
    pages, after = [], None
    for _ in range(10):
        ids, more = page(limit=2, after=after, order=order)
        pages.append((ids, more))
        if not more:
            return pages
        after = ids[-1]
    raise AssertionError(f"no last page: {pages}")


def _store_pages(store, owner: str = "a"):
    def page(**kw):
        got = store.session_page(owner, **kw)
        return list(got.ids), got.has_more
    return page


def _manager_pages(m, owner: str = "a"):
    def page(**kw):
        got = m.page(owner, **kw)
        return [s.id for s in got.sessions], got.has_more
    return page


def _expect_walks(page) -> None:
    assert _walk(page, "asc") == [(ids, i < 2) for i, ids in enumerate(ASC_PAGES)]
    desc = [i for ids in ASC_PAGES for i in ids][::-1]
    assert _walk(page, "desc") == [(desc[0:2], True), (desc[2:4], True), (desc[4:], False)]


def test_pages_of_two_walk_one_owners_sessions_once_in_both_orders(model, spec):
    """session_page (both stores alike) and manager.page: pages of 2 over a's 5 sessions visit each once, by
    (created_at, id) both ways, has_more false only on the last; b's never appear. After a restart, a page loads
    only its own sessions into memory."""
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        _add_sessions(m)
        _expect_walks(_store_pages(m.store))
        _expect_walks(_manager_pages(m))
        assert m.store.session_ids("a") == [i for ids in ASC_PAGES for i in ids]
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        first = m.page("a", limit=2, order="desc")
        assert [s.id for s in first.sessions] == ["0" * 32, "3" * 32] and first.has_more
        assert {s.id for s in m.loaded_sessions()} == {"0" * 32, "3" * 32}  # not a's other three, not b's
        _expect_walks(_manager_pages(m))
        assert _walk(_store_pages(m.store, "b"), "asc") == [(["b2" * 16, "b1" * 16], True), (["b3" * 16], False)]
        assert m.page("nobody", limit=2) == m.page("nobody", limit=2, order="desc")
        assert m.store.session_page("nobody", limit=2).ids == () and not m.page("nobody", limit=2).has_more
        m.close()


def test_a_cursor_that_is_not_the_owners_session_is_refused_alike(model, spec):
    """``after``: an unknown id and another owner's id get the same error (nothing tells them apart); the last id
    gives an empty last page; a deleted session stops being a cursor."""
    from gemma_sessions.sessions.store_protocol import UNKNOWN_CURSOR

    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        _add_sessions(m)
        for after in ("f" * 32, THEIRS[0][1], ""):
            for page in (m.store.session_page, m.page):
                with pytest.raises(gs.InvalidRequestError) as info:
                    page("a", limit=2, after=after)
                assert str(info.value) == UNKNOWN_CURSOR, after
        assert m.store.session_page("b", limit=2, after=THEIRS[0][1]).ids == ("b3" * 16,)  # its owner may
        last = m.store.session_page("a", limit=5, after="0" * 32)
        assert last.ids == () and not last.has_more
        full = m.page("a", limit=5)
        assert len(full.sessions) == 5 and not full.has_more
        m.delete("2" * 32)
        assert m.store.session_page("a", limit=2, after="1" * 32).ids == ("3" * 32, "0" * 32)
        with pytest.raises(gs.InvalidRequestError):
            m.store.session_page("a", limit=2, after="2" * 32)
        with pytest.raises(gs.InvalidRequestError):
            m.page("a", limit=0)
        m.close()


def test_a_manager_without_a_store_pages_alike(model):
    """Memory only: the same pages and the same refusals as the stores give."""
    with _engine(model) as e:
        m = gs.SessionManager(e)
        _add_sessions(m)
        _expect_walks(_manager_pages(m))
        with pytest.raises(gs.InvalidRequestError):
            m.page("a", limit=2, after=THEIRS[0][1])


def test_an_older_redis_store_is_indexed_by_owner_when_opened(model, server):
    """A store written before the owners' index (no gs:o:{owner}, no marker) lists as before: read-only it scans,
    and the first writable open builds the index, after which pages are exact."""
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        _add_sessions(m)
        m.close()
    r = _client(server)
    r.delete(*r.keys("gs:o:*"), "gs:owners_indexed")  # what a store from before the index looks like
    reader = open_store(server.url, readonly=True)
    try:
        assert reader.session_ids("a") == [i for ids in ASC_PAGES for i in ids]
        with pytest.raises(gs.StoreError, match="owners' index"):
            reader.session_page("a", limit=2)
    finally:
        reader.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=server.url)
        assert r.get("gs:owners_indexed") == b"1"
        _expect_walks(_store_pages(m.store))
        assert r.zcard("gs:o:a") == 5 and r.zcard("gs:o:b") == 3
        m.delete("0" * 32)  # a delete leaves the index too
        assert r.zcard("gs:o:a") == 4
        m.close()


def test_delete_leaves_nothing_and_responses_follow_their_session(model, spec):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=spec)
        keep, gone = m.create(sampling=P), m.create(sampling=P)
        for s in (keep, gone):
            s.send("x")
            m.remember_response(f"resp_{s.id}", owner="o", session_id=s.id, n_messages=2, body={"id": s.id},
                                context_before=1.5)
        m.remember_response("resp_extra", owner="o", session_id=keep.id, n_messages=2, body={"id": "extra"})
        m.store.flush()
        m.close()
    with _engine(model) as e:  # responses survive a restart (and, with Redis, are seen by every replica)
        m = gs.SessionManager(e, store=spec)
        assert m.response(f"resp_{keep.id}") == {"owner": "o", "session": keep.id, "n": 2, "body": {"id": keep.id},
                                                 "context_before": 1.5, "alive_at": None}
        assert m.response("resp_extra")["context_before"] is None
        m.delete(gone.id)
        assert m.response(f"resp_{gone.id}") is None and m.store.session_ids() == [keep.id]
        assert m.store.messages(gone.id) is None
        # a response deleted alone: its session stays, and deleting the session later finds nothing left of it
        assert m.forget_response(f"resp_{keep.id}") and not m.forget_response(f"resp_{keep.id}")
        assert m.response(f"resp_{keep.id}") is None and m.response("resp_extra") is not None
        assert m.store.session_ids() == [keep.id]
        m.close()
    if spec.startswith("redis://"):
        c = redis.Redis.from_url(spec)
        left = [k.decode() for k in c.scan_iter("*") if gone.id.encode() in k]
        assert left == []
        assert c.smembers(f"gs:s:{keep.id}:resp") == {b"resp_extra"}
        assert c.zrange("gs:responses", 0, -1) == [b"resp_extra"] and c.get(f"gs:r:resp_{keep.id}") is None
        assert all(c.ttl(k) > 0 for k in c.scan_iter("gs:kv:*"))  # shared KV pages: a cache that expires


def test_concurrent_turns_from_two_replicas_are_each_committed_once_in_some_order(model, server):
    """No forcing: two threads on two replicas send 4 turns each to one session, retrying on StaleSessionError.
    Every turn lands exactly once, each replica's in its order, and the log is a well-formed conversation."""
    import threading

    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(sampling=P)
        stale = {"A": 0, "B": 0}

        def run(session, tag):
            for i in range(4):
                while True:
                    try:
                        session.send(f"{tag} {i}", idempotency_key=f"{tag}-{i}")
                        break
                    except gs.StaleSessionError:
                        stale[tag] += 1

        threads = [threading.Thread(target=run, args=(s, "A")), threading.Thread(target=run, args=(b.get(s.id), "B"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        log = a.store.messages(s.id)
        users = [m.text for m in log if m.role == "user"]
        assert [m.role for m in log] == ["user", "model"] * 8
        assert sorted(users) == sorted(f"{t} {i}" for t in "AB" for i in range(4))
        assert [u for u in users if u[0] == "A"] == [f"A {i}" for i in range(4)]
        assert [u for u in users if u[0] == "B"] == [f"B {i}" for i in range(4)]
        s.send("last")  # A syncs: its memory is the log
        assert s.store_version == 9 and [m.text for m in s.messages[:16]] == [m.text for m in log]
        assert len(s.stats["ttft_s"]) == 9
        a.close()
        b.close()


def test_memory_pressure_spills_idle_sessions_to_redis_and_back(model, server):
    import torch

    from gemma_sessions.cache.kv import KVLayout

    layout = KVLayout.for_config(model.config, block_size=4)
    page = layout.page_bytes(torch.float32)
    n = len(model.tokenizer.encode("a long message " * 8)) + 20
    with _engine(model, kv_cache_bytes=page * layout.blocks_needed(n, chunk=n) * 3 // 2) as e:
        m = gs.SessionManager(e, store=RedisStore(server.url))
        sessions = [m.create(sampling=P) for _ in range(4)]
        firsts = [s.send(f"{i} a long message " * 8) for i, s in enumerate(sessions)]
        assert e.stats()["session_kv_evictions"] > 0
        m.store.flush()
        evicted = [s for s in sessions if s.kv.evictions]
        r = evicted[0].send("back again")
        assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens >= len(firsts[0].token_ids)
        m.close()
    with _engine(model) as e:  # the same turn with everything in memory
        s = gs.SessionManager(e).create(sampling=P)
        i = sessions.index(evicted[0])
        s.send(f"{i} a long message " * 8)
        assert s.send("back again").token_ids == r.token_ids


@pytest.mark.parametrize("arch", ["recurrentgemma", "gemma4"])
def test_other_architectures_continue_on_the_other_replica(arch, server):
    """RecurrentGemma's fixed-size state travels as one blob per token prefix; Gemma 4's KV groups differ in page shape
    and some layers share KV: both continue on the other replica with a single replica's output and cached tokens."""
    from gemma_sessions.testing import tiny_gemma4_model, tiny_griffin_model

    model = tiny_griffin_model(seed=3) if arch == "recurrentgemma" else tiny_gemma4_model(seed=3)
    ref = _reference(model, QUESTIONS[:3])
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(system=SYSTEM, sampling=P)
        got = [s.send(q) for q in QUESTIONS[:2]]
        a.store.flush()
        r = b.get(s.id).send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens == ref[2].stats.cached_tokens > 0
        assert [x.token_ids for x in [*got, r]] == [x.token_ids for x in ref]
        a.close()
        b.close()


def test_a_resent_commit_succeeds_once_and_a_key_committed_elsewhere_is_refused(model, server):
    """The client library resends a script after a lost connection: the resent commit (same nonce) reports the
    success of the first and appends nothing. A turn whose key another replica committed while it ran is refused."""
    with _engine(model) as ea, _engine(model) as eb:
        a, b = gs.SessionManager(ea, store=server.url), gs.SessionManager(eb, store=server.url)
        s = a.create(sampling=P)
        commit = a.store._scripts["commit"]

        def resent(*args, **kw):
            commit(*args, **kw)  # applied; its answer lost; the client sends it again
            return commit(*args, **kw)

        a.store._scripts["commit"] = resent
        s.send("hello", idempotency_key="req-1")
        a.store._scripts["commit"] = commit
        assert len(s.messages) == 2 and len(a.store.messages(s.id)) == 2 and s.store_version == 1
        turn = s.stream("again", idempotency_key="req-2")  # A passes its checks ...
        b.get(s.id).send("again", idempotency_key="req-2")  # ... while B commits the same request
        with pytest.raises(gs.StaleSessionError, match="another attempt"):
            for _ in turn:
                pass
        assert len(a.store.messages(s.id)) == 4 and len(s.messages) == 2
        assert s.send("again", idempotency_key="req-2").text == a.store.messages(s.id)[3].text  # the recorded reply
        assert len(s.messages) == 4
        a.close()
        b.close()
