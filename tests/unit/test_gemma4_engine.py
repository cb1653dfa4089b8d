"""Gemma 4 through the engine, sessions and the store, on tiny random models (float32): the invariants the Gemma 3
tests check (tests/unit/test_engine.py, test_sessions.py, test_store.py), over Gemma 4's paged layout.

The "all" config switches on every feature the cache must get right: two KV-shared layers of each type reading their
source's pages, attention_k_eq_v, the MoE block, per-layer embeddings and a sliding window of 5 tokens, far shorter
than the sequences (block size 4, so windows end mid-page). "plain" is KV sharing alone (k_eq_v off, one page shape).
Reference for every comparison: ``generate_tokens`` (one sequence, ``Gemma4Model``'s dense KV, no engine).

Seed 2 of "all" greedily writes varied tokens (most random tiny models repeat one token, which would let a wrong
cache pass); ``_varied`` checks that it still does.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.cache.kv import KVLayout
from gemma_sessions.engine import Engine
from gemma_sessions.engine.runner import PagedConfig, PagedModel
from gemma_sessions.generate import generate_tokens
from gemma_sessions.models.gemma import GemmaModel
from gemma_sessions.models.gemma4 import Gemma4Model
from gemma_sessions.testing import tiny_gemma4_model, tiny_model

GREEDY = gs.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PARAMS = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
QUESTIONS = ["first question", "second one", "a third", "the fourth"]
BLOCK = 4


@pytest.fixture(scope="module")
def model():
    return tiny_gemma4_model("all", seed=2)


@pytest.fixture(scope="module", params=["all", "plain"])
def any_model(request, model):
    return model if request.param == "all" else tiny_gemma4_model("plain", seed=2)


def _prompt(i: int, n: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return [2] + torch.randint(7, 400, (n,), generator=g).tolist()


def _ref(model, prompt, params=GREEDY) -> list[int]:
    return list(generate_tokens(model, prompt, params))


def _varied(tokens: list[int]) -> None:
    assert len(set(tokens)) >= 4, f"the reference repeats itself ({tokens}): pick a seed whose tokens vary"


def _engine(model, **kw) -> Engine:
    return Engine(model, kv_cache_bytes=kw.pop("kv_cache_bytes", 4 << 20), block_size=BLOCK, **kw)


class Recorder:
    """Records the prompt ids a session submits to its engine (the exact prompt the reference must see)."""

    def __init__(self, engine: Engine):
        self.prompts: list[list[int]] = []
        submit = engine.submit

        def recording(prompt_ids, *args, **kwargs):
            self.prompts.append(list(prompt_ids))
            return submit(prompt_ids, *args, **kwargs)

        engine.submit = recording


# ------------------------------------------------------------------------------------------ the interface
def test_both_gemma_models_are_paged_models_and_the_engine_takes_them(model):
    """The engine serves what implements ``runner.PagedModel`` (not a list of classes): both decoders and their
    configs conform; a RecurrentGemma net does not (it gets the state cache)."""
    from gemma_sessions.testing import tiny_griffin_model

    g3 = tiny_model("gemma3", seed=1)
    for m in (model, g3):
        assert isinstance(m.net, PagedModel) and isinstance(m.config, PagedConfig)
    assert isinstance(model.net, Gemma4Model) and isinstance(g3.net, GemmaModel)
    assert not isinstance(tiny_griffin_model(seed=1).net, PagedModel)
    assert not isinstance(object(), PagedModel)
    methods = [n for n, v in vars(PagedModel).items() if callable(v) and not n.startswith("_")]
    assert {"hidden", "logits", "attention_params", "can_greedy_head", "greedy_head", "can_decode_stack",
            "hidden_decode_stack", "prepare_greedy", "prepare_i16"} <= set(methods)
    for cls in (Gemma4Model, GemmaModel):  # the same parameter names as the Protocol
        for name in methods:
            want = list(inspect.signature(getattr(PagedModel, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
    with _engine(model) as e:
        assert e.cache.layout == KVLayout.for_config(model.config, BLOCK)
        assert not e.cache.layout.is_uniform  # two page shapes and KV-shared layers


# ------------------------------------------------------------------------------------------ engine
def test_batched_equals_alone(any_model):
    """Several prompts longer than the window, prefilled in chunks of 12 tokens beside each other's decode rows:
    each gets the tokens it gets alone on the dense cache."""
    prompts = [_prompt(i, 10 + 7 * i) for i in range(5)]
    refs = [_ref(any_model, p) for p in prompts]
    with _engine(any_model, max_batched_tokens=12) as e:
        outs = [s.result().token_ids for s in [e.submit(p, GREEDY) for p in prompts]]
    assert outs == refs


def test_cached_equals_uncached_across_turns(model):
    """A KV handle reused over turns (cached) gives the tokens of a fresh dense computation of the whole history
    (uncached), and each turn computes only its new tail."""
    with _engine(model) as e:
        kv = e.new_kv()
        history = _prompt(1, 13)
        for turn in range(4):
            out = e.submit(history, GREEDY, kv=kv).result()
            ref = _ref(model, history)
            _varied(ref)
            assert out.token_ids == ref
            if turn:  # everything but the last sampled token (never fed back) was cached
                assert out.stats.cached_tokens == len(history) - 5
            assert out.stats.cached_tokens + out.stats.prefilled_tokens == out.stats.prompt_tokens
            history = history + out.token_ids + _prompt(10 + turn, 4)[1:]


def test_prefix_shared_across_sequences_is_computed_once(model):
    """A prompt sharing a long prefix (12 windows) with an earlier one starts from its cached blocks, block
    aligned, and still gets the reference tokens: prefix reuse works over sliding and KV-shared layers."""
    system = _prompt(5, 60)
    with _engine(model) as e:
        first = e.submit(system + [9, 10, 11], GREEDY).result()
        second = e.submit(system + [12, 13], GREEDY).result()
    assert first.stats.cached_tokens == 0
    assert second.stats.cached_tokens == (len(system) // BLOCK) * BLOCK
    assert second.token_ids == _ref(model, system + [12, 13])


def test_fork_diverges_only_after_the_fork(model):
    """A forked handle shares the parent's KV (a partial last page, copied on write) and each side then gets the
    tokens of its own history computed fresh; nothing one writes shows in the other."""
    with _engine(model) as e:
        kv = e.new_kv()
        base = _prompt(2, 21)  # ends mid-page
        out = e.submit(base, GREEDY, kv=kv).result()
        child = e.fork_kv(kv)
        a = base + out.token_ids + [20, 21, 22]
        b = base + out.token_ids + [30, 31]
        ra = e.submit(a, GREEDY, kv=kv).result()
        rb = e.submit(b, GREEDY, kv=child).result()
        again = e.submit(a + ra.token_ids + [40], GREEDY, kv=kv).result()  # the parent, after the child wrote
    assert ra.token_ids == _ref(model, a) and rb.token_ids == _ref(model, b)
    assert ra.token_ids != rb.token_ids  # they did diverge
    assert rb.stats.cached_tokens == len(base) + len(out.token_ids) - 1
    assert again.token_ids == _ref(model, a + ra.token_ids + [40])


def test_export_import_continues_like_never_saved(model):
    """A handle's KV exported (a CPU snapshot), imported into a NEW engine, continues with the tokens of the
    never-saved run, computing only the new tokens."""
    history = _prompt(3, 25)
    with _engine(model) as e:
        kv = e.new_kv()
        out = e.submit(history, GREEDY, kv=kv).result()
        snap = e.export_kv(kv)
    follow = history + out.token_ids + [7, 8, 9]
    with _engine(model) as e:
        kv = e.new_kv()
        e.check_snapshot(snap)
        assert e.import_kv(kv, snap)
        r = e.submit(follow, GREEDY, kv=kv).result()
    assert r.token_ids == _ref(model, follow)
    assert r.stats.cached_tokens == snap.num_tokens == len(history) + len(out.token_ids) - 1


def test_export_of_a_diverged_history_holds_its_cached_prefix(model):
    """Gemma 4's history drops the thought channel the model saw before its answer, so a session's history parts from
    its handle's KV 13 tokens before the end, more than a window (5) back. ``export_kv(handle, history)`` copies the
    longest cached block-aligned prefix of the history (its sliding pages from the prefix cache): a new engine
    continues the history from it with the never-saved tokens. The handle's own copy could not (its sliding layers
    hold only their last window); without ``tokens`` the copy is still the handle's own."""
    prompt = _prompt(6, 40)
    with _engine(model) as e:
        kv = e.new_kv()
        out = e.submit(prompt, GREEDY, kv=kv).result()
        own = e.export_kv(kv)
        history = prompt[:-5] + out.token_ids[:4] + [11, 12]  # parts from the KV at len(prompt) - 5
        before = e.stats()
        snap = e.export_kv(kv, history)
        after = e.stats()
    for counter in ("prefix_queried_tokens", "prefix_hit_tokens"):  # an export is no request: no prefix hit counted
        assert after[counter] == before[counter]
    assert own.tokens == tuple(prompt + out.token_ids[:-1])
    assert snap.tokens == tuple(history[:(len(prompt) - 5) // BLOCK * BLOCK])
    follow = history + [13, 14]
    with _engine(model) as e:
        kv = e.new_kv()
        assert e.import_kv(kv, snap)
        r = e.submit(follow, GREEDY, kv=kv).result()
    assert r.token_ids == _ref(model, follow) and r.stats.cached_tokens == len(snap.tokens)
    with _engine(model) as e:  # the handle's own copy restores, but only as far as its sliding pages allow: nothing
        kv = e.new_kv()
        assert e.import_kv(kv, own)
        r = e.submit(follow, GREEDY, kv=kv).result()
    assert r.token_ids == _ref(model, follow) and r.stats.cached_tokens == 0


def test_a_snapshot_of_another_layout_is_refused(model):
    """A Gemma 4 snapshot does not restore into a Gemma 3 engine (other page shapes, groups, sharing)."""
    with _engine(model) as e:
        kv = e.new_kv()
        e.submit(_prompt(4, 10), GREEDY, kv=kv).result()
        snap = e.export_kv(kv)
    with _engine(tiny_model("gemma3", seed=1)) as e, pytest.raises(gs.SessionFileError):
        e.check_snapshot(snap)


# ------------------------------------------------------------------------------------------ sessions
@pytest.fixture
def manager(model):
    with _engine(model, kv_cache_bytes=8 << 20) as engine:
        yield gs.SessionManager(engine)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_session_turns_reuse_kv_and_match_a_fresh_computation(manager, model):
    """Each reply equals a dense computation of the exact prompt the session sent; turn N+1 starts from turn N's
    KV: all the tokens it shares with turn N's computed ones, at least block aligned, come from the cache."""
    rec = Recorder(manager.engine)
    s = manager.create(system="be brief", sampling=PARAMS)
    computed: list[int] = []
    for i, q in enumerate(QUESTIONS[:3]):
        reply = s.send(q)
        prompt = rec.prompts[-1]
        assert reply.token_ids == _ref(model, prompt, PARAMS)
        assert reply.stats.prompt_tokens == len(prompt)
        if i:
            common = _common(computed, prompt)
            assert common > len(computed) // 2  # the history the previous turn computed is the new prompt's head
            assert common // BLOCK * BLOCK <= reply.stats.cached_tokens <= common
            assert reply.stats.prefilled_tokens == len(prompt) - reply.stats.cached_tokens
        computed = prompt + list(reply.token_ids)[:-1]  # the last sampled token is never fed back
    assert s.stats["turns"] == 3


def test_a_history_that_dropped_computed_tokens_keeps_its_prefix_held(model):
    """Gemma 4's history drops the reply's thought channel (the empty one when reasoning is off), so a turn's KV no
    longer leads to the history. The session then holds the history's cached prefix itself: memory pressure (here:
    every block no sequence holds forgotten) between turns costs the next turn nothing. Without that the prefix
    lived only in the prefix cache, and the next turn recomputed the whole history."""
    cached = {}
    for pressure in (False, True):
        with _engine(model, kv_cache_bytes=8 << 20) as engine:
            s = gs.SessionManager(engine).create(system="be brief", sampling=PARAMS)
            s.send(QUESTIONS[0])
            history = s.conversation.token_ids
            held = engine.kv_tokens(s.kv)  # the history's cached prefix: up to where turn 1 parted from it
            assert 0 < held < len(history) and held % BLOCK == 0
            if pressure:
                engine.reset_prefix_cache()
            cached[pressure] = s.send(QUESTIONS[1]).stats.cached_tokens
    assert cached[True] == cached[False] >= held


def test_forked_session_diverges_only_after_the_fork(manager, model):
    """A fork holds the parent's history; the same message gives both the same reply, different ones give each
    the reply to its own history, and the prompts agree on everything before the fork's first own token."""
    rec = Recorder(manager.engine)
    s = manager.create(sampling=PARAMS)
    s.send("hello there")
    f = manager.fork(s.id)
    assert f.token_ids == s.token_ids and f.id != s.id
    shared = list(s.token_ids)
    a, b = f.send("next"), s.send("next")
    assert a.token_ids == b.token_ids and a.stats.cached_tokens > 0
    c, d = f.send("the fork asks"), s.send("the parent asks something else")
    pc, pd = rec.prompts[-2], rec.prompts[-1]
    assert pc[:len(shared)] == pd[:len(shared)] == shared
    assert c.token_ids == _ref(model, pc, PARAMS) and d.token_ids == _ref(model, pd, PARAMS)
    assert c.token_ids != d.token_ids


# ------------------------------------------------------------------------------------------ store and files
def _never_saved(model) -> tuple[list[list[int]], list[int]]:
    """Each turn's reply tokens and cached token count, in one engine, never saved."""
    with _engine(model) as e:
        s = gs.SessionManager(e).create(system="sys", sampling=PARAMS)
        replies = [s.send(q) for q in QUESTIONS]
    _varied([t for r in replies for t in r.token_ids])
    return [r.token_ids for r in replies], [r.stats.cached_tokens for r in replies]


def test_store_restart_continues_like_never_saved(model, tmp_path):
    """Two turns, the manager closed (snapshots written), a new engine and manager on the same store: the next turns
    restore the KV from the snapshot and give the never-saved tokens, reusing as much KV as the never-saved turn did
    (the history up to the last answer, which Gemma 4 recomputes anyway: its KV followed thoughts history drops)."""
    reference, cached = _never_saved(model)
    with _engine(model) as e:
        m = gs.SessionManager(e, store=tmp_path)
        s = m.create(system="sys", sampling=PARAMS)
        got = [s.send(q).token_ids for q in QUESTIONS[:2]]
        sid, held = s.id, len(s.token_ids)
        m.close()
    with _engine(model) as e:  # a "new process": fresh engine, same store
        m = gs.SessionManager(e, store=tmp_path)
        s = m.get(sid)
        r = s.send(QUESTIONS[2])
        assert r.stats.kv_source == "snapshot"
        assert r.stats.cached_tokens == cached[2] and r.stats.cached_tokens > held // 2
        got += [r.token_ids, s.send(QUESTIONS[3]).token_ids]
        m.close()
    assert got == reference


def test_a_spill_under_memory_pressure_keeps_the_history_prefix(model, tmp_path):
    """An idle session evicted under memory pressure (three other sessions' long turns) is spilled as the KV of its
    history's cached prefix (the store passes the history: ``Engine.spill_history``), not its handle's own copy,
    which parted from the history at the dropped thoughts more than a window back and could only be refused: the
    next turn restores it and reuses as much KV as the never-evicted turn, with the same tokens."""
    with _engine(model) as e:
        s = gs.SessionManager(e).create(system="sys", sampling=PARAMS)
        ref = [s.send(q) for q in QUESTIONS[:3]]
    page = KVLayout.for_config(model.config, BLOCK).page_bytes(torch.float32)
    with _engine(model, kv_cache_bytes=80 * page) as e:
        m = gs.SessionManager(e, store=tmp_path)
        a = m.create(system="sys", sampling=PARAMS)
        for q in QUESTIONS[:2]:
            a.send(q)
        for i in range(3):
            m.create(sampling=PARAMS).send(f"{i} a long message " * 4)
        m.store.flush()
        assert a.kv.evictions == 1
        r = a.send(QUESTIONS[2])
        m.close()
    assert r.stats.kv_source == "snapshot" and r.stats.cached_tokens == ref[2].stats.cached_tokens > 0
    assert r.token_ids == ref[2].token_ids


def test_session_file_export_import_continues_like_never_saved(model, tmp_path):
    """A session exported to a file (format 2: Gemma 4's page shapes and layout fingerprint) and imported into a new
    engine continues with the never-saved tokens from its KV."""
    reference, cached = _never_saved(model)
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.create(system="sys", sampling=PARAMS)
        for q in QUESTIONS[:2]:
            s.send(q)
        path = tmp_path / "s.gsession"
        m.export(s.id, path)
    with _engine(model) as e:
        m = gs.SessionManager(e)
        s = m.import_file(path)
        r = s.send(QUESTIONS[2])
    assert r.token_ids == reference[2] and r.stats.kv_source == "memory"
    assert r.stats.cached_tokens == cached[2] > 20
