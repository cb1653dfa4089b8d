"""KV memory on the real Gemma 3 270M: bytes per cached token at long context, and sharing of a common prefix.

Usage::

    python bench/memory.py            # full: (a) at 4k and 16k tokens, (b) 64 sessions, warm and cold variants
    python bench/memory.py --quick    # smoke run: (a) at 4k only, (b) 64 sessions warm only

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

Single process, 2 threads (no RSS is reported here, so no subprocess isolation is needed).
Results: markdown tables on stdout and ``bench/out/memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "memory"
N_SESSIONS = 64
SYSTEM_TOKENS = 1000


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="(a) at 4k only, (b) warm only")
    args = p.parse_args()
    C.setup_torch()
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

    m = C.meta(args.quick, lengths=lengths, sessions=N_SESSIONS, system_tokens=SYSTEM_TOKENS,
               block_size=engine.cache.layout.block_size, layers_per_group=engine.cache.layout.layers_per_group,
               group_kinds=list(engine.cache.layout.group_kinds))
    path = C.write_json(NAME, {"meta": m, "per_token": a, "shared_prompt": b})
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
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
