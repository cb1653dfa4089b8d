"""The written interfaces: the cache Protocol (both caches implement it, the scheduler uses nothing else), the engine
that never reads text (stop ids come in), and shells that reach no private attribute of the layers below.

White-box and exact: structural checks (``isinstance`` against the runtime-checkable Protocols, and the same method
names and parameter names on both classes), the scheduler's imports and cache calls read from its source, and the
two behaviours the Protocol added (``resume``, ``allocate`` cutting a chunk at a checkpoint).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import gemma_sessions
from gemma_sessions.cache.kv import KVLayout, KVSnapshot, PagedKVCache
from gemma_sessions.cache.protocol import KV_CACHE_METHODS, CachedSequence, KVCache, Snapshot
from gemma_sessions.cache.state import StateCache, StateSnapshot
from gemma_sessions.testing import tiny_config, tiny_griffin_model

ENGINE = Path(gemma_sessions.__file__).parent / "engine"


@pytest.fixture(scope="module")
def paged() -> PagedKVCache:
    return PagedKVCache(KVLayout.for_config(tiny_config("gemma3"), 4), 64, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def state() -> StateCache:
    return StateCache(tiny_griffin_model(seed=1).net, 8, torch.device("cpu"))


def _protocol_methods() -> set[str]:
    return {name for name, v in vars(KVCache).items() if callable(v) and not name.startswith("_")}


def test_the_method_list_is_the_protocol():
    assert set(KV_CACHE_METHODS) == _protocol_methods() and len(KV_CACHE_METHODS) == len(set(KV_CACHE_METHODS))


@pytest.mark.parametrize("cls", [PagedKVCache, StateCache])
def test_both_caches_have_every_method_with_the_protocol_parameters(cls):
    for name in KV_CACHE_METHODS:
        want = list(inspect.signature(getattr(KVCache, name)).parameters)
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got == want, (cls.__name__, name, got, want)


def test_both_caches_and_their_sequences_and_snapshots_conform_at_run_time(paged, state):
    assert isinstance(paged, KVCache) and isinstance(state, KVCache)
    assert not isinstance(object(), KVCache)
    for cache in (paged, state):
        seq = cache.start([5, 6, 7, 8, 9, 10])
        assert isinstance(seq, CachedSequence)
        cache.allocate(seq, 5)
        cache.commit(seq, 5)
        snap = cache.export(seq)
        assert isinstance(snap, Snapshot) and isinstance(snap, (KVSnapshot, StateSnapshot))
        assert snap.num_tokens == 5
        cache.free(seq)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _cache_attributes(path: Path) -> set[str]:
    """Every ``X`` in ``self.cache.X`` or ``cache.X`` in a module's source."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            v = node.value
            if (isinstance(v, ast.Attribute) and v.attr == "cache" and isinstance(v.value, ast.Name)
                    and v.value.id == "self") or (isinstance(v, ast.Name) and v.id == "cache"):
                out.add(node.attr)
    return out


def test_the_scheduler_imports_no_model_runner_or_concrete_cache():
    imports = _imports(ENGINE / "scheduler.py")
    assert imports == {"__future__", "collections", "logging", "collections.abc", "..cache.protocol", "..errors",
                       ".request", ".work"}


def test_the_scheduler_and_the_engine_use_only_protocol_methods():
    assert _cache_attributes(ENGINE / "scheduler.py") <= set(KV_CACHE_METHODS)
    # the engine also reaches the paged pool for reset_prefix_cache, behind an isinstance check
    assert _cache_attributes(ENGINE / "engine.py") <= set(KV_CACHE_METHODS) | {"pool"}


def test_resume_extends_a_parked_sequence_or_refuses_a_diverged_one(paged, state):
    for cache in (paged, state):
        seq = cache.start([5, 6, 7, 8, 9, 10])
        cache.allocate(seq, len(seq.tokens) - seq.num_computed)
        cache.commit(seq, len(seq.tokens) - seq.num_computed)
        before = cache.stats()
        assert not cache.resume(seq, [5, 6, 7, 1, 9, 10, 11])  # diverged at position 3
        assert not cache.resume(seq, [5, 6, 7, 8, 9, 10])      # nothing new to compute
        assert seq.tokens == [5, 6, 7, 8, 9, 10] and cache.stats() == before
        assert cache.resume(seq, [5, 6, 7, 8, 9, 10, 11, 12])
        assert seq.tokens == [5, 6, 7, 8, 9, 10, 11, 12] and seq.num_computed == 6 and seq.cached_at_start == 6
        after = cache.stats()
        assert after["prefix_queried_tokens"] - before["prefix_queried_tokens"] == 8
        assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 6
        cache.free(seq)


def test_allocate_cuts_a_state_chunk_at_a_checkpoint_and_paged_kv_never(paged, state):
    tokens = list(range(20, 32))
    seq = state.start(tokens, checkpoints=[5])
    assert state.allocate(seq, 10) == 5  # up to the checkpoint: the state there becomes a snapshot
    state.commit(seq, 5)
    assert state.allocate(seq, 6) == 6
    state.free(seq)
    seq = paged.start(tokens, checkpoints=[5])
    assert paged.allocate(seq, 10) == 10
    paged.free(seq)


# ------------------------------------------------------------------------------------------------ engine: ids only


def test_the_engine_package_never_imports_text():
    for path in ENGINE.glob("*.py"):
        imports = _imports(path)
        assert not {"..generate", "..tokenizer", "..sessions", "..server"} & imports, path.name


def test_stop_ids_come_from_the_model_or_the_caller():
    from gemma_sessions.sampling import SamplingParams
    from gemma_sessions.testing import tiny_model

    model = tiny_model("gemma3", seed=2)
    tok = model.tokenizer
    assert model.stop_ids == {model.config.eos_token_id, tok.eos_id, tok.end_of_turn_id} - {None}
    prompt = [tok.bos_id, 10, 11, 12]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with gemma_sessions.Engine(model, kv_cache_bytes=4 << 20) as engine:
        free = engine.submit(prompt, params).result().token_ids
    assert len(free) == 6
    stop = free[3]
    with gemma_sessions.Engine(model, kv_cache_bytes=4 << 20, stop_ids=[stop]) as engine:
        out = engine.submit(prompt, params.replace(ignore_eos=False)).result()
    assert out.token_ids == free[:free.index(stop)] and out.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ shells


def _private_accesses(path: Path, names: set[str] | None = None) -> list[str]:
    """``x._name`` in a module where ``x`` is not ``self`` / ``cls`` (dunders aside); only ``x`` in ``names`` if
    given."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            base = ast.unparse(node.value)
            if names is None or base.split(".")[-1] in names:
                out.append(f"{path.name}:{node.lineno}: {base}.{node.attr}")
    return out


def test_the_server_and_the_cli_use_public_methods_only():
    pkg = Path(gemma_sessions.__file__).parent
    found = []
    for path in [*sorted((pkg / "server").glob("*.py")), pkg / "cli.py", pkg / "repl.py"]:
        found += _private_accesses(path)
    bench = pkg.parents[1] / "bench"
    for path in sorted(bench.glob("*.py")):
        found += _private_accesses(path, {"engine", "manager", "model", "session", "s", "scheduler", "cache"})
    assert found == []


def test_benchmarks_hooks_pause_the_loop_and_reset_the_prefix_cache():
    from gemma_sessions.sampling import SamplingParams
    from gemma_sessions.testing import tiny_model

    model = tiny_model("gemma3", seed=2)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [[2, *range(10 + i, 30 + i)] for i in range(3)]
    with gemma_sessions.Engine(model, kv_cache_bytes=4 << 20, block_size=4) as engine:
        alone = [engine.submit(p, params).result().token_ids for p in prompts]
        assert engine.stats()["blocks_cached"] > 0
        engine.reset_prefix_cache()
        assert engine.stats()["blocks_cached"] == 0
        with engine.paused():
            streams = [engine.submit(p, params) for p in prompts]
            with pytest.raises(TimeoutError):  # the loop thread is held: nothing runs
                streams[0].result(timeout=0.2)
        assert [s.result().token_ids for s in streams] == alone
        assert all(s.result().stats.cached_tokens == 0 for s in streams)  # the reset forgot every prefix
