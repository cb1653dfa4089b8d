"""Memory and store change together or not at all (tiny random Gemma 3, float32, a real store directory).

Each test is a defect once seen through the server: a refused or cancelled turn that emptied a conversation, a
store that reordered turns after a truncation, a failed store write that left a turn in memory, ownership moved
through metadata, an import that left a half-made session behind, responses forgotten by a restart.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

import gemma_sessions as gs
from gemma_sessions.sessions import store as store_mod
from gemma_sessions.sessions.sessionfile import encode_session
from gemma_sessions.testing import tiny_model

P = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=5)


def _engine(model):
    return gs.Engine(model, kv_cache_bytes=4 << 20, block_size=4)


def _history(s) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(m.role, m.text, m.token_ids) for m in s.messages]


def _stored(path, sid) -> list[tuple[str, str]]:
    store = gs.sessions.store.Store(path, readonly=True)
    try:
        return [(m.role, m.text) for m in store.messages(sid)]
    finally:
        store.close(snapshot_all=False)


def test_a_refused_turn_keeps_the_history_and_the_store_keeps_its_order(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system="sys", sampling=P, max_context=120)
        for q in ("one", "two", "three"):
            s.send(q)
        before = _history(s)
        with pytest.raises(gs.ContextLengthError):
            s.send("a long message " * 40)  # cannot fit even alone: refused after planning a truncation
        assert _history(s) == before
        s.send("four")
        # the truncation that "four" needs is committed with it, in order, in memory and in the store
        texts = [t for _, t, _ in _history(s)]
        assert texts[-2] == "four" and _stored(tmp_path, s.id) == [(r, t) for r, t, _ in _history(s)]
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        assert [(r, t) for r, t, _ in _history(m.get(s.id))] == [(r, t) for r, t, _ in _history(s)]
        m.close()


def test_a_cancelled_turn_that_would_truncate_changes_nothing(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system="sys", sampling=gs.SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                     max_context=100)
        for q in ("one", "two", "three"):
            s.send(q)
        before, stored, dropped = _history(s), _stored(tmp_path, s.id), s.stats["dropped_turns"]
        stream = s.stream("drop old turns")
        assert stream._plan.dropped > 0  # the plan drops turns, on a copy
        next(iter(stream))
        stream.close()  # the client went away
        assert _history(s) == before and _stored(tmp_path, s.id) == stored
        assert s.stats["dropped_turns"] == dropped
        m.close()


def test_a_long_max_tokens_never_costs_history(model):
    with _engine(model) as e:
        s = gs.SessionManager(e).create(sampling=P, max_context=200)
        for q in ("one", "two"):
            s.send(q)
        before = _history(s)
        reply = s.send("three", sampling=P.replace(max_tokens=500))  # 500 does not fit; the prompt does
        assert _history(s)[:len(before)] == before and reply.stats.dropped_turns == 0
        assert reply.finish_reason == "length" and len(s.token_ids) <= 200 + 2  # + <end_of_turn>\n


def test_a_failed_store_write_fails_the_turn_and_leaves_memory_unchanged(model, tmp_path, monkeypatch):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(sampling=P)
        s.send("one")
        before = _history(s)

        def broken(*args, **kwargs):
            raise gs.StoreError("disk full")

        with monkeypatch.context() as mp:
            mp.setattr(m.store, "turn_completed", broken)
            with pytest.raises(gs.StoreError):
                s.send("two")
            assert _history(s) == before and not s.busy
            mp.setattr(m.store, "history_changed", broken)
            with pytest.raises(gs.StoreError):
                s.add_message("user", "a note")
            assert _history(s) == before
        assert s.send("two").token_ids  # the next turn recomputes what the failed one left in the KV
        assert _stored(tmp_path, s.id) == [(r, t) for r, t, _ in _history(s)]
        m.close()


@pytest.mark.parametrize("bad", ["\ud800", "ok \udfff"])
def test_invalid_text_is_refused_before_anything_changes(model, tmp_path, bad):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(sampling=P)
        s.send("one")
        before = _history(s)
        for call in (lambda: s.send(bad), lambda: s.add_message("user", bad), lambda: s.add_message("model", bad),
                     lambda: m.create(system=bad), lambda: m.create(metadata={"k": bad})):
            with pytest.raises(gs.InvalidRequestError):
                call()
        assert _history(s) == before and [x.id for x in m.list()] == [s.id]
        m.close()


def test_owner_is_its_own_field_never_metadata(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(owner="alice", metadata={"topic": "x"})
        m.update_metadata(s.id, {"_owner": "mallory"})
        assert s.owner == "alice"
        child = m.fork(s.id, metadata={"_owner": "mallory"})
        assert child.owner == "alice"
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        assert {x.owner for x in m.list()} == {"alice"}
        m.close()


def test_a_store_from_before_the_owner_column_is_migrated(model, tmp_path):
    db = sqlite3.connect(tmp_path / "sessions.db")
    db.executescript("""
        CREATE TABLE sessions(id TEXT PRIMARY KEY, created_at REAL, updated_at REAL, system TEXT, sampling TEXT,
            context_policy TEXT, max_context INTEGER, metadata TEXT, dropped_turns INTEGER DEFAULT 0);
        INSERT INTO sessions VALUES ('abc', 1.0, 1.0, NULL, '{}', 'truncate_oldest', 64,
            '{"_owner": "k1", "topic": "t"}', 0);
    """)
    db.commit()
    db.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.get("abc")
        assert s.owner == "k1" and s.metadata == {"topic": "t"}
        m.close()


def test_responses_survive_a_restart_and_go_with_their_session(model, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_RESPONSES", 3)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(owner="k")
        for i in range(5):
            m.remember_response(f"resp_{i}", owner="k", session_id=s.id, n_messages=i, body={"id": f"resp_{i}"})
        m.close()
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        assert m.response("resp_0") is None and m.response("resp_1") is None  # retention: the newest 3
        assert m.response("resp_4") == {"owner": "k", "session": s.id, "n": 4, "body": {"id": "resp_4"},
                                           "context_before": None, "alive_at": None}
        m.delete(s.id)
        assert m.response("resp_4") is None
        m.close()


def test_fork_at_a_message_keeps_that_prefix(model):
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.create(sampling=P)
        s.send("one")
        s.send("two")
        f = m.fork(s.id, keep_messages=2)
        assert [x.text for x in f.messages] == [x.text for x in s.messages[:2]]
        alone = m.create(sampling=P)
        alone.send("one")
        assert f.send("three").token_ids == alone.send("three").token_ids
        with pytest.raises(gs.InvalidRequestError):
            m.fork(s.id, keep_messages=9)


def test_one_off_sessions_are_never_stored_nor_listed(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(persistent=False, sampling=P)
        s.send("hello")
        assert m.list() == [] and m.store.session_ids() == []
        m.delete(s.id)
        m.close()


def _file(model, session: object) -> bytes:
    return encode_session(None, model_fingerprint=model.fingerprint,
                          tokenizer_fingerprint=model.tokenizer.fingerprint, session=session)


@pytest.mark.parametrize("session", [
    [1, 2],
    {"id": "a", "messages": [{"role": "wizard", "text": "x", "created_at": 1, "token_ids": [1]}]},
    {"id": "a", "messages": [{"role": "user", "text": "x", "created_at": 1, "token_ids": [10 ** 9]}]},
    {"id": "a", "messages": [{"role": "user", "text": 5, "created_at": 1, "token_ids": [1]}]},
    {"id": "a", "messages": "nope"},
    {"id": "a", "sampling": {"temperature": "hot"}},
    {"id": "a", "context_policy": "whatever"},
    {"id": "a", "turn_stats": [{"bogus": 1}]},
    {"id": "../../etc", "messages": []},
    {"id": "a", "metadata": ["x"]},
])
def test_a_forged_import_is_refused_and_leaves_nothing(model, tmp_path, session):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        with pytest.raises(gs.SessionFileError) as info:
            m.import_bytes(_file(model, session), owner="k")
        assert str(tmp_path) not in str(info.value)
        assert m.list() == [] and m.loaded_sessions() == [] and m.store.session_ids() == []
        m.close()


def test_an_import_belongs_to_the_importer_whatever_the_file_says(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(owner="alice", metadata={"_owner": "alice", "topic": "t"}, sampling=P)
        s.send("hello")
        data = m.export_bytes(s.id)
        t = m.import_bytes(data, owner="bob", new_id=True)
        assert t.owner == "bob" and "_owner" not in t.metadata and t.metadata["topic"] == "t"
        assert json.loads(json.dumps(t.metadata)) == t.metadata
        m.close()
