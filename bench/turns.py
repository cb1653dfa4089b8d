"""A 16-turn conversation on the real Gemma 3 270M: does a turn cost the same at turn 16 as at turn 1?

Usage::

    python bench/turns.py                     # full: 16 turns, 32 tokens each, medians of 3 runs, all engines
    python bench/turns.py --quick             # smoke run: 4 turns, 16 tokens, 1 run
    python bench/turns.py --engines ours,llama

The workload (the issue's "16-turn conversation"): 16 deterministic user messages of ~55 tokens each (cut from
stdlib docstrings), greedy decoding, exactly 32 generated tokens per turn (``ignore_eos``). Each engine runs in its
own subprocess with 2 threads and carries its own history (its own generated tokens), so every engine sees the
same number of tokens per turn. Engines:

- ours (reuse): a ``Session`` (int8 weights): each turn computes only the tokens not already in the session's KV;
- ours (re-prefill): the same engine with no reuse: each turn submits the whole history with no KV handle, after
  clearing the prefix cache on the loop thread (checked: ``cached_tokens == 0`` every turn);
- transformers: bf16 from the same GGUF, one ``DynamicCache`` reused across turns (only new tokens are fed);
- llama.cpp: llama-cpp-python ``Llama.generate`` on the GGUF; it reuses the longest common prefix of what it
  evaluated before (checked: tokens it actually evaluates per turn are counted).

Reported per turn: seconds (prefill of the new tokens + 32 decode steps) and, per engine, turn16/turn1, total, and
ours/llama.cpp total. Targets from the issue: turn 16 <= 1.2x turn 1; total <= 1.0x llama.cpp.
Results: a markdown table on stdout and ``bench/out/turns.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "turns"
ENGINES = ("ours", "transformers", "llama")
MODES = {"ours": ("ours-reuse", "ours-reprefill"), "transformers": ("transformers",), "llama": ("llama",)}
LABELS = {"ours-reuse": "ours (KV reuse)", "ours-reprefill": "ours (re-prefill)",
          "transformers": "transformers bf16 (DynamicCache)", "llama": "llama.cpp (prefix reuse)"}


# ------------------------------------------------------------------------------------------------ parent


def make_workload(quick: bool) -> dict:
    turns = 4 if quick else 16
    return {"model_path": C.model_path(), "messages": C.user_messages(turns, 55, seed=16),
            "warmup": C.user_messages(1, 30, seed=99)[0], "gen_tokens": 16 if quick else 32,
            "runs": 1 if quick else 3}


def parent(args: argparse.Namespace) -> None:
    engines = [e.strip() for e in args.engines.split(",")] if args.engines != "all" else list(ENGINES)
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"error: unknown engine {e!r} (choose from {', '.join(ENGINES)}, all)")
    w = make_workload(args.quick)
    tok = C.tokenizer()
    w["message_tokens"] = [len(tok.encode(m)) for m in w["messages"]]
    children = [C.run_child(__file__, e, w) for e in engines]
    results: dict[str, dict] = {}
    for e, r in zip(engines, children):
        if "error" in r:
            for mode in MODES[e]:
                results[mode] = {"error": r["error"]}
        else:
            results.update(r["modes"])
            for mode in MODES[e]:
                results[mode].update(peak_rss_mb=r["peak_rss_mb"], background_cores=r["background_cores"])
    summary = summarize(results)
    m = C.meta(args.quick, turns=len(w["messages"]), gen_tokens=w["gen_tokens"], runs=w["runs"],
               message_tokens=w["message_tokens"])
    path = C.write_json(NAME, {"meta": m, "results": results, "summary": summary})
    C.print_header(m)
    print(f"{len(w['messages'])} turns, user messages of {min(w['message_tokens'])}-{max(w['message_tokens'])} "
          f"tokens (+ turn markup), {w['gen_tokens']} greedy tokens per turn (ignore_eos), "
          f"medians of {w['runs']} run(s) after a warm-up; seconds per turn\n")
    print(table(results, len(w["messages"])))
    print()
    print(summary_table(summary))
    print(f"\nJSON: {path}")


def summarize(results: dict) -> dict:
    out: dict[str, dict] = {}
    llama_total = results.get("llama", {}).get("total_s")
    for mode, r in results.items():
        if "error" in r:
            continue
        t = r["turn_s"]
        out[mode] = {"turn1_s": t[0], "turn_last_s": t[-1], "last_over_first": t[-1] / t[0],
                     "total_s": r["total_s"], "over_llama_total": C.ratio(r["total_s"], llama_total),
                     "target_last_over_first_1_2": t[-1] / t[0] <= 1.2,
                     "background_cores": r.get("background_cores")}
    if "ours-reuse" in out and out["ours-reuse"]["over_llama_total"] is not None:
        out["ours-reuse"]["target_total_vs_llama_1_0"] = out["ours-reuse"]["over_llama_total"] <= 1.0
    return out


def table(results: dict, n_turns: int) -> str:
    modes = [m for m in ("ours-reuse", "ours-reprefill", "transformers", "llama") if m in results]
    headers = ["turn", "prompt tokens", *[LABELS[m] + " s" for m in modes],
               "ours prefilled / cached tokens", "llama.cpp evaluated prompt tokens"]
    rows = []
    reuse = results.get("ours-reuse", {})
    llama = results.get("llama", {})
    for i in range(n_turns):
        row = [i + 1, reuse.get("prompt_tokens", ["-"] * n_turns)[i] if "error" not in reuse else "-"]
        for m in modes:
            r = results[m]
            row.append("error" if "error" in r else C.fmt(r["turn_s"][i], 3))
        row.append(f"{reuse['prefilled_tokens'][i]} / {reuse['cached_tokens'][i]}"
                   if reuse and "error" not in reuse else "-")
        row.append(llama["prefilled_tokens"][i] if llama and "error" not in llama else "-")
        rows.append(row)
    total = ["**total**", ""]
    for m in modes:
        total.append("error: " + results[m]["error"] if "error" in results[m] else C.fmt(results[m]["total_s"], 2))
    rows.append(total + ["", ""])
    return C.md_table(headers, rows)


def summary_table(summary: dict) -> str:
    rows = []
    for mode, s in summary.items():
        vs = s["over_llama_total"]
        rows.append([LABELS[mode], C.fmt(s["turn1_s"], 3), C.fmt(s["turn_last_s"], 3),
                     f"{s['last_over_first']:.2f}x" + (" ok" if s["target_last_over_first_1_2"] else " MISS"),
                     C.fmt(s["total_s"], 2),
                     "-" if vs is None else f"{vs:.2f}x" + ("" if mode != "ours-reuse" else
                                                             (" ok" if vs <= 1.0 else " MISS")),
                     C.fmt(s["background_cores"], 2)])
    return C.md_table(["engine", "turn 1 s", "last turn s", "last / first (target <= 1.2x)", "total s",
                       "total / llama.cpp (target <= 1.0x for ours)", "background load (cores)"], rows)


# ------------------------------------------------------------------------------------------------ children


def child_ours(w: dict) -> dict:
    import gemma_sessions as gs

    model = gs.load_model(w["model_path"], progress=False)
    C.use_tokenizer(model.tokenizer)
    engine = gs.Engine(model, kv_cache_bytes=512 << 20)
    manager = gs.SessionManager(engine)
    G = w["gen_tokens"]
    params = gs.SamplingParams(temperature=0.0, max_tokens=G, ignore_eos=True)
    bos = model.tokenizer.bos_id

    def reset_prefix_cache() -> None:  # on the loop thread, after any queued release
        engine.reset_prefix_cache()

    # warm-up (first-call costs), then forget it
    s = manager.create(sampling=params)
    s.send(w["warmup"])
    s.send(w["warmup"])
    manager.delete(s.id)
    reset_prefix_cache()

    reuse_runs, reprefill_runs = [], []
    for _ in range(w["runs"]):
        s = manager.create(sampling=params)
        times, stats, tokens = [], [], []
        for msg in w["messages"]:
            t0 = time.perf_counter()
            reply = s.send(msg)
            times.append(time.perf_counter() - t0)
            stats.append(reply.stats)
            tokens.append(reply.token_ids)
            assert reply.stats.generated_tokens == G, reply.stats
        reuse_runs.append({"times": times, "stats": stats, "tokens": tokens})
        manager.delete(s.id)
        reset_prefix_cache()

    for _ in range(w["runs"]):
        hist = [bos]
        times, stats, tokens = [], [], []
        for msg in w["messages"]:
            prompt = hist + C.user_turn_ids(msg)
            reset_prefix_cache()
            t0 = time.perf_counter()
            out = engine.submit(prompt, params).result()
            times.append(time.perf_counter() - t0)
            if out.stats.cached_tokens != 0:
                raise RuntimeError(f"re-prefill baseline hit the cache: {out.stats}")
            stats.append(out.stats)
            tokens.append(out.token_ids)
            hist = prompt + out.token_ids + C.reply_tail()
        reprefill_runs.append({"times": times, "stats": stats, "tokens": tokens})
    engine.close()

    def mode(runs: list[dict]) -> dict:
        n = len(runs[0]["times"])
        per_turn = [C.median(r["times"][i] for r in runs) for i in range(n)]
        st = runs[0]["stats"]
        return {"turn_s": per_turn, "total_s": C.median(sum(r["times"]) for r in runs),
                "prompt_tokens": [x.prompt_tokens for x in st], "cached_tokens": [x.cached_tokens for x in st],
                "prefilled_tokens": [x.prefilled_tokens for x in st],
                "ttft_s": [C.median(r["stats"][i].ttft_s for r in runs) for i in range(n)],
                "tokens": runs[0]["tokens"]}

    a, b = mode(reuse_runs), mode(reprefill_runs)
    a["same_tokens_as_reprefill"] = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    return {"ours-reuse": a, "ours-reprefill": b}


def child_transformers(w: dict) -> dict:
    import torch  # before gemma_sessions (C.tokenizer): torch's OpenMP keeps the user's policy (common.child_env)

    model = C.load_transformers(w["model_path"])
    G = w["gen_tokens"]
    bos = C.tokenizer().bos_id

    def conversation(messages: list[str]) -> tuple[list[float], list[list[int]], list[int]]:
        """One conversation with one DynamicCache: each turn feeds only the tokens the cache lacks."""
        cache = None
        pending = [bos]
        times, tokens, fed = [], [], []
        with torch.inference_mode():
            for msg in messages:
                new = pending + C.user_turn_ids(msg)
                t0 = time.perf_counter()
                out = model(input_ids=torch.tensor([new]), use_cache=True, logits_to_keep=1, **C.hf_cache(cache))
                cache = C.hf_cache_of(out)
                gen = [int(out.logits[0, -1].argmax())]
                for _ in range(G - 1):
                    out = model(input_ids=torch.tensor([[gen[-1]]]), use_cache=True, **C.hf_cache(cache))
                    gen.append(int(out.logits[0, -1].argmax()))
                times.append(time.perf_counter() - t0)
                tokens.append(gen)
                fed.append(len(new))
                pending = [gen[-1]] + C.reply_tail()  # the last token was sampled but never fed
        return times, tokens, fed

    conversation([w["warmup"]] * 2)
    runs = [conversation(w["messages"]) for _ in range(w["runs"])]
    n = len(w["messages"])
    return {"transformers": {"turn_s": [C.median(r[0][i] for r in runs) for i in range(n)],
                             "total_s": C.median(sum(r[0]) for r in runs), "tokens": runs[0][1],
                             "prefilled_tokens": runs[0][2]}}


def child_llama(w: dict) -> dict:
    import llama_cpp

    G = w["gen_tokens"]
    tok = C.tokenizer()
    n_ctx = 1 + sum(len(C.user_turn_ids(m)) + G + 2 for m in w["messages"]) + 64
    llm = llama_cpp.Llama(model_path=w["model_path"], n_ctx=max(n_ctx, 512), n_batch=512, n_threads=2,
                          n_threads_batch=2, verbose=False)
    evaluated = [0]
    original_eval = llm.eval

    def counting_eval(tokens):  # generate() calls self.eval: count what it really computes
        evaluated[0] += len(tokens)
        return original_eval(tokens)

    llm.eval = counting_eval

    def conversation(messages: list[str]) -> tuple[list[float], list[list[int]], list[int]]:
        llm.reset()  # no reuse across runs; within a run, generate() reuses the common prefix
        hist = [tok.bos_id]
        times, tokens, prefilled = [], [], []
        for msg in messages:
            prompt = hist + C.user_turn_ids(msg)
            before = evaluated[0]
            t0 = time.perf_counter()
            stream = llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            gen = [next(stream) for _ in range(G)]
            stream.close()
            times.append(time.perf_counter() - t0)
            tokens.append(gen)
            prefilled.append(evaluated[0] - before - (G - 1))
            hist = prompt + gen + C.reply_tail()
        return times, tokens, prefilled

    conversation([w["warmup"]] * 2)
    runs = [conversation(w["messages"]) for _ in range(w["runs"])]
    n = len(w["messages"])
    return {"llama": {"turn_s": [C.median(r[0][i] for r in runs) for i in range(n)],
                      "total_s": C.median(sum(r[0]) for r in runs), "tokens": runs[0][1],
                      "prefilled_tokens": runs[0][2]}}


def child(args: argparse.Namespace) -> None:
    C.setup_torch()
    w = json.loads(Path(args.workload).read_text())
    fn = {"ours": child_ours, "transformers": child_transformers, "llama": child_llama}[args.child]
    with C.BackgroundLoad() as load:
        modes = fn(w)
    out = {"engine": args.child, "modes": modes, "peak_rss_mb": C.peak_rss_mb(), "background_cores": load.cores}
    Path(args.result).write_text(json.dumps(out))
    for name, r in modes.items():
        print(f"    {name}: total {r['total_s']:.2f} s, turn 1 {r['turn_s'][0]:.3f} s, last {r['turn_s'][-1]:.3f} s",
              file=sys.stderr, flush=True)


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--engines", default="all", help="comma list of: ours, transformers, llama, all")

    C.parse_and_dispatch(__doc__, child, parent, "4 turns of 16 tokens, 1 run", extra)


if __name__ == "__main__":
    main()
