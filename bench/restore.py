"""Durable sessions: after a restart, how fast is the next turn when the KV snapshot is restored vs recomputed?

Usage::

    python bench/restore.py            # full: sessions of ~1k, 4k and 16k tokens, medians of 3 runs
    python bench/restore.py --quick    # smoke run: ~1k and 4k tokens, 1 run

For each size T: a session is built on a fresh ``Engine`` + ``SessionManager(engine, store=DIR)`` with one long
user message (synthetic: stdlib-docstring text of ~T tokens) and a greedy 8-token reply; closing the manager writes
the KV snapshot (``DIR/kv/<id>.safetensors``). Then, per run, the store directory is copied twice and a *restart* is
simulated on each copy (same process, the model stays loaded, but a brand-new ``Engine`` and ``SessionManager``):

- snapshot: the copy as written: the next turn restores the session's KV from the snapshot file
  (``reply.stats.kv_source == "snapshot"``);
- recompute: the copy with the snapshot file deleted: the next turn recomputes the whole history from token ids
  (``kv_source == "recompute"``).

The next turn is a ~30-token message with 8 greedy tokens. Timed: wall seconds from ``manager.get(id)`` to the first
streamed text delta (store read + KV restore or recompute + first token; the snapshot file was just written, so it
is read from the OS page cache, not from a cold disk), and the engine's ``reply.stats.ttft_s`` (submit -> first
token; a restore happens before submit, so this excludes it). Also: snapshot file size per token vs the KV's
theoretical size (every layer keeps every token, and the sliding-window minimum). Target: restore <= 0.1x
recompute at 4k. Results: a markdown table on stdout and ``bench/out/restore.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "restore"
NEXT_MESSAGE_TOKENS = 30


def engine_for(model, T: int):
    import gemma_sessions as gs
    from gemma_sessions.cache.kv import KVLayout

    layout = KVLayout.for_config(model.config, 16)
    need = layout.blocks_needed(T + 64, chunk=512) * layout.page_bytes(model.net.dtype)
    return gs.Engine(model, kv_cache_bytes=max(256 << 20, 2 * need))


def next_turn(model, store_dir: Path, sid: str, text: str) -> dict:
    import gemma_sessions as gs

    engine = engine_for(model, 20000)
    manager = gs.SessionManager(engine, store=store_dir)
    try:
        t0 = time.perf_counter()
        s = manager.get(sid)
        t_get = time.perf_counter() - t0
        stream = s.stream(text)
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        st = stream.reply.stats
        return {"wall_ttft_s": first, "get_s": t_get, "engine_ttft_s": st.ttft_s, "turn_wall_s": total,
                "kv_source": st.kv_source, "cached_tokens": st.cached_tokens, "prefilled_tokens": st.prefilled_tokens,
                "prompt_tokens": st.prompt_tokens}
    finally:
        manager.store.close(snapshot_all=False)  # untimed; no need to write the snapshot again
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1k and 4k tokens, 1 run")
    p.add_argument("--keep", action="store_true", help="keep the temporary stores (prints where)")
    args = p.parse_args()
    C.setup_torch()
    import torch

    import gemma_sessions as gs
    from gemma_sessions.sessions.store import Store

    model = gs.load_model(C.model_path(), progress=False)
    C.use_tokenizer(model.tokenizer)
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384]
    runs = 1 if args.quick else 3
    params = gs.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    next_text = C.user_messages(1, NEXT_MESSAGE_TOKENS, seed=5)[0]
    root = Path(tempfile.mkdtemp(prefix="gs-restore-"))
    cfg = model.config
    results = []
    try:
        # warm-up (first-call costs) on a throwaway engine
        with gs.Engine(model, kv_cache_bytes=256 << 20) as e:
            gs.SessionManager(e).create(sampling=params).send(C.user_messages(1, 30, seed=99)[0])
        for T in sizes:
            print(f"--- building a ~{T}-token session ...", file=sys.stderr, flush=True)
            base = root / f"store-{T}"
            engine = engine_for(model, T)
            manager = gs.SessionManager(engine, store=base)
            s = manager.create(sampling=params)
            t0 = time.perf_counter()
            first = s.send(C.text_of_tokens(T - 12, seed=T))
            build_s = time.perf_counter() - t0
            sid, history_tokens = s.id, len(s.token_ids)
            held = engine.kv_bytes(s.kv)
            manager.close()  # writes the KV snapshot
            engine.close()
            snap_file = base / "kv" / f"{sid}.safetensors"
            ro = Store(base, readonly=True)
            info = ro.snapshot_info(sid)
            ro.close()
            if info is None or not snap_file.exists():
                raise RuntimeError(f"no KV snapshot was written for the {T}-token session")
            elem = torch.tensor([], dtype=engine.cache.dtype).element_size()
            theory = C.kv_theory(cfg, elem, info["tokens"])
            trials: dict[str, list[dict]] = {"snapshot": [], "recompute": []}
            for run in range(runs):
                for mode in ("snapshot", "recompute"):
                    print(f"    {T} tokens: restart + next turn ({mode}, run {run + 1}/{runs}) ...", file=sys.stderr,
                          flush=True)
                    d = root / f"run-{T}-{mode}-{run}"
                    shutil.copytree(base, d)
                    if mode == "recompute":
                        (d / "kv" / f"{sid}.safetensors").unlink()
                    r = next_turn(model, d, sid, next_text)
                    if r["kv_source"] != mode:
                        raise RuntimeError(f"expected kv_source={mode!r}, got {r['kv_source']!r}")
                    trials[mode].append(r)
                    shutil.rmtree(d, ignore_errors=True)
            med = {mode: {k: C.median(t[k] for t in ts) for k in ("wall_ttft_s", "engine_ttft_s", "get_s",
                                                                   "turn_wall_s")}
                   for mode, ts in trials.items()}
            file_bytes = snap_file.stat().st_size
            results.append({
                "target_tokens": T, "history_tokens": history_tokens, "snapshot_tokens": info["tokens"],
                "build_turn_s": build_s, "build_ttft_s": first.stats.ttft_s, "kv_bytes_held": held,
                "snapshot_file_bytes": file_bytes, "file_bytes_per_token": file_bytes / info["tokens"],
                "all_layers_bytes_per_token": theory["all_layers"], "sliding_min_bytes_per_token": theory["sliding_min"],
                "file_over_all_layers": file_bytes / info["tokens"] / theory["all_layers"],
                "file_over_sliding_min": file_bytes / info["tokens"] / theory["sliding_min"],
                "snapshot": med["snapshot"], "recompute": med["recompute"],
                "restore_over_recompute_wall": med["snapshot"]["wall_ttft_s"] / med["recompute"]["wall_ttft_s"],
                "restore_over_recompute_engine": med["snapshot"]["engine_ttft_s"] / med["recompute"]["engine_ttft_s"],
                "trials": trials, "kv_dtype": str(engine.cache.dtype).removeprefix("torch.")})
    finally:
        if args.keep:
            print(f"stores kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    m = C.meta(args.quick, sizes=sizes, runs=runs, next_message_tokens=NEXT_MESSAGE_TOKENS, reply_tokens=8)
    path = C.write_json(NAME, {"meta": m, "results": results})
    C.print_header(m)
    print(f"restart = new Engine + SessionManager on a copy of the store (same process); next turn: "
          f"~{NEXT_MESSAGE_TOKENS}-token message, 8 greedy tokens; medians of {runs} run(s)\n")
    rows = []
    for r in results:
        s, c = r["snapshot"], r["recompute"]
        ok = r["restore_over_recompute_wall"] <= 0.1
        rows.append([f"{r['history_tokens']:,}", C.fmt(s["wall_ttft_s"], 3), C.fmt(c["wall_ttft_s"], 3),
                     f"{r['restore_over_recompute_wall']:.3f}x" + (" ok" if ok else " MISS")
                     if r["target_tokens"] == 4096 else f"{r['restore_over_recompute_wall']:.3f}x",
                     f"{C.fmt(s['engine_ttft_s'], 3)} / {C.fmt(c['engine_ttft_s'], 3)}",
                     C.fmt(r["build_ttft_s"], 2), C.fmt(r["snapshot_file_bytes"] / 2**20, 1),
                     C.fmt(r["file_bytes_per_token"], 0),
                     f"{r['file_over_all_layers']:.3f}x / {r['file_over_sliding_min']:.3f}x"])
    print(C.md_table(["session tokens", "restore: TTFT wall s", "recompute: TTFT wall s",
                      "restore / recompute (target <= 0.1x at 4k)", "engine ttft_s restore / recompute",
                      "first build TTFT s", "snapshot MiB", "snapshot B/token",
                      "B/token vs all-layers / sliding-min"], rows))
    if results:
        r = results[0]
        print(f"\nKV dtype {r['kv_dtype']}; theoretical B/token: all layers keep all = "
              f"{C.fmt(r['all_layers_bytes_per_token'], 0)}; sliding-window minimum at each size = "
              + ", ".join(f"{C.fmt(x['sliding_min_bytes_per_token'], 0)} ({x['history_tokens']:,})" for x in results))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
