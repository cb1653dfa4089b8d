"""The durable store and session files on a tiny random Gemma 3 (float32)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.cache.kv import KVLayout
from gemma_sessions.sessions.sessionfile import FORMAT_VERSION, encode_session
from gemma_sessions.testing import tiny_model

P = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
QUESTIONS = ["first question", "second one", "a third", "the fourth"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=11)


def _engine(model, **kw):
    return gs.Engine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 4 << 20), block_size=4, **kw)


def _never_saved(model) -> list[list[int]]:
    with _engine(model) as e:
        s = gs.SessionManager(e).create(system="sys", sampling=P)
        return [s.send(q).token_ids for q in QUESTIONS]


def test_save_restart_continue_equals_never_saved(model, tmp_path):
    reference = _never_saved(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system="sys", sampling=P)
        got = [s.send(q).token_ids for q in QUESTIONS[:2]]
        sid = s.id
        m.close()
    with _engine(model) as e:  # a "new process": fresh engine, same store
        m = gs.SessionManager(e, store=tmp_path)
        assert [x.id for x in m.list()] == [sid]
        s = m.get(sid)
        assert [x.text for x in s.messages if x.role == "user"] == QUESTIONS[:2]
        r = s.send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot"
        assert r.stats.prefilled_tokens < 30  # only the new turn (and the closing tokens) was computed
        got += [r.token_ids, s.send(QUESTIONS[3]).token_ids]
        m.close()
    assert got == reference


def test_stale_or_missing_snapshot_recomputes(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(sampling=P)
        s.send("hello")
        sid = s.id
        m.close()
    (tmp_path / "kv" / f"{sid}.safetensors").write_bytes(b"garbage")
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        r = m.get(sid).send("again")
        assert r.stats.kv_source == "recompute" and r.finish_reason == "length"
        m.close()


def test_memory_pressure_spills_idle_sessions_to_disk_and_back(model, tmp_path):
    layout = KVLayout.for_config(model.config, block_size=4)
    page = layout.page_bytes(torch.float32)
    n = len(model.tokenizer.encode("a long message " * 8)) + 20
    with _engine(model, kv_cache_bytes=page * layout.blocks_needed(n, chunk=n) * 3 // 2) as e:
        m = gs.SessionManager(e, store=tmp_path)
        sessions = [m.create(sampling=P) for _ in range(4)]
        for i, s in enumerate(sessions):  # different texts: no shared prefix to hide the pressure
            s.send(f"{i} a long message " * 8)
        assert e.stats()["session_kv_evictions"] > 0
        m.store.flush()
        evicted = [s for s in sessions if s.kv.evictions]
        r = evicted[0].send("back again")
        assert r.stats.kv_source == "snapshot"
        m.close()


def test_delete_leaves_nothing_behind(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        a, b = m.create(sampling=P), m.create(sampling=P)
        a.send("x")
        b.send("y")
        m.store.flush()
        assert len(list((tmp_path / "kv").iterdir())) == 2
        m.delete(a.id)
        m.delete(b.id)
        assert list((tmp_path / "kv").iterdir()) == []
        assert m.store.session_ids() == []
        m.close()


def test_one_process_serves_a_store(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        with pytest.raises(gs.StoreError):
            gs.sessions.store.Store(tmp_path)
        reader = gs.sessions.store.Store(tmp_path, readonly=True)
        s = m.create(sampling=P)
        s.send("hi")
        assert reader.session_ids() == [s.id]
        reader.close()
        m.close()


# ------------------------------------------------------------------------------------------ session files
@pytest.fixture
def exported(model, tmp_path):
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.create(system="sys", sampling=P)
        for q in QUESTIONS[:2]:
            s.send(q)
        path = tmp_path / "s.gsession"
        m.export(s.id, path)
        follow = s.send(QUESTIONS[2]).token_ids
    return path, follow


def test_export_import_continue_equals_never_saved(model, exported):
    path, follow = exported
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.import_file(path)
        r = s.send(QUESTIONS[2])
        assert r.token_ids == follow and r.stats.kv_source == "memory"
        assert r.stats.cached_tokens > 20


@pytest.mark.parametrize("options", [{"compress": True}, {"quantize": True}, {"kv_dtype": "bfloat16"}])
def test_export_options_roundtrip(model, tmp_path, options):
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.create(sampling=P)
        s.send("hello")
        plain = m.export(s.id, tmp_path / "plain")
        size = m.export(s.id, tmp_path / "opt", **options)
        t = m.import_file(tmp_path / "opt", new_id=True)
        assert t.token_ids == s.token_ids and t.id != s.id
        assert size < plain or options.get("compress")
        assert t.send("next").finish_reason == "length"


def _corrupt_variants(path):
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-100] ^= 0x40
    yield "truncated", data[: len(data) // 2], "truncated"
    yield "bit flip", bytes(flipped), "checksum"
    yield "empty", b"", "truncated"
    from safetensors.torch import save

    yield "foreign", save({"x": torch.zeros(3)}, metadata={"format": "pt"}), "foreign"
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    raw = json.dumps(header).encode()
    yield "newer", len(raw).to_bytes(8, "little") + raw + data[8 + n:], "newer"


def test_bad_files_are_refused_with_their_reason(model, exported, tmp_path):
    path, _ = exported
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path / "store")
        keep = m.create(sampling=P)
        keep.send("precious")
        for name, data, reason in _corrupt_variants(path):
            bad = tmp_path / f"bad-{name.replace(' ', '_')}"
            bad.write_bytes(data)
            with pytest.raises(gs.SessionFileError, match=reason):
                m.import_file(bad)
        assert [s.id for s in m.list()] == [keep.id]  # the store is unharmed
        assert len(keep.messages) == 2
        m.close()


def test_another_model_is_refused_unless_history_only(exported):
    path, _ = exported
    other = tiny_model("gemma3", seed=12)  # same architecture, other weights
    with _engine(other) as e:
        m = gs.SessionManager(e)
        with pytest.raises(gs.SessionFileError, match="another model"):
            m.import_file(path)
        s = m.import_file(path, history_only=True)
        r = s.send("go on")
        assert r.stats.kv_source == "recompute" and r.stats.cached_tokens == 0


def test_another_tokenizer_is_refused(model, exported):
    path, _ = exported
    snap_meta = dict(model_fingerprint=model.fingerprint, tokenizer_fingerprint="0" * 64, session={"id": "x"})
    data = encode_session(None, **snap_meta)
    bad = path.with_name("tok")
    bad.write_bytes(data)
    with _engine(model) as e:
        with pytest.raises(gs.SessionFileError, match="tokenizer"):
            gs.SessionManager(e).import_file(bad)
    assert os.path.exists(path)


def test_close_rewrites_no_snapshot_that_is_current(model, tmp_path):
    """A shutdown writes only stale KV files (it once rewrote every session's, for 50 s under load)."""
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(sampling=P)
        s.send("hello")
        m.store.flush()
        written = m.store.snapshots_written
        assert written >= 1
        m.close()
        assert m.store.snapshots_written == written


def test_spills_waiting_for_the_writer_are_bounded_in_bytes(model, tmp_path, monkeypatch):
    """Spilled KV waits in memory for the writer only up to MAX_PENDING_BYTES; beyond, it is dropped and the
    session recomputes it: the same tokens, never a lost turn."""
    from gemma_sessions.sessions import store as store_mod

    monkeypatch.setattr(store_mod, "MAX_PENDING_BYTES", 1)  # every spill is over the bound
    reference = _never_saved(model)
    with _engine(model, kv_cache_bytes=128 << 10) as e:  # 128 pages: a few sessions at a time
        m = gs.SessionManager(e, store=tmp_path)
        sessions = [m.create(system="sys", sampling=P) for _ in range(6)]
        got = [[s.send(q).token_ids for q in QUESTIONS[:2]] for s in sessions]  # the pool holds a few at a time
        stats = m.store.stats()
        assert stats["spills_dropped"] > 0 and stats["pending_bytes"] == 0
        assert [s.send(QUESTIONS[2]).token_ids for s in sessions] == [reference[2]] * 6
        m.close()
    assert got == [reference[:2]] * 6


# ------------------------------------------------------------------------------------------ the store interface
def _protocol_methods() -> set[str]:
    from gemma_sessions.sessions.store_protocol import SessionStore

    return {name for name, v in vars(SessionStore).items() if callable(v) and not name.startswith("_")}


def test_the_store_method_list_is_the_protocol():
    from gemma_sessions.sessions.store_protocol import STORE_METHODS

    assert set(STORE_METHODS) == _protocol_methods() and len(STORE_METHODS) == len(set(STORE_METHODS))


@pytest.mark.parametrize("cls", ["Store", "RedisStore"])
def test_both_stores_have_every_method_with_the_protocol_parameters(cls):
    import inspect

    from gemma_sessions.sessions.redis_store import RedisStore
    from gemma_sessions.sessions.store import Store
    from gemma_sessions.sessions.store_protocol import STORE_METHODS, SessionStore

    impl = {"Store": Store, "RedisStore": RedisStore}[cls]
    for name in STORE_METHODS:
        want = inspect.signature(getattr(SessionStore, name)).parameters
        got = inspect.signature(getattr(impl, name)).parameters
        assert [(p.name, p.kind) for p in got.values()] == [(p.name, p.kind) for p in want.values()], (cls, name)


def test_the_layers_above_call_only_protocol_methods_of_a_store():
    """Every ``store.X`` / ``self.store.X`` / ``manager.store.X`` in the sessions layer, the server and the CLI is a
    Protocol method or attribute (one more call on one store would not exist on the other)."""
    import ast
    from pathlib import Path

    from gemma_sessions.sessions.store_protocol import STORE_METHODS

    pkg = Path(gs.__file__).parent
    used = set()
    for path in [pkg / "sessions" / "manager.py", pkg / "sessions" / "session.py", *sorted((pkg / "server").glob("*.py")),
                 pkg / "cli.py", pkg / "repl.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                v = node.value
                if (isinstance(v, ast.Name) and v.id == "store") or (isinstance(v, ast.Attribute) and v.attr == "store"):
                    used.add(node.attr)
    assert used and used <= set(STORE_METHODS) | {"path", "readonly", "shared"}, used - set(STORE_METHODS)
