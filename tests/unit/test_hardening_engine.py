"""Hardening of the engine (issue "Hardening", defects 1 and 4) on tiny random models.

* The loop survives what one request raises: NaN KV (NaN logits), a sampler error, a failed forward, a failed
  admission or scheduling fail that request only; the others get the tokens they get alone.
* A snapshot restored with ``shareable=False`` (a user's file) is a private sequence: nothing it holds or computes
  is ever matched by another sequence through the prefix cache; a shareable one still is.
* ``Engine.check_snapshot`` refuses snapshots that do not fit the engine's cache; ``alive``, ``health()`` and
  ``cancel_all()``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.cache.kv import KVSnapshot
from gemma_sessions.cache.state import StateSnapshot
from gemma_sessions.engine import Engine
from gemma_sessions.generate import generate_tokens
from gemma_sessions.testing import tiny_griffin_model, tiny_model

GREEDY = gs.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SAMPLED = gs.SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True, seed=7)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", seed=3)


@pytest.fixture(scope="module")
def griffin():
    return tiny_griffin_model(seed=3)


def _engine(model, **kw) -> Engine:
    return Engine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 4 << 20), block_size=kw.pop("block_size", 4), **kw)


def _prompt(i: int, n: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return [2] + torch.randint(7, 400, (n,), generator=g).tolist()


def _ref(model, prompt, params=GREEDY) -> list[int]:
    return list(generate_tokens(model, prompt, params))


def _alone_griffin(model, prompt: list[int], n: int) -> list[int]:
    net, state = model.net, model.net.new_sequence(0)
    logits = net.step(torch.tensor(prompt), state, last_only=True)
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = net.step(torch.tensor([out[-1]]), state, last_only=True)
    return out


def _exported(model, prompt: list[int]) -> KVSnapshot | StateSnapshot:
    """The genuine snapshot of ``prompt`` (computed by a handle in a throwaway engine)."""
    with _engine(model) as e:
        h = e.new_kv()
        e.submit(prompt, dataclasses.replace(GREEDY, max_tokens=1), kv=h).result()
        return e.export_kv(h)


def _poisoned(snap, fill: float | None, shareable: bool = False):
    """``snap`` with every float of its KV / state replaced: ``fill`` (NaN, inf) or random values (None)."""
    g = torch.Generator().manual_seed(0)

    def bad(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return torch.full_like(t, fill) if fill is not None else torch.randn(t.shape, generator=g).to(t.dtype) * 3

    if isinstance(snap, StateSnapshot):
        return StateSnapshot(tokens=snap.tokens, state={k: bad(v) for k, v in snap.state.items()}, shareable=shareable)
    return dataclasses.replace(snap, pages=tuple(bad(p) for p in snap.pages), shareable=shareable)


# ---------------------------------------------------------------------------------------------- the loop survives
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_nan_kv_fails_only_its_request_and_the_loop_goes_on(model, params):
    """The issue's crash: NaN KV made the sampler raise inside the loop thread and killed the engine for everyone."""
    a = _prompt(1)
    others = [_prompt(i, 20 + 3 * i) for i in range(2, 5)]
    with _engine(model) as e:
        h = e.new_kv()
        assert e.import_kv(h, _poisoned(_exported(model, a), float("nan")))
        bad = e.submit(a + [40, 41, 42], params, kv=h)
        streams = [e.submit(p, GREEDY) for p in others]
        with pytest.raises(gs.NumericalError, match="non-finite"):
            bad.result()
        assert [s.result().token_ids for s in streams] == [_ref(model, p) for p in others]
        assert e.alive and e.health()["failed"] == 1
        assert e.kv_tokens(h) == 0  # the poisoned KV was dropped, not parked
        again = e.submit(a + [40, 41, 42], GREEDY, kv=h).result()  # the next turn recomputes from token ids
        assert again.token_ids == _ref(model, a + [40, 41, 42]) and again.stats.cached_tokens == 0


def test_nan_state_fails_only_its_request_on_a_recurrent_model(griffin):
    tok = griffin.tokenizer
    a = tok.encode("the user the model " * 3, add_bos=True)
    others = [tok.encode("in er " * k, add_bos=True) for k in (2, 3)]
    with _engine(griffin, kv_cache_bytes=8 << 20) as e:
        h = e.new_kv()
        snap = _exported(griffin, a)
        assert e.import_kv(h, _poisoned(snap, float("inf")))
        bad = e.submit(a + [40, 41], GREEDY, kv=h)
        streams = [e.submit(p, GREEDY) for p in others]
        with pytest.raises(gs.NumericalError):
            bad.result()
        assert [s.result().token_ids for s in streams] == [_alone_griffin(griffin, p, 12) for p in others]
        assert e.alive


def test_nan_rows_in_the_fast_int8_mode_fail_alone():
    """int8 weights: greedy rows go through the greedy head, which hands NaN rows back as plain logits."""
    m = tiny_model("gemma3", seed=5, weight_format="int8")
    a = _prompt(1)
    with _engine(m, max_batched_tokens=256) as e:
        h = e.new_kv()
        assert e.import_kv(h, _poisoned(_exported(m, a), float("nan")))
        bad = e.submit(a + [40], GREEDY, kv=h)
        streams = [e.submit(_prompt(i, 15), GREEDY) for i in range(2, 7)]
        with pytest.raises(gs.NumericalError):
            bad.result()
        outs = [s.result() for s in streams]
        assert all(o.finish_reason == "length" and len(o.token_ids) == GREEDY.max_tokens for o in outs)
        assert e.alive


def test_a_sampler_error_fails_its_request_only(model, monkeypatch):
    import gemma_sessions.engine.request as request_mod

    real = request_mod.Sampler

    class Broken:
        def __init__(self, params):
            self.inner = real(params)
            self.params = params

        def __call__(self, logits, generated=(), constraint=None):
            if self.params.top_k == 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            return self.inner(logits, generated, constraint)

    monkeypatch.setattr(request_mod, "Sampler", Broken)
    others = [_prompt(i, 12) for i in range(2, 4)]
    with _engine(model) as e:
        bad = e.submit(_prompt(1), dataclasses.replace(SAMPLED, top_k=3))
        streams = [e.submit(p, GREEDY) for p in others]
        with pytest.raises(RuntimeError, match="probability tensor"):
            bad.result()
        assert [s.result().token_ids for s in streams] == [_ref(model, p) for p in others]
        assert e.alive


POISON = 401  # a token id no _prompt() draws (they are in 7..399)


def test_a_failed_forward_fails_its_batch_only(model):
    with _engine(model, max_batch=1) as e:  # one request per step: the batch is the poisoned request
        real = e._run

        def run(net, cache, items, greedy):
            if any(POISON in it.seq.tokens for it in items):
                raise RuntimeError("the forward broke")
            return real(net, cache, items, greedy)

        e._run = run
        h = e.new_kv()
        e.submit(_prompt(1), GREEDY, kv=h).result()
        bad = e.submit(_prompt(1) + [POISON], GREEDY, kv=h)
        good = [e.submit(_prompt(i), GREEDY) for i in (2, 3)]
        with pytest.raises(RuntimeError, match="the forward broke"):
            bad.result()
        assert [s.result().token_ids for s in good] == [_ref(model, _prompt(i)) for i in (2, 3)]
        assert e.alive and e.kv_tokens(h) == 0  # its KV was dropped: the next turn recomputes
        e._run = real
        again = e.submit(_prompt(1) + [POISON], GREEDY, kv=h).result()
        assert again.token_ids == _ref(model, _prompt(1) + [POISON])


@pytest.mark.parametrize("where", ["start", "allocate"])
def test_an_admission_or_scheduling_error_fails_that_request_only(model, where):
    with _engine(model) as e:
        real = getattr(e.cache, where)

        def broken(seq_or_tokens, *args):
            tokens = seq_or_tokens if isinstance(seq_or_tokens, list) else seq_or_tokens.tokens
            if POISON in tokens:
                raise KeyError("bookkeeping broke")
            return real(seq_or_tokens, *args)

        setattr(e.cache, where, broken)
        bad = e.submit(_prompt(1) + [POISON], GREEDY)
        good = [e.submit(_prompt(i), GREEDY) for i in (2, 3)]
        with pytest.raises(KeyError, match="bookkeeping broke"):
            bad.result()
        assert [s.result().token_ids for s in good] == [_ref(model, _prompt(i)) for i in (2, 3)]
        assert e.alive
        e.cache.pool.check_invariants()


def test_an_unexpected_loop_failure_still_ends_the_engine_visibly(model):
    e = _engine(model)

    def broken() -> None:
        raise RuntimeError("outside any request")

    e._reap_cancelled = broken
    s = e.submit(_prompt(1), GREEDY)
    with pytest.raises(gs.EngineClosedError):
        s.result(timeout=30)
    e._thread.join(timeout=30)
    assert not e.alive
    health = e.health()
    assert health["alive"] is False and health["error"] == "RuntimeError"
    assert e.cancel_all() == 0
    e.close()


def test_health_alive_and_cancel_all(model):
    e = _engine(model, max_batch=1)
    assert e.alive and e.health() == {"alive": True, "running": 0, "waiting": 0, "parked": 0, "failed": 0,
                                      "error": None}
    long = dataclasses.replace(GREEDY, max_tokens=200)
    streams = [e.submit(_prompt(i, 20), long) for i in range(4)]
    n = e.cancel_all()
    outs = [s.result(timeout=60) for s in streams]
    assert n >= 3 and sum(o.finish_reason == "cancelled" for o in outs) == n
    assert e.submit(_prompt(9), GREEDY).result().token_ids == _ref(model, _prompt(9))  # it keeps serving
    e.close()
    assert not e.alive and e.health()["alive"] is False and e.cancel_all() == 0


# ---------------------------------------------------------------------------------------------- private KV
def test_private_snapshot_is_never_shared(model):
    """The issue's poisoning: imported blocks entered the prefix cache and another user's conversation opening with
    the same tokens picked them up. Here the imported KV is made up (finite, wrong) and private."""
    a = _prompt(1, 33)
    fake = _poisoned(_exported(model, a), None)
    with _engine(model) as e:
        h = e.new_kv()
        assert e.import_kv(h, fake)
        # what the private sequence computes on top of its KV stays private too, and so does a fork's
        turn = e.submit(a + [60, 61, 62, 63, 64], GREEDY, kv=h).result()
        assert turn.stats.cached_tokens == len(a)  # its own KV serves itself
        child = e.fork_kv(h)
        grown = a + [60, 61, 62, 63, 64] + turn.token_ids
        e.submit(grown + [70, 71, 72, 73], GREEDY, kv=child).result()
        snap = e.export_kv(child)
        assert snap.shareable is False and e.export_kv(h).shareable is False
        probes: list[list[int]] = []
        for p in (a + [50, 51], grown + [80], list(snap.tokens) + [81, 82]):
            r = e.submit(p, GREEDY).result()
            # cached: only what an earlier probe (a normal sequence) computed, never the private blocks
            legit = max((_shared_blocks(p, q) * 4 for q in probes), default=0)
            assert r.stats.cached_tokens == legit and r.token_ids == _ref(model, p)
            probes.append(p)


def _shared_blocks(p: list[int], q: list[int], block_size: int = 4) -> int:
    """Full blocks of ``q`` that begin ``p`` (what the prefix cache may share between them: at most len(p) - 1)."""
    n = 0
    while n < min(len(p), len(q)) and p[n] == q[n]:
        n += 1
    return min(n, len(q), len(p) - 1) // block_size


def test_shareable_snapshot_still_shares_and_private_kv_recomputed_is_shared_again(model):
    a = _prompt(1, 33)
    genuine = _exported(model, a)
    assert genuine.shareable
    with _engine(model) as e:
        assert e.import_kv(e.new_kv(), genuine)
        r = e.submit(a + [50, 51], GREEDY).result()
        assert r.stats.cached_tokens == (len(a) // 4) * 4 and r.token_ids == _ref(model, a + [50, 51])
    with _engine(model) as e:
        h = e.new_kv()
        assert e.import_kv(h, dataclasses.replace(genuine, shareable=False))
        e.release_kv(h)  # the private KV is gone; the next turn recomputes it from token ids: normal blocks
        again = e.submit(a + [60], GREEDY, kv=h).result()
        assert again.stats.cached_tokens == 0 and e.export_kv(h).shareable
        r = e.submit(a + [50, 51], GREEDY).result()
        assert r.stats.cached_tokens == (len(a) // 4) * 4 and r.token_ids == _ref(model, a + [50, 51])


def test_private_state_snapshot_is_never_shared_on_a_recurrent_model(griffin):
    tok = griffin.tokenizer
    a = tok.encode("the user the model " * 3, add_bos=True)
    follow = a + tok.encode(" in er")
    genuine = _exported(griffin, a)
    with _engine(griffin, kv_cache_bytes=8 << 20) as e:
        h = e.new_kv()
        assert e.import_kv(h, _poisoned(genuine, None))
        child = e.fork_kv(h)
        assert e.export_kv(child).shareable is False
        e.release_kv(h)  # freed: a shareable sequence's state would become a snapshot here
        e.submit(a + [40, 41], GREEDY, kv=child, checkpoints=[len(a) + 1]).result()
        e.release_kv(child)
        r = e.submit(follow, GREEDY).result()
        assert r.stats.cached_tokens == 0 and r.token_ids == _alone_griffin(griffin, follow, 12)
    with _engine(griffin, kv_cache_bytes=8 << 20) as e:  # a shareable one becomes a snapshot when freed
        h = e.new_kv()
        assert e.import_kv(h, genuine)
        e.release_kv(h)
        r = e.submit(follow, GREEDY).result()
        assert r.stats.cached_tokens == len(a) and r.token_ids == _alone_griffin(griffin, follow, 12)


# ---------------------------------------------------------------------------------------------- check_snapshot
def test_check_snapshot_refuses_what_does_not_fit(model):
    a = _prompt(1, 33)
    snap = _exported(model, a)
    with _engine(model) as e:
        e._call = None  # check_snapshot never needs the loop thread
        e.check_snapshot(snap)
        bad = {
            "block size": _exported_with(model, a, block_size=8),
            "groups": _exported_with(tiny_model("gemma2", seed=3), a),
            "shape": dataclasses.replace(snap, pages=tuple(p[..., :8] for p in snap.pages)),
            "vocab": dataclasses.replace(snap, tokens=snap.tokens[:-1] + (model.config.vocab_size,)),
            "negative": dataclasses.replace(snap, tokens=(-1,) + snap.tokens[1:]),
            "context": dataclasses.replace(snap, tokens=snap.tokens * 9),
            "missing block": dataclasses.replace(snap, pages=tuple(p[:-1] for p in snap.pages),
                                                 index=tuple(ix[:-1] for ix in snap.index)),
            "index range": dataclasses.replace(snap, index=tuple(ix[:-1] + (10 ** 9,) for ix in snap.index)),
            "index order": dataclasses.replace(snap, index=tuple(tuple(reversed(ix)) for ix in snap.index)),
            "kind": StateSnapshot(tokens=snap.tokens, state={}),
        }
        for reason, s in bad.items():
            with pytest.raises(gs.SessionFileError):
                e.check_snapshot(s)
    with _engine(model) as e:
        for reason, s in bad.items():
            if reason != "kind":
                with pytest.raises(gs.SessionFileError):
                    e.import_kv(e.new_kv(), s)
        with pytest.raises(ValueError):  # the other kind of snapshot is a caller's mistake, as before
            e.import_kv(e.new_kv(), bad["kind"])
        assert e.submit(a, GREEDY).result().token_ids == _ref(model, a)  # and nothing leaked
        e.cache.pool.check_invariants()


def _exported_with(model, prompt, block_size=4):
    with _engine(model, block_size=block_size) as e:
        h = e.new_kv()
        e.submit(prompt, dataclasses.replace(GREEDY, max_tokens=1), kv=h).result()
        return e.export_kv(h)


def test_check_snapshot_refuses_a_misfit_recurrent_state(griffin):
    tok = griffin.tokenizer
    snap = _exported(griffin, tok.encode("the user the model", add_bos=True))
    state = snap.state
    some = next(k for k in state if k.startswith("rnn."))
    bad = {
        "missing": {k: v for k, v in state.items() if k != some},
        "extra": {**state, "rnn.99": state[some]},
        "shape": {**state, some: state[some][..., :-1]},
        "dtype": {**state, some: state[some].double()},
        "kpos": {**state, "kpos": torch.full_like(state["kpos"], 10 ** 6)},
    }
    with _engine(griffin, kv_cache_bytes=8 << 20) as e:
        e.check_snapshot(snap)
        for reason, s in bad.items():
            with pytest.raises(gs.SessionFileError):
                e.check_snapshot(StateSnapshot(tokens=snap.tokens, state=s))
            with pytest.raises(gs.SessionFileError):
                e.import_kv(e.new_kv(), StateSnapshot(tokens=snap.tokens, state=s))
        with pytest.raises(gs.SessionFileError):
            e.check_snapshot(_exported(tiny_model("gemma3", seed=3), _prompt(1)))
        assert e.cache.stats()["state_slots_used"] == 0  # no slot leaked by a refusal
