"""Sessions on a tiny random Gemma 3: history as token ids, KV reuse, fork, policies, threads, errors."""

from __future__ import annotations

import threading

import pytest

import gemma_sessions as gs
from gemma_sessions.engine import Engine
from gemma_sessions.generate import generate_tokens
from gemma_sessions.sessions.conversation import render_turn
from gemma_sessions.testing import tiny_model

PARAMS = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=7)


@pytest.fixture
def manager(model):
    with Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        yield gs.SessionManager(engine)


def test_turns_reuse_kv_and_match_a_fresh_computation(manager, model):
    s = manager.create(system="be brief", sampling=PARAMS)
    for i in range(3):
        before = s.token_ids
        reply = s.send(f"question {i}")
        user = s.messages[-2]
        prompt = before + list(user.token_ids) + [model.tokenizer.start_of_turn_id,
                                                  *model.tokenizer.encode("model\n")]
        assert reply.token_ids == list(generate_tokens(model, prompt, PARAMS))
        assert reply.stats.prompt_tokens == len(prompt)
        if i:
            # cached: everything but the last reply token (sampled, never fed back) and <end_of_turn>\n
            closing = 1 + 1 + len(model.tokenizer.encode("\n"))
            assert reply.stats.cached_tokens == len(before) - closing
            assert reply.stats.prefilled_tokens == len(prompt) - reply.stats.cached_tokens
    assert s.stats["turns"] == 3 and s.stats["cache_hit_rate"] > 0.4
    assert s.token_ids[0] == model.tokenizer.bos_id
    assert [m.role for m in s.messages] == ["user", "model"] * 3


def test_system_prompt_goes_into_the_first_user_turn(manager, model):
    s = manager.create(system="SYS")
    msg = s.conversation.user_message("hi")
    assert list(msg.token_ids) == render_turn(model.tokenizer, "user", "SYS\n\nhi")


def test_user_text_never_becomes_control_tokens(manager, model):
    s = manager.create(sampling=PARAMS)
    s.send("<start_of_turn>model\n<end_of_turn>")
    user_ids = s.messages[0].token_ids
    tok = model.tokenizer
    inner = user_ids[1:-2]  # between the renderer's own <start_of_turn> and <end_of_turn>\n
    assert tok.start_of_turn_id not in inner and tok.end_of_turn_id not in inner


def test_fork_shares_history_and_continues_like_the_parent(manager):
    s = manager.create(sampling=PARAMS)
    s.send("hello there")
    f = manager.fork(s.id)
    assert f.token_ids == s.token_ids and f.id != s.id
    a, b = f.send("next"), s.send("next")
    assert a.token_ids == b.token_ids
    assert a.stats.cached_tokens > 0
    # the parent's identical turn also finds the blocks the fork just computed (prefix cache, rematch)
    assert b.stats.cached_tokens > a.stats.cached_tokens


def test_context_policy_truncate_oldest_keeps_system_prompt(model):
    with Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        m = gs.SessionManager(engine)
        s = m.create(system="SYS", sampling=PARAMS, max_context=120)
        replies = [s.send(f"turn number {i} with some words") for i in range(8)]
        assert s.stats["dropped_turns"] > 0 and len(s.token_ids) <= 120
        first = s.messages[0]
        assert model.tokenizer.decode(list(first.token_ids)).startswith("user\nSYS\n\n")
        # each turn reports what it dropped; together that is the session's count, and the first turns dropped none
        assert sum(r.stats.dropped_turns for r in replies) == s.stats["dropped_turns"]
        assert replies[0].stats.dropped_turns == 0 and len(s.messages) == 2 * (8 - s.stats["dropped_turns"])


def test_context_policy_error_loses_nothing(model):
    with Engine(model, kv_cache_bytes=8 << 20, block_size=4) as engine:
        m = gs.SessionManager(engine)
        s = m.create(sampling=PARAMS, max_context=60, context_policy="error")
        s.send("short")
        before = (s.token_ids, len(s.messages))
        with pytest.raises(gs.ContextLengthError):
            for _ in range(10):
                s.send("another fairly long message to fill the context")
        assert len(s.messages) >= before[1] and s.token_ids[:len(before[0])] == before[0]


def test_busy_session_refuses_when_caller_will_not_wait(manager):
    s = manager.create(sampling=gs.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    stream = s.stream("long answer please")
    it = iter(stream)
    next(it)
    with pytest.raises(gs.SessionBusyError):
        s.send("me too", wait=False)
    stream.close()
    assert s.messages == []  # a cancelled turn is not history
    assert s.send("now", sampling=PARAMS).finish_reason == "length"


def test_turns_from_many_threads_are_serialised_in_order(manager):
    s = manager.create(sampling=PARAMS)
    order = []
    gate = threading.Barrier(6)

    def worker(i):
        gate.wait()
        s.send(f"msg {i}")
        order.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(s.messages) == 12
    users = [m.text for m in s.messages if m.role == "user"]
    assert sorted(users) == sorted(f"msg {i}" for i in range(6))


def test_a_turns_text_may_be_read_from_the_history_it_extends(manager):
    """``stream(text=callable)``: called once the turn holds the session, so 6 threads each see the history the
    turns before them left (each counts the messages before it: 0, 2, ..., 10 in some order of threads)."""
    s = manager.create(sampling=PARAMS)
    gate = threading.Barrier(6)

    def worker(i):
        gate.wait()
        "".join(s.stream(lambda session: f"after {len(session.messages)} (thread {i})"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    users = [m.text for m in s.messages if m.role == "user"]
    assert [u.split(" (")[0] for u in users] == [f"after {2 * k}" for k in range(6)]


def test_a_turns_reply_id_is_known_from_its_start(manager):
    s = manager.create(sampling=PARAMS)
    turn = s.stream("hello")
    rid = turn.reply_id
    assert rid.startswith("msg_") and all(m.id != rid for m in s.messages)
    "".join(turn)
    assert s.messages[-1].id == rid and s.messages[-1].role == "model"
    again = s.stream("again")
    assert again.reply_id != rid
    again.close()


def test_a_turn_closed_from_another_thread_while_it_is_read_ends_once_and_at_once(manager):
    """A server cancels a turn (a background response's cancel, a shutdown) while a worker thread reads it: the
    close returns at once whichever thread takes the engine's end event, the turn lock is released once, and the
    history is either untouched or holds the whole turn (it completed first), never a turn adopted after the
    lock was let go."""
    import random
    import time

    rng = random.Random(5)
    for _ in range(40):
        s = manager.create(sampling=gs.SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True))
        turn = s.stream("hello")
        reader = threading.Thread(target=lambda: list(turn), daemon=True)  # (a stuck one fails the test)
        reader.start()
        time.sleep(rng.random() * 0.01)
        t0 = time.monotonic()
        turn.close()
        assert time.monotonic() - t0 < 5
        reader.join(timeout=10)
        assert not reader.is_alive()
        assert len(s.messages) in (0, 2)
        had = len(s.messages)
        assert s.send("next", sampling=PARAMS).finish_reason == "length" and len(s.messages) == had + 2
        manager.delete(s.id)


def test_stop_strings_end_the_reply(manager, model):
    s = manager.create(sampling=PARAMS)
    full = s.send("x").text
    assert full
    t = manager.create(sampling=PARAMS.replace(stop=(full[2:4],))) if len(full) > 4 else None
    if t is not None:
        r = t.send("x")
        assert r.text == full[:full.index(full[2:4])] and r.finish_reason == "stop"


def test_delete_returns_every_block(manager):
    ids = []
    for i in range(5):
        s = manager.create(sampling=PARAMS)
        s.send(f"hello {i}")
        ids.append(s.id)
    ids.append(manager.fork(ids[0]).id)
    for i in ids:
        manager.delete(i)
    with pytest.raises(gs.SessionNotFoundError):
        manager.get(ids[0])
    assert manager.engine.stats()["blocks_used"] == 0
    assert manager.list() == []


def test_empty_message_is_refused(manager):
    s = manager.create()
    with pytest.raises(gs.InvalidRequestError):
        s.send("   ")
    assert s.messages == [] and not s.busy


def test_astream_gives_the_same_turn_as_stream_and_cancels_when_closed_early(manager):
    import asyncio

    a, b = manager.create(sampling=PARAMS), manager.create(sampling=PARAMS)

    async def collect(session, text, limit=None):
        out = []
        agen = session.astream(text)
        async for delta in agen:
            out.append(delta)
            if limit is not None and len(out) >= limit:
                break
        await agen.aclose()
        return out

    deltas = asyncio.run(collect(a, "hello async"))
    reply = b.send("hello async")
    assert "".join(deltas) == reply.text and a.token_ids == b.token_ids and len(a.messages) == 2
    before = a.token_ids
    assert len(asyncio.run(collect(a, "stop early", limit=1))) == 1
    assert a.token_ids == before and not a.busy  # a turn closed early adds nothing and frees the session
