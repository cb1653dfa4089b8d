"""KV memory on the real Gemma 3 270M: bytes per cached token at long context, and sharing of a common prefix; and the
paged layout of Gemma 4 (E2B, E4B, 31B) against its theoretical minimum.

Usage::

    python bench/memory.py            # full: (a) at 4k and 16k tokens, (b) 64 sessions, warm and cold variants, (c)
    python bench/memory.py --quick    # smoke run: (a) at 4k only, (b) 64 sessions warm only, (c)
    python bench/memory.py --layout   # (c) only: no model, a few seconds (bench/out/memory_layout.json)

(a) One sequence of T synthetic tokens (``<bos>`` + stdlib-docstring token ids) submitted with a ``KVHandle`` and
``max_tokens=1``; ``engine.kv_bytes(handle) / engine.kv_tokens(handle)`` is what one cached token costs once the
sequence is parked. Compared with the architecture's theoretical minimum if every layer kept every token
(``config.kv_bytes_per_token``, in the KV dtype) and with the sliding-window minimum (full-attention layers keep all
T tokens, sliding layers keep ``window`` tokens). Ratios < 1 vs "all layers" are the saving; ratios vs the
sliding-window minimum are the paging overhead (partial blocks, the chunk kept past the window). The same handle
is then advanced by one more token (a second 1-token request), and its bytes per token are reported again: the
engine frees out-of-window sliding blocks when it allocates for a step, not when it parks a sequence.

(b) 64 sessions with the same ~1,000-token system prompt, each then one short different user message
(``max_tokens=4``, greedy). *warm*: one session runs first, then the other 63 concurrently (they find the prompt in
the prefix cache); *cold* (full mode only): all 64 requests arrive together, before anything is cached (the loop
thread is held until all 64 are queued, so they are admitted in the same step). Reported:
``engine.stats()["blocks_used"] x page bytes`` vs 64 separate copies (64 x the bytes of one session alone).

(c) Gemma 4's layout, no weights: the published shapes of google/gemma-4-E2B, E4B and 31B (``config.json``'s text
config: 256-wide sliding layers, 512-wide full ones with their own KV-head count, the last ``num_kv_shared_layers``
reading an earlier layer's KV) as :class:`Gemma4Shapes`, a stand-in implementing the cache's ``LayerShapes``, paged by
``KVLayout.for_config`` into a ``PagedKVCache`` on the ``meta`` device (bookkeeping only: no memory, no model). One
sequence of T tokens is computed in 512-token chunks and parked; its bytes per token are compared with the theoretical
minimum: every layer that owns KV keeps K and V (2 x kv_heads x head_dim, bf16) for every token if it is a full layer
and for min(T, window) tokens if it is a sliding one; KV-shared layers keep nothing. It must be within 5%. Then one
64-turn session (a 40-token message, a 60-token reply decoded token by token per turn) is parked after each turn:
its sliding groups' bytes must stay flat (within one block per group) once past the window, while the full groups'
grow with the history.

Single process, 2 threads (no RSS is reported here, so no subprocess isolation is needed).
Results: markdown tables on stdout and ``bench/out/memory.json`` (``memory_layout.json`` with ``--layout``); exit
status 1 when (c) misses its 5% or its flat sliding memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "memory"
N_SESSIONS = 64
SYSTEM_TOKENS = 1000
LAYOUT_TOKENS = (1000, 4096, 32768)
LAYOUT_CHUNK = 512          # the engine's default max_batched_tokens: prefill chunks of this many tokens
LAYOUT_BLOCK = 16           # the engine's default block size
TURNS, TURN_USER, TURN_REPLY = 64, 40, 60
WITHIN = 1.05               # (c): ours / theoretical minimum at most this


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Shapes:
    """A Gemma 4 text config reduced to what the KV layout reads (``cache.layout.LayerShapes``): the published
    ``config.json`` numbers, no weights. Full layers every ``period``-th layer (the last one is full), the last
    ``num_kv_shared_layers`` layers read the last earlier layer of their kind (transformers' ``kv_sharing_modes``)."""

    name: str
    num_layers: int
    period: int                     # layer i is full when (i + 1) % period == 0
    num_kv_heads: int               # sliding layers
    head_dim: int                   # sliding layers
    num_global_kv_heads: int        # full layers (num_key_value_heads where config.json has none of its own)
    global_head_dim: int            # full layers
    num_kv_shared_layers: int
    sliding_window: int

    @property
    def layer_types(self) -> tuple[str, ...]:
        from gemma_sessions.config import FULL, SLIDING

        return tuple(FULL if (i + 1) % self.period == 0 else SLIDING for i in range(self.num_layers))

    def _full(self, layer: int) -> bool:
        return (layer + 1) % self.period == 0

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_global_kv_heads if self._full(layer) else self.num_kv_heads

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self._full(layer) else self.head_dim

    def kv_source(self, layer: int) -> int:
        first = self.num_layers - self.num_kv_shared_layers
        if layer < first:
            return layer
        return max(j for j in range(first) if self._full(j) == self._full(layer))


# config.json text_config of google/gemma-4-E2B, -E4B and -31B (the -it checkpoints have the same shapes)
GEMMA4 = (
    # 35 layers, 4 sliding : 1 full, 1 KV head (num_global_key_value_heads null), 512 window, last 20 layers shared
    Gemma4Shapes(name="E2B", num_layers=35, period=5, num_kv_heads=1, head_dim=256, num_global_kv_heads=1,
                 global_head_dim=512, num_kv_shared_layers=20, sliding_window=512),
    # 42 layers, 5 : 1, 2 KV heads, 512 window, last 18 layers shared
    Gemma4Shapes(name="E4B", num_layers=42, period=6, num_kv_heads=2, head_dim=256, num_global_kv_heads=2,
                 global_head_dim=512, num_kv_shared_layers=18, sliding_window=512),
    # 60 layers, 5 : 1, 16 KV heads sliding, 4 full (attention_k_eq_v: V is the k projection, but v_norm vs k_norm +
    # RoPE make K and V differ, so both are kept), 1024 window, nothing shared
    Gemma4Shapes(name="31B", num_layers=60, period=6, num_kv_heads=16, head_dim=256, num_global_kv_heads=4,
                 global_head_dim=512, num_kv_shared_layers=0, sliding_window=1024),
)


def synthetic_tokens(n: int, bos: int) -> list[int]:
    ids = C.corpus_ids()
    return [bos] + [ids[i % len(ids)] for i in range(n - 1)]


def per_token(model, engine, T: int) -> dict:
    import torch

    import gemma_sessions as gs

    cfg = model.config
    handle = engine.new_kv()
    t0 = time.perf_counter()
    out = engine.submit(synthetic_tokens(T, model.tokenizer.bos_id),
                        gs.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), kv=handle).result()
    prefill_s = time.perf_counter() - t0
    held, tokens = engine.kv_bytes(handle), engine.kv_tokens(handle)
    # one more step on the same handle (the reply token is computed): the engine releases out-of-window sliding
    # blocks when it allocates for a step, so this shows what a session holds once it has decoded at all
    engine.submit(synthetic_tokens(T, model.tokenizer.bos_id) + out.token_ids,
                  gs.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), kv=handle).result()
    held2, tokens2 = engine.kv_bytes(handle), engine.kv_tokens(handle)
    elem = torch.tensor([], dtype=engine.cache.dtype).element_size()
    th = C.kv_theory(cfg, elem, tokens)
    all_layers, sliding_min = th["all_layers"], th["sliding_min"]
    n_full, n_sliding, window = th["full_layers"], th["sliding_layers"], th["window"]
    ours = held / tokens
    engine.release_kv(handle)
    engine.reset_prefix_cache()
    return {"tokens": tokens, "kv_bytes": held, "bytes_per_token": ours, "all_layers_bytes_per_token": all_layers,
            "sliding_min_bytes_per_token": sliding_min, "ours_over_all_layers": ours / all_layers,
            "saving_vs_all_layers": 1 - ours / all_layers, "ours_over_sliding_min": ours / sliding_min,
            "kv_dtype": str(engine.cache.dtype).removeprefix("torch."), "kv_elem_bytes": elem,
            "full_layers": n_full, "sliding_layers": n_sliding, "window": window, "prefill_s": prefill_s,
            "cached_tokens": out.stats.cached_tokens, "after_step_tokens": tokens2, "after_step_kv_bytes": held2,
            "after_step_bytes_per_token": held2 / tokens2,
            "after_step_over_sliding_min": held2 / tokens2 / C.kv_theory(cfg, elem, tokens2)["sliding_min"]}


def shared_prompt(model, engine, cold: bool) -> dict:
    import gemma_sessions as gs

    manager = gs.SessionManager(engine)
    system = C.text_of_tokens(SYSTEM_TOKENS, seed=7)
    msgs = C.user_messages(N_SESSIONS, 12, seed=3)
    params = gs.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    sessions = [manager.create(system=system, sampling=params) for _ in range(N_SESSIONS)]
    page = engine.cache.layout.page_bytes(engine.cache.dtype)
    replies: list = [None] * N_SESSIONS
    one_alone = None
    t0 = time.perf_counter()
    if not cold:
        replies[0] = sessions[0].send(msgs[0])
        one_alone = {"bytes": engine.kv_bytes(sessions[0].kv), "blocks_used": engine.stats()["blocks_used"]}
    rest = range(1, N_SESSIONS) if not cold else range(N_SESSIONS)

    def run(i: int) -> None:
        replies[i] = sessions[i].send(msgs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in rest]
    # cold: hold the loop thread until every request is queued, so all are admitted in the same step
    with engine.paused() if cold else contextlib.nullcontext():
        for t in threads:
            t.start()
        while cold and sum(1 for s in sessions if s.kv.busy) < len(threads):  # busy: submitted to the engine
            time.sleep(0.01)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stats = engine.stats()
    per_session = [engine.kv_bytes(s.kv) for s in sessions]
    if one_alone is None:  # cold: the first session's own footprint stands in for "one session alone"
        one_alone = {"bytes": per_session[0], "blocks_used": None}
    used = stats["blocks_used"] * page
    copies = N_SESSIONS * one_alone["bytes"]
    prompt = sum(r.stats.prompt_tokens for r in replies)
    cached = sum(r.stats.cached_tokens for r in replies)
    for s in sessions:
        manager.delete(s.id)
    engine.reset_prefix_cache()
    return {"variant": "cold" if cold else "warm", "sessions": N_SESSIONS,
            "prompt_tokens_per_session": replies[0].stats.prompt_tokens, "one_session_bytes": one_alone["bytes"],
            "blocks_used": stats["blocks_used"], "page_bytes": page, "bytes_used": used, "separate_copies_bytes": copies,
            "used_over_copies": used / copies, "prefix_hit_rate": cached / prompt,
            "prefilled_tokens": sum(r.stats.prefilled_tokens for r in replies), "wall_s": wall,
            "preemptions": stats["preemptions"]}


# ------------------------------------------------------------------------------------------------ (c) Gemma 4 layout
def _layout_cache(shapes: Gemma4Shapes, tokens: int):
    """A bf16 paged cache for ``shapes`` on the meta device (bookkeeping only) with room for ``tokens``."""
    import torch

    from gemma_sessions.cache.kv import KVLayout, PagedKVCache

    layout = KVLayout.for_config(shapes, LAYOUT_BLOCK)
    blocks = layout.blocks_needed(tokens, chunk=LAYOUT_CHUNK) + layout.num_groups
    return PagedKVCache(layout, blocks, torch.bfloat16, torch.device("meta"))


def min_bytes(shapes: Gemma4Shapes, tokens: int, elem: int = 2) -> int:
    """The theoretical minimum for ``tokens`` cached tokens: K and V of every layer owning KV, for every token (full
    layers) or the last ``window`` (sliding ones); KV-shared layers keep nothing."""
    from gemma_sessions.config import SLIDING

    total = 0
    for i, kind in enumerate(shapes.layer_types):
        if shapes.kv_source(i) == i:
            kept = min(tokens, shapes.sliding_window) if kind == SLIDING else tokens
            total += 2 * shapes.layer_kv_heads(i) * shapes.layer_head_dim(i) * elem * kept
    return total


def _compute(cache, seq, n: int, chunk: int) -> int:
    """Compute ``n`` more tokens of ``seq`` ``chunk`` at a time (bookkeeping); returns the most bytes it held."""
    peak = 0
    while n > 0:
        m = cache.allocate(seq, min(chunk, n))
        peak = max(peak, cache.bytes_held(seq))
        cache.commit(seq, m)
        n -= m
    return peak


def layout_per_token(shapes: Gemma4Shapes, tokens: int) -> dict:
    cache = _layout_cache(shapes, tokens)
    lay = cache.layout
    seq = cache.start(list(range(tokens + 1)))
    peak = _compute(cache, seq, tokens, LAYOUT_CHUNK)
    held = cache.bytes_held(seq)
    lowest = min_bytes(shapes, tokens)
    every = 2 * sum(shapes.layer_kv_heads(i) * shapes.layer_head_dim(i) for i in range(shapes.num_layers)) * 2
    return {"model": shapes.name, "tokens": tokens, "groups": lay.num_groups,
            "group_shapes": sorted({f"{k} {lpg}x{kvh}x{hd}" for k, (lpg, kvh, hd) in
                                    zip(lay.group_kinds, lay.group_shapes)}),
            "page_bytes": lay.page_bytes(cache.dtype), "kv_bytes": held, "bytes_per_token": held / tokens,
            "min_bytes_per_token": lowest / tokens, "ours_over_min": held / lowest,
            "every_layer_every_token_bytes_per_token": every, "peak_bytes_in_prefill": peak,
            "padded_slots": sum(s[0] - len(m) for s, m in zip(lay.group_shapes, lay.group_layers)),
            "within": held / lowest <= WITHIN}


def layout_turns(shapes: Gemma4Shapes) -> dict:
    """A 64-turn session, parked after each turn: its sliding and full groups' bytes."""
    from gemma_sessions.config import SLIDING

    per_turn = TURN_USER + TURN_REPLY
    cache = _layout_cache(shapes, TURNS * per_turn + 64)
    lay = cache.layout
    page = lay.page_bytes(cache.dtype)
    sliding_groups = [g for g, k in enumerate(lay.group_kinds) if k == SLIDING]
    seq, stream, rows = None, iter(range(10**9)), []
    for turn in range(TURNS):
        user = [next(stream) for _ in range(TURN_USER)]
        if seq is None:
            seq = cache.start(user)
        else:
            assert cache.resume(seq, seq.tokens[:seq.num_computed] + user)
        peak = _compute(cache, seq, len(seq.tokens) - seq.num_computed, LAYOUT_CHUNK)
        for _ in range(TURN_REPLY):  # decode: one token per step
            seq.tokens.append(next(stream))
            peak = max(peak, _compute(cache, seq, 1, 1))
        sliding = sum(b is not None for g in sliding_groups for b in seq.tables[g]) * page
        rows.append({"turn": turn + 1, "tokens": seq.num_computed, "sliding_bytes": sliding,
                     "full_bytes": cache.bytes_held(seq) - sliding, "peak_bytes": peak})
    past = [r["sliding_bytes"] for r in rows if r["tokens"] >= shapes.sliding_window + LAYOUT_BLOCK]
    spread = max(past) - min(past)
    return {"model": shapes.name, "turns": rows, "sliding_min_bytes": min(past), "sliding_max_bytes": max(past),
            "sliding_spread_pages": spread / page, "sliding_groups": len(sliding_groups),
            "flat": spread <= len(sliding_groups) * page,
            "full_bytes_first_last": (rows[0]["full_bytes"], rows[-1]["full_bytes"])}


def layout_report(c: dict) -> None:
    print(f"(c) Gemma 4 paged layout (published shapes, bf16 KV, block {LAYOUT_BLOCK}, prefill chunks of "
          f"{LAYOUT_CHUNK}; no weights): KV bytes per cached token, parked, vs the theoretical minimum (owning layers "
          f"only, sliding ones their window)\n")
    rows = [[r["model"], f"{r['tokens']:,}", ", ".join(f"{n}" for n in r["group_shapes"]), r["groups"],
             C.fmt(r["page_bytes"] / 1024, 0), C.fmt(r["bytes_per_token"], 0), C.fmt(r["min_bytes_per_token"], 0),
             f"{r['ours_over_min']:.4f}x", C.fmt(r["every_layer_every_token_bytes_per_token"], 0),
             C.fmt(r["peak_bytes_in_prefill"] / 2**20, 1), "yes" if r["within"] else "NO"] for r in c["per_token"]]
    print(C.md_table(["model", "tokens", "group kinds lpg x kv heads x head dim", "groups", "page KiB",
                      "ours B/token", "minimum B/token", "ours / minimum", "every layer every token B/token",
                      "peak in prefill MiB", f"within {WITHIN - 1:.0%}"], rows))
    print(f"\n{TURNS}-turn session ({TURN_USER}-token message + {TURN_REPLY}-token reply per turn), parked after "
          "each turn\n")
    rows = []
    for r in c["turns"]:
        at = {t["turn"]: t for t in r["turns"]}
        rows.append([r["model"], *(C.fmt(at[n]["sliding_bytes"] / 2**20, 2) for n in (8, 16, 32, 64)),
                     f"{r['sliding_spread_pages']:.0f} of {r['sliding_groups']}",
                     *(C.fmt(at[n]["full_bytes"] / 2**20, 2) for n in (8, 64)), "yes" if r["flat"] else "NO"])
    print(C.md_table(["model", "sliding MiB turn 8", "turn 16", "turn 32", "turn 64",
                      "sliding spread past the window (pages, of groups)", "full MiB turn 8", "full MiB turn 64",
                      "sliding flat"], rows))


def layout_main() -> dict:
    print("--- (c) Gemma 4 layout ...", file=sys.stderr, flush=True)
    return {"per_token": [layout_per_token(s, t) for s in GEMMA4 for t in LAYOUT_TOKENS],
            "turns": [layout_turns(s) for s in GEMMA4]}


def layout_ok(c: dict) -> bool:
    return all(r["within"] for r in c["per_token"]) and all(r["flat"] for r in c["turns"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="(a) at 4k only, (b) warm only")
    p.add_argument("--layout", action="store_true", help="(c) only: Gemma 4's layout, no model")
    args = p.parse_args()
    C.setup_torch()
    if args.layout:
        c = layout_main()
        m = C.meta(args.quick, layout_tokens=list(LAYOUT_TOKENS), block_size=LAYOUT_BLOCK, chunk=LAYOUT_CHUNK)
        path = C.write_json(f"{NAME}_layout", {"meta": m, "layout": c})
        C.print_header(m)
        layout_report(c)
        print(f"\nJSON: {path}")
        sys.exit(0 if layout_ok(c) else 1)
    import gemma_sessions as gs

    model = gs.load_model(C.model_path(), progress=False)
    C.use_tokenizer(model.tokenizer)
    lengths = [4096] if args.quick else [4096, 16384]
    # enough pages for the longest sequence even if every layer kept every token, plus the cold variant of (b)
    engine = gs.Engine(model, kv_cache_bytes=(2 << 30) if not args.quick else (1 << 30))
    warm = gs.SessionManager(engine).create(sampling=gs.SamplingParams(temperature=0.0, max_tokens=2))
    warm.send(C.user_messages(1, 30, seed=99)[0])
    engine.release_kv(warm.kv)
    engine.reset_prefix_cache()

    a = []
    for T in lengths:
        print(f"--- (a) {T} tokens ...", file=sys.stderr, flush=True)
        a.append(per_token(model, engine, T))
    b = []
    for cold in ([False] if args.quick else [False, True]):
        print(f"--- (b) {N_SESSIONS} sessions, {'cold' if cold else 'warm'} ...", file=sys.stderr, flush=True)
        b.append(shared_prompt(model, engine, cold))
    engine.close()
    c = layout_main()

    m = C.meta(args.quick, lengths=lengths, sessions=N_SESSIONS, system_tokens=SYSTEM_TOKENS,
               block_size=engine.cache.layout.block_size, layers_per_group=engine.cache.layout.layers_per_group,
               group_kinds=list(engine.cache.layout.group_kinds))
    path = C.write_json(NAME, {"meta": m, "per_token": a, "shared_prompt": b, "layout": c})
    C.print_header(m)
    r0 = a[0]
    print(f"(a) KV bytes per cached token, one sequence ({r0['kv_dtype']} KV, {r0['kv_elem_bytes']} B/element; "
          f"{r0['full_layers']} full + {r0['sliding_layers']} sliding layers, window {r0['window']}, "
          f"block {m['block_size']} tokens)\n")
    rows = [[f"{r['tokens']:,}", C.fmt(r["bytes_per_token"], 0), C.fmt(r["all_layers_bytes_per_token"], 0),
             C.fmt(r["sliding_min_bytes_per_token"], 0),
             f"{r['ours_over_all_layers']:.3f}x (saves {r['saving_vs_all_layers']:.0%})",
             f"{r['ours_over_sliding_min']:.3f}x",
             C.fmt(r["kv_bytes"] / 2**20, 1), C.fmt(r["after_step_bytes_per_token"], 0),
             f"{r['after_step_over_sliding_min']:.3f}x", C.fmt(r["prefill_s"], 1)] for r in a]
    print(C.md_table(["tokens", "ours B/token", "all layers keep all (B/token)", "sliding-window min (B/token)",
                      "ours / all layers", "ours / sliding min", "ours MiB held",
                      "after 1 more step: B/token", "after 1 more step / sliding min", "prefill s"], rows))
    print("\n(ours = parked right after the max_tokens=1 request; 'after 1 more step' = after one more 1-token "
          "request on the same handle)")
    print(f"\n(b) {N_SESSIONS} sessions sharing a ~{SYSTEM_TOKENS}-token system prompt, then one short message each "
          f"(max_tokens=4)\n")
    rows = [[r["variant"], r["prompt_tokens_per_session"], C.fmt(r["one_session_bytes"] / 2**20, 2),
             f"{r['blocks_used']:,}", C.fmt(r["bytes_used"] / 2**20, 1), C.fmt(r["separate_copies_bytes"] / 2**20, 1),
             f"{r['used_over_copies']:.3f}x", f"{r['prefix_hit_rate']:.0%}", f"{r['prefilled_tokens']:,}",
             C.fmt(r["wall_s"], 1)] for r in b]
    print(C.md_table(["variant", "prompt tokens / session", "one session alone MiB", "blocks used",
                      "used MiB (blocks x page)", f"{N_SESSIONS} separate copies MiB", "used / copies",
                      "prefix hit rate", "tokens prefilled (all)", "wall s"], rows))
    print()
    layout_report(c)
    print(f"\nJSON: {path}")
    sys.exit(0 if layout_ok(c) else 1)


if __name__ == "__main__":
    main()
