"""RecurrentGemma in the engine and the sessions: state slots, batching, reuse, snapshots, eviction, persistence.

Every invariant is greedy-exact with float32 weights on a tiny random RecurrentGemma whose attention window (8) is
far shorter than the conversations, so the ring of the local attention wraps many times.
"""

from __future__ import annotations

import threading

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.cache.state import StateSnapshot
from gemma_sessions.sessions.sessionfile import decode_session
from gemma_sessions.testing import tiny_griffin_model, tiny_model

P = gs.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
QUESTIONS = ["first question", "second one here", "a third", "the fourth and last"]
SYSTEM = "You are a terse assistant in a test"


@pytest.fixture(scope="module")
def model():
    return tiny_griffin_model(seed=3)


def _engine(model, **kw):
    return gs.Engine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 8 << 20), **kw)


def _alone(model, prompt: list[int], n: int) -> list[int]:
    """Greedy reference: one sequence through the model's own state, no engine."""
    net, state = model.net, model.net.new_sequence(0)
    logits = net.step(torch.tensor(prompt), state, last_only=True)
    out = []
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = net.step(torch.tensor([tok]), state, last_only=True)
    return out


def _reference_turns(model, system=SYSTEM, questions=QUESTIONS) -> list[list[int]]:
    """Every turn recomputed from the token ids alone (a fresh engine per turn: no reuse of any kind)."""
    conv, out = gs.sessions.conversation.Conversation(model.tokenizer, system), []
    for q in questions:
        user = conv.user_message(q)
        reply = _alone(model, conv.prompt_for(user), P.max_tokens)
        conv.append_turn(user, model.tokenizer.decode(reply), reply)
        out.append(reply)
    return out


def test_batched_equals_alone(model):
    tok = model.tokenizer
    prompts = [tok.encode("the " * k + "user model", add_bos=True) for k in range(1, 12)]
    with _engine(model, max_batch=16, max_batched_tokens=16) as e:  # small chunks: prefill mixed with decode
        streams = [e.submit(p, P) for p in prompts]
        got = [s.result().token_ids for s in streams]
        assert e.stats()["steps"] < sum(len(p) + P.max_tokens for p in prompts)  # they really shared steps
    assert got == [_alone(model, p, P.max_tokens) for p in prompts]


def test_turns_reuse_state_and_equal_recompute(model):
    with _engine(model) as e:
        s = gs.SessionManager(e).create(system=SYSTEM, sampling=P)
        replies, stats = [], []
        for q in QUESTIONS:
            r = s.send(q)
            replies.append(r.token_ids)
            stats.append(r.stats)
        assert replies == _reference_turns(model)
        for prev, st in zip(stats, stats[1:]):  # a later turn computes only its new tokens
            assert st.cached_tokens == prev.prompt_tokens + prev.generated_tokens - 1
            assert st.prefilled_tokens == st.prompt_tokens - st.cached_tokens
            assert st.kv_source == "memory"


def test_memory_is_flat_over_64_turns(model):
    with _engine(model) as e:
        s = gs.SessionManager(e).create(sampling=gs.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        sizes = set()
        for i in range(64):
            s.send(f"turn {i} of a long chat")
            sizes.add(e.kv_bytes(s.kv))
        assert len(s.token_ids) > 64 * 8 > 8 * model.config.window
        assert sizes == {e.cache.slot_bytes}


def test_system_prompt_snapshot_is_shared(model):
    with _engine(model) as e:
        m = gs.SessionManager(e)
        a = m.create(system=SYSTEM, sampling=P)
        ra = a.send(QUESTIONS[0])
        assert e.stats()["state_snapshots_taken"] >= 1
        b = m.create(system=SYSTEM, sampling=P)
        rb = b.send("something else entirely")
        end = b.conversation.system_end(b.token_ids)
        assert end and rb.stats.cached_tokens == end  # b started from a's snapshot after the system prompt
        assert ra.stats.cached_tokens == 0
    conv = gs.sessions.conversation.Conversation(model.tokenizer, SYSTEM)
    assert rb.token_ids == _alone(model, conv.prompt_for(conv.user_message("something else entirely")),
                                  P.max_tokens)


def test_fork_starts_from_the_parents_state(model):
    with _engine(model) as e:
        m = gs.SessionManager(e)
        parent = m.create(system=SYSTEM, sampling=P)
        for q in QUESTIONS[:2]:
            parent.send(q)
        child = m.fork(parent.id)
        rc = child.send(QUESTIONS[2])
        rp = parent.send(QUESTIONS[2])
        assert rc.token_ids == rp.token_ids == _reference_turns(model)[2]
        assert rc.stats.cached_tokens == rp.stats.cached_tokens > 0


def test_slot_pressure_evicts_idle_sessions_and_recomputes(model):
    slot = model.net.new_slots(1).slot_bytes()
    with _engine(model, kv_cache_bytes=slot * 3, max_batch=4) as e:  # 3 slots for 5 sessions
        m = gs.SessionManager(e)
        sessions = [m.create(system=f"system {i}", sampling=P) for i in range(5)]
        got = {i: [] for i in range(5)}
        for q in QUESTIONS[:3]:
            for i, s in enumerate(sessions):
                got[i].append(s.send(q).token_ids)
        st = e.stats()
        assert st["session_kv_evictions"] > 0 and st["failed"] == 0
    for i in range(5):
        assert got[i] == _reference_turns(model, f"system {i}", QUESTIONS[:3])


def test_concurrent_sessions_from_many_threads(model):
    ref = {i: _reference_turns(model, f"sys {i}", QUESTIONS[:2]) for i in range(8)}
    got, errors = {}, []
    with _engine(model, max_batch=8) as e:
        m = gs.SessionManager(e)

        def chat(i):
            try:
                s = m.create(system=f"sys {i}", sampling=P)
                got[i] = [s.send(q).token_ids for q in QUESTIONS[:2]]
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and got == ref


def test_store_restart_continue_equals_never_saved(model, tmp_path):
    reference = _reference_turns(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system=SYSTEM, sampling=P)
        got = [s.send(q).token_ids for q in QUESTIONS[:2]]
        sid = s.id
        m.close()
    with _engine(model) as e:  # a new process: fresh engine, same store
        m = gs.SessionManager(e, store=tmp_path)
        s = m.get(sid)
        r = s.send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens > 0
        assert r.stats.prefilled_tokens == r.stats.prompt_tokens - r.stats.cached_tokens < 30
        got += [r.token_ids, s.send(QUESTIONS[3]).token_ids]
        m.close()
    assert got == reference


def test_session_file_holds_the_state_and_refuses_a_foreign_model(model, tmp_path):
    path = tmp_path / "g.gsession"
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.create(system=SYSTEM, sampling=P)
        s.send(QUESTIONS[0])
        m.export(s.id, path, quantize=True)  # quantization does not apply to a recurrent state: stored exactly
        follow = s.send(QUESTIONS[1]).token_ids
        snap = e.export_kv(s.kv)
    _, loaded = decode_session(path.read_bytes(), model_fingerprint=None, tokenizer_fingerprint=None)
    assert isinstance(loaded, StateSnapshot) and isinstance(snap, StateSnapshot)
    assert loaded.nbytes() == snap.nbytes()  # the same fixed size, whatever the length
    with _engine(model) as e:
        r = gs.SessionManager(e).import_file(path).send(QUESTIONS[1])
        assert r.token_ids == follow and r.stats.kv_source == "memory" and r.stats.cached_tokens > 20
    gemma = tiny_model("gemma3", seed=1)
    with gs.Engine(gemma, kv_cache_bytes=4 << 20) as e:
        m = gs.SessionManager(e)
        with pytest.raises(gs.SessionFileError, match="another model"):
            m.import_file(path)
        assert m.list() == []
        with pytest.raises(ValueError):  # and a state never goes into a paged KV cache, nor the reverse
            e.import_kv(e.new_kv(), loaded)


def test_state_slot_is_reset_between_sequences(model):
    """A slot reused by another sequence must not leak the previous occupant's state."""
    slot = model.net.new_slots(1).slot_bytes()
    p1 = model.tokenizer.encode("the user the model " * 3, add_bos=True)
    p2 = model.tokenizer.encode("in er in er", add_bos=True)
    with _engine(model, kv_cache_bytes=slot * 2, max_batch=1) as e:
        a = e.submit(p1, P).result().token_ids
        b = e.submit(p2, P).result().token_ids
    assert a == _alone(model, p1, P.max_tokens) and b == _alone(model, p2, P.max_tokens)


def test_bfloat16_model_serves_sessions():
    m = tiny_griffin_model(seed=4, weight_format="bfloat16")
    with _engine(m) as e:
        s = gs.SessionManager(e).create(system=SYSTEM, sampling=P)
        r1, r2 = s.send(QUESTIONS[0]), s.send(QUESTIONS[1])
        assert len(r1.token_ids) == len(r2.token_ids) == P.max_tokens and r2.stats.cached_tokens > 0
        assert e.cache.pool.k[2].dtype == torch.bfloat16 and e.cache.pool.rnn[0].dtype == torch.float32
