"""Engine behaviour on tiny random models (float32): the correctness invariants of KV reuse and batching.

Reference for every comparison: ``generate_tokens`` (one sequence, dense KV, no engine).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import gemma_sessions as gs
from gemma_sessions.cache.kv import KVLayout
from gemma_sessions.engine import Engine
from gemma_sessions.generate import generate_tokens
from gemma_sessions.testing import tiny_model

GREEDY = gs.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def model(request):
    return tiny_model(request.param, seed=3)


def _prompt(i: int, n: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(i)
    return [2] + torch.randint(7, 400, (n,), generator=g).tolist()


def _ref(model, prompt, params=GREEDY):
    return list(generate_tokens(model, prompt, params))


def test_batched_equals_alone(model):
    prompts = [_prompt(i, 10 + 7 * i) for i in range(6)]
    refs = [_ref(model, p) for p in prompts]
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=12) as e:
        outs = [s.result().token_ids for s in [e.submit(p, GREEDY) for p in prompts]]
    assert outs == refs


def test_dense_prefill_in_blocks_equals_one_attention(model, monkeypatch):
    """generate()'s dense cache attends a long prompt in blocks of PREFILL_BLOCK queries, each block's keys from its
    own window start to its last query (as the engine's chunks): the logits of one attention over the whole prompt
    up to float32 rounding, the same greedy tokens, and the engine chunked alike gives them too (window 8 here)."""
    from gemma_sessions.models import gemma

    prompt = _prompt(5, 60)
    ref = _ref(model, prompt)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.net.step(torch.tensor(prompt), model.net.new_sequence(len(prompt)))

    one = logits()
    monkeypatch.setattr(gemma, "PREFILL_BLOCK", 8)
    blocks = logits()
    # float32 rounding relative to the logits' scale: torch's float32 GEMMs sum in an order that depends on the row
    # count (on a Sapphire Rapids, blocks of 8 against 61 rows: up to 1.5e-5 on logits of magnitude ~11); a wrong
    # window or mask moves logits by O(1)
    assert torch.allclose(blocks, one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))
    assert _ref(model, prompt) == ref
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=8) as e:
        assert e.submit(prompt, GREEDY).result().token_ids == ref
    # chunks longer than a block: the engine splits each into blocks of queries too, alone and beside another prompt
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=64) as e:
        other = _prompt(6, 37)
        assert [s.result().token_ids for s in (e.submit(prompt, GREEDY), e.submit(other, GREEDY))] == [
            ref, _ref(model, other)]


def test_prompts_take_fewer_tokens_per_step_while_others_decode(model):
    """While any request decodes, a step computes at most ``prefill_tokens_while_decoding`` prompt tokens (the rest
    of ``max_batched_tokens`` waits): a long prompt arriving beside a decoding request is prefilled in small chunks,
    and alone it takes the whole budget. The tokens are the same as alone."""
    long_prompt, first = _prompt(7, 90), _prompt(8, 12)
    refs = [_ref(model, first, GREEDY.replace(max_tokens=40, ignore_eos=True)), _ref(model, long_prompt)]
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=64,
                prefill_tokens_while_decoding=8) as e:
        steps: list[tuple[int, int]] = []  # (decode rows, prompt tokens) of each step
        run = e._run

        def record(net, cache, items, greedy):
            steps.append((sum(it.num_tokens == 1 for it in items), sum(it.num_tokens for it in items
                                                                        if it.num_tokens > 1)))
            return run(net, cache, items, greedy)

        e._run = record
        a = e.submit(first, GREEDY.replace(max_tokens=40, ignore_eos=True))
        next(iter(a))  # decoding now
        b = e.submit(long_prompt, GREEDY)
        assert [a.result().token_ids, b.result().token_ids] == refs
        assert steps[0] == (0, len(first))  # alone: the whole prompt in one step
        beside = [p for d, p in steps[1:] if d > 0 and p > 0]
        assert beside and max(beside) <= 8  # beside a decoding request: chunks of at most 8
        assert sum(p for _, p in steps[1:]) >= len(long_prompt) - 8  # all of it computed (the rest was cached)
    with pytest.raises(gs.InvalidRequestError):
        Engine(model, prefill_tokens_while_decoding=0)


def test_prompts_arriving_together_compute_their_shared_prefix_once(model):
    """Prompts that share a prefix and arrive together wait for the first one to compute it (and adopt its blocks)
    instead of computing it beside it in the same step's spare budget; identical prompts too (no deadlock). The
    tokens are the same as alone."""
    shared = _prompt(40, 23)  # 24 tokens: 6 full blocks of 4
    prompts = [shared + _prompt(41 + i, 10)[1:] for i in range(4)] + [shared + _prompt(41, 10)[1:]] * 2
    refs = [_ref(model, p) for p in prompts]
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=64) as e:
        gate, run = threading.Event(), e._run

        def held(net, cache, items, greedy):  # the first step waits until every prompt is queued
            gate.wait(10)
            return run(net, cache, items, greedy)

        e._run = held
        first = e.submit(_prompt(50, 5), GREEDY.replace(max_tokens=1))  # its step holds the loop
        time.sleep(0.2)
        streams = [e.submit(p, GREEDY) for p in prompts]
        gate.set()
        first.result()
        assert [s.result().token_ids for s in streams] == refs
        stats = e.stats()
    # the first prompt in full; each later one only past the 24 shared tokens (the exact copies: their last block's
    # 2 tokens, a match leaving one token to compute); without the wait the second (30 of its 34 tokens in the
    # first step's spare budget) computed the shared blocks again
    assert stats["prefill_tokens"] == 6 + len(prompts[0]) + 3 * (len(prompts[0]) - 24) + 2 * (len(prompts[0]) - 32)
    assert stats["prompt_steps_held_for_prefix"] > 0


def test_batched_equals_alone_without_compiled_kernels(model, monkeypatch):
    """Where the kernels cannot be built, decode rows gather their keys from the pages and run eager attention:
    the same tokens (generate's reference takes the same fallback)."""
    from gemma_sessions import kernels

    monkeypatch.setattr(kernels, "_state", {"error": "disabled for the test"})
    prompts = [_prompt(i, 10 + 9 * i) for i in range(4)]
    refs = [_ref(model, p) for p in prompts]
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=12) as e:
        outs = [s.result().token_ids for s in [e.submit(p, GREEDY) for p in prompts]]
    assert outs == refs


def test_reuse_equals_recompute_across_turns(model):
    """A KV handle reused over turns gives the tokens of a fresh computation of the whole history."""
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        kv = e.new_kv()
        history = _prompt(1, 13)
        for turn in range(4):
            out = e.submit(history, GREEDY, kv=kv).result()
            assert out.token_ids == _ref(model, history)
            if turn:
                assert out.stats.cached_tokens >= len(history) - 20  # only the new tail was prefilled
            assert out.stats.cached_tokens + out.stats.prefilled_tokens == out.stats.prompt_tokens
            history = history + out.token_ids + _prompt(10 + turn, 5)[1:]


def test_prefix_shared_across_sequences_is_computed_once(model):
    system = _prompt(5, 40)
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        first = e.submit(system + [9, 10, 11], GREEDY).result()
        second = e.submit(system + [12, 13], GREEDY).result()
        assert first.stats.cached_tokens == 0
        assert second.stats.cached_tokens == (len(system) // 4) * 4  # block-aligned hit
        assert second.token_ids == _ref(model, system + [12, 13])
        assert e.stats()["prefix_hit_tokens"] >= second.stats.cached_tokens


def test_a_finished_requests_partial_block_is_reused_by_the_next_one(model):
    """A stateless multi-turn chat: the next request repeats the previous prompt and its reply, then parts from them.
    The previous request's partial last block is adopted, so the cached tokens are everything it computed that the
    next prompt shares, not only whole blocks; the tokens equal a fresh computation (float32)."""
    first_prompt = _prompt(7, 21)  # 22 tokens
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        first = e.submit(first_prompt, GREEDY.replace(max_tokens=5)).result()
        computed = len(first_prompt) + len(first.token_ids) - 1  # the last sampled token has no KV
        assert computed % 4  # ends mid-block: the case this tests
        nxt = first_prompt + first.token_ids + [30, 31, 32]
        second = e.submit(nxt, GREEDY).result()
        assert second.stats.cached_tokens == computed
        assert second.token_ids == _ref(model, nxt)
        # the adopted block left the prefix cache (the second request wrote into it): a third request that parts
        # from the first one's tail earlier finds only whole blocks, or the second's own tail
        third = first_prompt + first.token_ids[:2] + [40, 41]
        out = e.submit(third, GREEDY).result()
        assert out.stats.cached_tokens in ((len(first_prompt) + 2) // 4 * 4, len(first_prompt) + 2)
        assert out.token_ids == _ref(model, third)


def test_a_partial_block_is_shared_only_from_its_last_holder(model):
    """A tail two sequences hold (a fork) is never cached while one of them may still write into it, and a failed
    request's tail (discard) is never cached; a tail from a finished request matches on its tokens only."""
    base = _prompt(8, 21)
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        kv = e.new_kv()
        e.submit(base, GREEDY.replace(max_tokens=1), kv=kv).result()  # 22 computed: 2 tokens in a partial block
        child = e.fork_kv(kv)
        e.release_kv(kv)  # the child still holds the tail
        probe = e.submit(base + [50, 51], GREEDY).result()
        assert probe.stats.cached_tokens == 20  # whole blocks only
        assert probe.token_ids == _ref(model, base + [50, 51])
        e.release_kv(child)  # now the tail's last holder lets it go
        other = base[:21] + [60, 61]  # parts inside the tail: only its common token is adopted
        out = e.submit(other, GREEDY).result()
        assert out.stats.cached_tokens == 21
        assert out.token_ids == _ref(model, other)
        e.cache.pool.check_invariants()


def test_adopted_partial_block_slots_past_the_shared_tokens_are_zeroed(model):
    """The adopter sees nothing of the other sequence past what they share (its slots are zeroed on adoption)."""
    from gemma_sessions.cache.kv import PagedKVCache

    cache = PagedKVCache(KVLayout.for_config(model.config, 4), 64, torch.float32, model.device)
    tokens = _prompt(9, 9)  # 10 tokens: two whole blocks and a tail of 2
    seq = cache.start(tokens)
    cache.allocate(seq, len(tokens))
    cache.buffer[seq.held_blocks()] = 1.0  # stands for the K/V the sequence computed
    cache.commit(seq, len(tokens))
    cache.free(seq)
    adopter = cache.start(tokens[:9] + [77, 78])  # shares the tail's first token only
    assert adopter.num_computed == 9
    for g, table in enumerate(adopter.tables):
        page = cache.views[cache.layout.group_class[g]][table[2]]
        assert page[:, :, :1].eq(1).all() and not page[:, :, 1:].any()
    again = cache.start(tokens[:9] + [77, 78])  # the adopted tail left the prefix cache
    assert again.num_computed == 8
    cache.free(adopter)
    cache.free(again)
    cache.pool.check_invariants()


def test_fork_equals_fresh(model):
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        kv = e.new_kv()
        base = _prompt(2, 21)  # ends mid-block: the fork shares a partial block (copy on write)
        out = e.submit(base, GREEDY, kv=kv).result()
        child = e.fork_kv(kv)
        a = base + out.token_ids + [20, 21, 22]
        b = base + out.token_ids + [30, 31]
        ra = e.submit(a, GREEDY, kv=kv).result()
        rb = e.submit(b, GREEDY, kv=child).result()
        assert ra.token_ids == _ref(model, a) and rb.token_ids == _ref(model, b)
        assert rb.stats.cached_tokens == len(base) + len(out.token_ids) - 1


def test_sliding_layers_keep_only_their_window():
    model = tiny_model("gemma3", seed=4)  # window 8: 7 layers = 6 sliding + 1 full
    layout = KVLayout.for_config(model.config, block_size=4)
    assert layout.group_kinds.count("sliding") == 6 and layout.group_kinds.count("full") == 1
    prompt = _prompt(3, 90)
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=16) as e:
        kv = e.new_kv()
        out = e.submit(prompt, GREEDY, kv=kv).result()
        assert out.token_ids == _ref(model, prompt)
        tokens = e.kv_tokens(kv)
        held = e.kv_bytes(kv) // e.cache.layout.page_bytes(e.cache.dtype)
    full_blocks = -(-tokens // 4)
    window_blocks = 8 // 4 + 1
    assert held <= full_blocks + 6 * (window_blocks + 1)
    assert held < 7 * full_blocks / 2  # far less than keeping every layer's every token


def test_prefix_reuse_works_with_sliding_window():
    model = tiny_model("gemma3", seed=5)
    shared = _prompt(6, 60)  # much longer than the window
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        e.submit(shared + [7], GREEDY).result()
        out = e.submit(shared + [8, 9], GREEDY).result()
    assert out.stats.cached_tokens == 60
    assert out.token_ids == _ref(model, shared + [8, 9])


def test_never_fitting_request_fails_and_engine_keeps_serving(model):
    with Engine(model, kv_cache_bytes=48 * 1024, block_size=4) as e:  # a few dozen pages
        big = e.submit(_prompt(1, 200), GREEDY)
        with pytest.raises(gs.CapacityError):
            big.result()
        small = e.submit(_prompt(2, 6), gs.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert small.result().token_ids == _ref(model, _prompt(2, 6), small._request.params)


def test_memory_pressure_evicts_idle_sessions_then_recomputes(model):
    layout = KVLayout.for_config(model.config, block_size=4)
    page = layout.page_bytes(torch.float32)
    params = gs.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with Engine(model, kv_cache_bytes=page * layout.blocks_needed(60) * 2, block_size=4) as e:
        handles = [e.new_kv() for _ in range(4)]
        histories = [_prompt(20 + i, 40) for i in range(4)]
        for kv, h in zip(handles, histories):
            e.submit(h, params, kv=kv).result()
        assert e.stats()["session_kv_evictions"] > 0
        evicted = [kv for kv in handles if kv.evictions]
        kv = evicted[0]
        h = histories[handles.index(kv)]
        out = e.submit(h + [5, 6], params, kv=kv).result()
        assert out.token_ids == _ref(model, h + [5, 6], params)
        assert out.stats.prefilled_tokens > 2  # it had to recompute


def test_cancel_frees_the_slot(model):
    params = gs.SamplingParams(temperature=0, max_tokens=10_000 // 50, ignore_eos=True)
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        stream = e.submit(_prompt(1, 10), params)
        it = iter(stream)
        next(it)
        stream.cancel()
        out = stream.result()
        assert out.finish_reason == "cancelled"
        deadline = time.time() + 5
        while e.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        st = e.stats()
        assert st["running"] == 0 and st["blocks_used"] == 0


def test_a_stream_read_by_one_thread_while_another_waits_for_its_result_ends_for_both(model):
    """One thread iterates a stream while another (a closer) cancels it and waits for its result: whichever takes
    the end event, both return at once (either could block on the queue forever, or until a timeout, before)."""
    import random

    rng = random.Random(3)
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        for i in range(60):
            stream = e.submit(_prompt(i, 6), gs.SamplingParams(temperature=0, max_tokens=rng.randint(1, 4),
                                                                ignore_eos=True))
            reader = threading.Thread(target=lambda: list(stream), daemon=True)  # (a stuck one fails the test)
            reader.start()
            time.sleep(rng.random() * 0.005)
            if rng.random() < 0.5:
                stream.cancel()
            t0 = time.monotonic()
            out = stream.result(timeout=10)
            reader.join(timeout=10)
            assert not reader.is_alive() and time.monotonic() - t0 < 5
            assert out.finish_reason in ("length", "cancelled")


def test_many_threads_submit_concurrently(model):
    prompts = [_prompt(100 + i, 5 + i % 7) for i in range(24)]
    refs = [_ref(model, p) for p in prompts]
    results: dict[int, list[int]] = {}
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batch=8) as e:
        def worker(i):
            results[i] = e.submit(prompts[i], GREEDY).result().token_ids
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert e.stats()["blocks_used"] == 0
    assert [results[i] for i in range(24)] == refs


def test_bad_requests_raise_clear_errors(model):
    with Engine(model, kv_cache_bytes=1 << 20, block_size=4) as e:
        with pytest.raises(gs.InvalidRequestError):
            e.submit([], GREEDY)
        with pytest.raises(gs.InvalidRequestError):
            e.submit([2, 10**9], GREEDY)
        with pytest.raises(gs.ContextLengthError):
            e.submit([2] * 10_000, GREEDY)
    with pytest.raises(gs.EngineClosedError):
        e.submit([2, 3], GREEDY)


def test_fast_mode_decode_rows_do_not_depend_on_prefill_in_their_step():
    """int8 mode: few-row products run the exact kernel, many-row ones a bf16 GEMM. Decode rows sharing a step
    with prefill chunks are run as their own forward, so their tokens equal decoding alone."""
    import gemma_sessions.engine.runner as runner

    model = tiny_model("gemma3", seed=5, weight_format="int8")
    prompts = [_prompt(i, 20 + 5 * i) for i in range(4)]
    refs = [_ref(model, p) for p in prompts]
    forwards: list[list[int]] = []  # token counts of the items of each model forward
    real = runner._hidden_rows

    def spy(net, cache, items):
        forwards.append([it.num_tokens for it in items])
        return real(net, cache, items)

    with Engine(model, kv_cache_bytes=4 << 20, block_size=4, max_batched_tokens=256) as e, \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_hidden_rows", spy)
        first = e.submit(prompts[0], GREEDY)
        it = iter(first)
        next(it)  # prompt 0 is decoding: the next prompts' prefills share its steps
        rest = [e.submit(p, GREEDY) for p in prompts[1:]]
        outs = [first.result().token_ids] + [s.result().token_ids for s in rest]
    assert outs == refs
    mixed = [f for f in forwards if 1 in f and max(f) > 1]
    assert not mixed and any(f == [1] for f in forwards) and any(max(f) > 1 for f in forwards[1:])


@pytest.mark.parametrize("rows", [5, 12, 40])
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_fast_mode_decode_stack_equals_the_layer_loop(arch, rows, monkeypatch):
    """A decode step runs every layer in one compiled call (kernels.decode_stack): up to 8 rows with the exact kernel,
    then qmatmul_i16 (up to 64 rows) or, without it, qmatmul_bf16 (up to 16); on AVX2 qmatmul_wide (up to 64); on a
    CPU with none the exact kernel up to 64 rows (backend.exact_max_rows). Its logits and the K/V it writes
    equal the Python layer loop's bit for bit, for Gemma 1, 2 (softcaps) and 3 (q/k norms), over pages (block size
    4, sliding windows of the tiny configs)."""
    from gemma_sessions import kernels
    from gemma_sessions.cache.kv import PagedKVCache
    from gemma_sessions.engine import runner

    if not kernels.available():
        pytest.skip(f"kernel not built here: {kernels._state.get('error')}")
    model = tiny_model(arch, seed=11, weight_format="int8")
    net = model.net
    if not net.can_decode_stack(rows):
        pytest.skip(f"no decode stack for {rows} rows here (qmatmul_bf16 without qmatmul_i16 stops at 16)")

    def run():
        cache = PagedKVCache(KVLayout.for_config(model.config, 4), 8192, torch.bfloat16, model.device)
        cache.flat.zero_()  # pages start uninitialised; compare only what the steps wrote
        seqs = [cache.start(_prompt(i, 5 + 6 * i)) for i in range(rows)]
        for s in seqs:  # prefill each alone
            n = len(s.tokens)
            cache.allocate(s, n)
            runner.run_step(net, cache, [runner.WorkItem(seq=s, num_tokens=n, want_logits=True)])
            cache.commit(s, n)
        logits = []
        for step in range(12):  # decode all rows together, feeding fixed tokens
            items = []
            for i, s in enumerate(seqs):
                s.tokens.append(7 + (13 * step + 5 * i) % 300)
                cache.allocate(s, 1)
                items.append(runner.WorkItem(seq=s, num_tokens=1, want_logits=True))
            logits.append(runner.run_step(net, cache, items))
            for s in seqs:
                cache.commit(s, 1)
        return torch.stack(logits), cache.flat.clone()

    _stack_equals_loop(net, monkeypatch, run, steps=12)


def _stack_equals_loop(net, monkeypatch, run, steps: int) -> None:
    """``run()`` (logits, K/V) with every decode step in one compiled call (``steps`` of them) and with the layer
    loop: equal bit for bit."""
    calls = []
    real = net.hidden_decode_stack
    monkeypatch.setattr(net, "hidden_decode_stack", lambda *a: calls.append(1) or real(*a))
    results = []
    for use_stack in (True, False):
        monkeypatch.setattr(net, "can_decode_stack", lambda n, use=use_stack: use)
        results.append(run())
        assert len(calls) == steps
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_single_sequence_decode_runs_the_stack_bit_for_bit(arch, monkeypatch):
    """generate()'s decode steps (one dense sequence, models/gemma.py ``DenseKV``) run every layer in one compiled
    call too: their logits and the K/V they write equal the layer loop's bit for bit, past the sliding window (the
    tiny configs' windows are shorter than the 40 steps)."""
    from gemma_sessions import kernels

    if not kernels.available():
        pytest.skip(f"kernel not built here: {kernels._state.get('error')}")
    model = tiny_model(arch, seed=3, weight_format="int8")
    net = model.net
    assert net.can_decode_stack(1)

    def run():
        kv = net.new_sequence(64)
        with torch.inference_mode():
            out = [net.step(torch.tensor(_prompt(1, 9)), kv, last_only=True)]
            out += [net.step(torch.tensor([7 + (13 * i) % 300]), kv, last_only=True) for i in range(40)]
        return torch.cat(out), kv.flat.clone()

    _stack_equals_loop(net, monkeypatch, run, steps=40)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_packed_prefill_attention_equals_one_attention_per_chunk(arch, native, monkeypatch):
    """The fast mode attends a step's prefill chunks as one padded batch: the same result, bit for bit, as one
    attention per chunk, with chunks of different lengths and contexts (padded keys and query rows), sliding and
    full groups, Gemma 2's soft-cap; a step whose padding would more than double the work is not packed. Without
    native bf16 (AVX2) both attend in float32 and round to bf16 (a float32 GEMM's sums depend on its shape): equal
    to a bf16 step."""
    from gemma_sessions import kernels
    from gemma_sessions.cache.kv import PagedKVCache
    from gemma_sessions.engine import runner

    monkeypatch.setitem(kernels._state, "native_bf16", native)

    model = tiny_model(arch, seed=2, weight_format="int8")
    cfg = model.config
    cache = PagedKVCache(KVLayout.for_config(cfg, 4), 1024, torch.bfloat16, model.device)
    cache.flat.copy_(torch.randn(cache.flat.shape))
    items = []
    for i in range(6):
        done, new = 20 + 3 * i, 6 + i
        s = cache.start(_prompt(i, done + new))
        cache.allocate(s, done)
        cache.commit(s, done)
        cache.allocate(s, new)
        items.append(runner.WorkItem(seq=s, num_tokens=new, want_logits=True))
    decode = cache.start(_prompt(9, 8))
    cache.allocate(decode, 7)
    cache.commit(decode, 7)
    cache.allocate(decode, 1)
    items.insert(0, runner.WorkItem(seq=decode, num_tokens=1, want_logits=True))
    n = sum(it.num_tokens for it in items)
    torch.manual_seed(0)
    q = torch.randn(n, cfg.num_heads, cfg.head_dim)
    k, v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim), torch.randn(n, cfg.num_kv_heads, cfg.head_dim)
    args = (cache, items, model.net.layers[0].attn.scale, cfg.attn_logit_softcapping,
            (cfg.num_heads, cfg.num_kv_heads))
    packed = runner.PagedBatch(*args)
    assert all(p is not None for p in packed.packed)
    per_chunk = runner.PagedBatch(*args)
    per_chunk.packed = [None] * len(per_chunk.packed)
    for layer in range(cfg.num_layers):
        a, b = packed.attend(layer, q, k, v), per_chunk.attend(layer, q, k, v)
        assert torch.equal(a, b) if native else torch.allclose(a, b, rtol=2 ** -7, atol=1e-6)
    lopsided = []
    for i, (done, new) in enumerate([(5, 2), (6, 2), (7, 2), (40, 30)]):
        s = cache.start(_prompt(20 + i, done + new))
        cache.allocate(s, done)
        cache.commit(s, done)
        cache.allocate(s, new)
        lopsided.append(runner.WorkItem(seq=s, num_tokens=new, want_logits=True))
    assert all(p is None for p in runner.PagedBatch(cache, lopsided, *args[2:]).packed)


def test_greedy_head_tokens_equal_the_exact_logits_argmax():
    """The engine's step returns greedy rows' tokens from the int8-activation head (no logits) from
    greedy_head_min_rows() rows (5; 1 on AVX2), equal to the argmax of the exact logits; fewer rows, or a sampled
    row among at most QMATMUL_MAX_ROWS, get exact logits for every row; a sampled row among more gets the
    approximate logits, also when every row is sampled (with AVX512-VNNI; on AVX2 the product's own logits)."""
    from gemma_sessions import kernels
    from gemma_sessions.cache.kv import PagedKVCache
    from gemma_sessions.engine import runner
    from gemma_sessions.kernels.backend import QMATMUL_MAX_ROWS, approx_head_logits, greedy_head_min_rows

    model = tiny_model("gemma3", seed=4, weight_format="int8")
    net = model.net
    if not net.can_greedy_head():
        pytest.skip("no greedy head here (it needs the compiled kernel with AVX512-VNNI or AVX2)")

    def step(rows: int, greedy: list[bool]):
        cache = PagedKVCache(KVLayout.for_config(model.config, 4), 512, torch.bfloat16, model.device)
        seqs = [cache.start(_prompt(i, 6 + i)) for i in range(rows)]
        items = []
        for s in seqs:
            cache.allocate(s, len(s.tokens))
            items.append(runner.WorkItem(seq=s, num_tokens=len(s.tokens), want_logits=True))
        return runner.run_step_greedy(net, cache, items, greedy), runner.run_step(net, cache, items)

    least = greedy_head_min_rows()
    for rows in (least - 1, least, QMATMUL_MAX_ROWS + 4):
        if rows == 0:
            continue
        (logits, tokens), exact = step(rows, [True] * rows)
        want = kernels.argmax(exact).tolist()
        if rows < least:
            assert tokens == [None] * rows and all(torch.equal(a, b) for a, b in zip(logits, exact))
        else:
            assert tokens == want and logits == [None] * rows
    mixed = [i % 3 != 0 for i in range(QMATMUL_MAX_ROWS)]
    (logits, tokens), exact = step(QMATMUL_MAX_ROWS, mixed)
    assert tokens == [None] * QMATMUL_MAX_ROWS and all(torch.equal(a, b) for a, b in zip(logits, exact))
    rows = QMATMUL_MAX_ROWS + 4
    mixed = [i % 3 != 0 for i in range(rows)]
    (logits, tokens), exact = step(rows, mixed)
    want = kernels.argmax(exact).tolist()
    assert [t for t, g in zip(tokens, mixed) if g] == [t for t, g in zip(want, mixed) if g]
    assert all(t is None and lg.shape == (model.config.vocab_size,) for t, lg, g in zip(tokens, logits, mixed)
               if not g)
    if not approx_head_logits():  # AVX2: sampled rows keep the product's logits, greedy rows get their tokens
        sampled = [i for i, g in enumerate(mixed) if not g]  # their own product (4 rows: the exact kernel)
        got = torch.stack([logits[i] for i in sampled])
        assert ((got - exact[sampled]).abs().max() / exact[sampled].abs().max()).item() < 1e-5
        (logits, tokens), exact = step(rows, [False] * rows)
        assert tokens == [None] * rows and torch.equal(torch.stack(logits), exact)
        return
    (logits, tokens), exact = step(rows, [False] * rows)  # every row sampled: the approximate logits too
    approx = torch.stack(logits)
    assert tokens == [None] * rows and not torch.equal(approx, exact)
    assert ((approx - exact).abs().max() / exact.abs().max()).item() < 0.02


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_generate_greedy_tokens_equal_the_logits_argmax(arch):
    """generate_tokens with greedy params takes each token from GemmaModel.step_greedy (the int8 greedy head where
    it serves one row, AVX2; logits elsewhere, and under Gemma 2's soft-cap): the same tokens as the argmax of the
    step's full logits, token by token."""
    from gemma_sessions import kernels

    from gemma_sessions.kernels.backend import greedy_head_min_rows

    model = tiny_model(arch, seed=5, weight_format="int8")
    net = model.net
    prompt = _prompt(3, 9)
    params = gs.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    calls = []
    real = net.greedy_head
    net.greedy_head = lambda *a, **k: calls.append(1) or real(*a, **k)
    fast = list(generate_tokens(model, prompt, params))
    del net.greedy_head
    assert len(calls) == (24 if greedy_head_min_rows() == 1 and net.can_greedy_head() else 0)
    state = net.new_sequence(len(prompt) + 24)
    ids, want = torch.tensor(prompt), []
    with torch.inference_mode():
        for _ in range(24):
            want.append(int(kernels.argmax(net.step(ids, state, last_only=True)[0])))
            ids = torch.tensor([want[-1]])
    assert fast == want
