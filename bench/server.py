"""The OpenAI-compatible server under load: 32 streaming clients in multi-turn conversations, vs the Python API.

Usage::

    python bench/server.py            # full: 60 s of load, 32 clients
    python bench/server.py --quick    # smoke run: 15 s of load

HTTP: ``python -m gemma_sessions.cli serve --store TMP --host 127.0.0.1 --port P --kv-cache-bytes B`` is started as
a subprocess on a free port; once ``/health`` answers, 32 client threads (the official ``openai`` client, one
``OpenAI`` instance each, no retries) each create a conversation (``client.conversations.create()``) and run turns
back to back through ``/v1/responses`` with ``conversation=``, ``stream=True``, ``temperature=0``,
``max_output_tokens=32`` and a ~40-token user message, until the time bound (a turn running at the bound finishes).
The server is then stopped with SIGINT (killed if it has not exited 60 s later).

In-process: the same workload (32 threads, same messages, same sampling: the server's default ``SamplingParams``
with ``temperature=0, max_tokens=32``) through ``SessionManager(engine, store=TMP).create()`` and
``Session.stream``, with the same engine settings, in its own subprocess.

Per side: aggregate generated tokens/s (``usage.output_tokens`` / ``reply.stats.generated_tokens`` over the wall
time from the start to the last turn's end), p50/p99 TTFT (request sent -> first text delta, as the client sees
it), p50/p99 inter-token latency (gaps between consecutive text deltas), turns, errors (must be 0), peak RSS
(the server process's ``VmHWM`` for HTTP). The HTTP overhead ratio is in-process tokens/s / HTTP tokens/s (and
the TTFT ratio). The 32 client threads share the 2 cores with the server: that cost is part of what is measured.
Greedy replies may end early at ``<end_of_turn>`` (the API has no ``ignore_eos``), so tokens are counted, not
assumed. Results: a markdown table on stdout and ``bench/out/server.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "server"
CLIENTS = 32
USER_TOKENS = 40
GEN_TOKENS = 32
KV_CACHE_BYTES = 1 << 30
TURNS_PER_CLIENT_MAX = 64  # distinct messages per client (cycled if a client runs more turns)


# ------------------------------------------------------------------------------------------------ parent


def parent(args: argparse.Namespace) -> None:
    w = {"model_path": C.model_path(), "clients": CLIENTS, "duration_s": 15.0 if args.quick else 60.0,
         "gen_tokens": GEN_TOKENS, "user_tokens": USER_TOKENS, "kv_cache_bytes": KV_CACHE_BYTES,
         "turns_per_client": 8 if args.quick else TURNS_PER_CLIENT_MAX}
    sides = {}
    for side in ("http", "inproc"):
        sides[side] = C.run_child(__file__, side, w, timeout=w["duration_s"] + 600)
    m = C.meta(args.quick, clients=CLIENTS, duration_s=w["duration_s"], gen_tokens=GEN_TOKENS,
               user_tokens=USER_TOKENS, kv_cache_bytes=KV_CACHE_BYTES)
    h, i = sides["http"], sides["inproc"]
    summary = {}
    if "error" not in h and "error" not in i:
        summary = {"inproc_over_http_tokens_per_s": C.ratio(i["tokens_per_s"], h["tokens_per_s"]),
                   "http_over_inproc_ttft_p50": C.ratio(h["ttft_p50_s"], i["ttft_p50_s"]),
                   "http_over_inproc_itl_p50": C.ratio(h["itl_p50_s"], i["itl_p50_s"]),
                   "http_errors": h["errors"], "target_zero_errors": h["errors"] == 0}
    path = C.write_json(NAME, {"meta": m, "results": sides, "summary": summary})
    C.print_header(m)
    print(f"{CLIENTS} concurrent clients, multi-turn conversations for {w['duration_s']:.0f} s (turns in flight at "
          f"the bound finish), ~{USER_TOKENS}-token messages, temperature 0, max {GEN_TOKENS} output tokens\n")
    rows = []
    for label, r in (("HTTP /v1/responses (openai client, stream, conversation=)", h),
                     ("in-process Python API (Session.stream)", i)):
        if "error" in r:
            rows.append([label, f"error: {r['error']}"] + [""] * 7)
            continue
        rows.append([label, C.fmt(r["tokens_per_s"]), f"{C.fmt(r['ttft_p50_s'], 3)} / {C.fmt(r['ttft_p99_s'], 3)}",
                     f"{C.fmt(r['itl_p50_s'] * 1e3, 1)} / {C.fmt(r['itl_p99_s'] * 1e3, 1)}", r["turns"],
                     f"{r['output_tokens']:,}", r["errors"], C.fmt(r["peak_rss_mb"], 0),
                     C.fmt(r["background_cores"], 2)])
    print(C.md_table(["side", "tokens/s", "TTFT p50 / p99 s", "ITL p50 / p99 ms", "turns", "output tokens",
                      "errors", "peak RSS MB", "background load (cores)"], rows))
    if summary:
        print(f"\nHTTP overhead: in-process / HTTP tokens/s = {summary['inproc_over_http_tokens_per_s']:.2f}x; "
              f"HTTP / in-process TTFT p50 = {summary['http_over_inproc_ttft_p50']:.2f}x, ITL p50 = "
              f"{summary['http_over_inproc_itl_p50']:.2f}x; HTTP errors: {h['errors']} "
              f"({'ok' if h['errors'] == 0 else 'MISS: must be 0'})")
    for side, r in sides.items():
        for e in (r.get("error_samples") or [])[:5]:
            print(f"  {side} error: {e}")
    print(f"\nJSON: {path}")


# ------------------------------------------------------------------------------------------------ load


class Load:
    """Per-turn measurements collected from all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.output_tokens = 0
        self.turns = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.cached_tokens = 0
        self.prompt_tokens = 0

    def turn(self, ttft: float | None, itl: list[float], tokens: int, prompt: int = 0, cached: int = 0) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.append(ttft)
            self.itl += itl
            self.output_tokens += tokens
            self.turns += 1
            self.prompt_tokens += prompt
            self.cached_tokens += cached

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_samples) < 10:
                self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])

    def result(self, wall: float) -> dict:
        return {"tokens_per_s": self.output_tokens / wall, "wall_s": wall, "turns": self.turns,
                "output_tokens": self.output_tokens, "errors": self.errors, "error_samples": self.error_samples,
                "ttft_p50_s": C.percentile(self.ttft, 50), "ttft_p99_s": C.percentile(self.ttft, 99),
                "itl_p50_s": C.percentile(self.itl, 50), "itl_p99_s": C.percentile(self.itl, 99),
                "cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None}


def run_threads(n: int, body, duration: float) -> float:
    """Start n threads running body(i, deadline), released together; returns the wall time until all end."""
    barrier = threading.Barrier(n + 1)
    holder: dict = {}

    def worker(i: int) -> None:
        barrier.wait()
        body(i, holder["deadline"])

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    holder["deadline"] = t0 + duration
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def messages(w: dict) -> list[list[str]]:
    n, k = w["clients"], w["turns_per_client"]
    flat = C.user_messages(n * k, w["user_tokens"], seed=2024)
    return [flat[i * k:(i + 1) * k] for i in range(n)]


# ------------------------------------------------------------------------------------------------ children


def child_http(w: dict) -> dict:
    import httpx
    import openai

    port = C.free_port()
    url = f"http://127.0.0.1:{port}"
    store = tempfile.mkdtemp(prefix="gs-bench-server-")
    cmd = [sys.executable, "-m", "gemma_sessions.cli", "serve", "--store", store, "--host", "127.0.0.1", "--port",
           str(port), "--kv-cache-bytes", str(w["kv_cache_bytes"]), "--max-batch", "64"]
    print("    server: " + " ".join(cmd), file=sys.stderr, flush=True)
    log = open(Path(store) / "server.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    out: dict = {}
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError("server exited: " + (Path(store) / "server.log").read_text()[-2000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 180:
                raise RuntimeError("server did not start in 180 s")
            time.sleep(0.3)
        out["server_start_s"] = time.time() - t0
        clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=300)
                   for _ in range(w["clients"])]
        msgs = messages(w)
        G = w["gen_tokens"]

        def one_turn(client, conv_id: str, text: str, load: Load | None) -> None:
            t0 = time.perf_counter()
            first = last = None
            itl: list[float] = []
            usage = None
            failed = None
            stream = client.responses.create(model="gemma3-270m", conversation=conv_id, input=text, stream=True,
                                             temperature=0, max_output_tokens=G)
            for ev in stream:
                if ev.type == "response.output_text.delta":
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        itl.append(now - last)
                    last = now
                elif ev.type in ("response.completed", "response.incomplete"):
                    usage = ev.response.usage
                elif ev.type in ("error", "response.failed"):
                    failed = ev
            if failed is not None or usage is None:
                raise RuntimeError(f"stream ended without completion: {failed!r}")
            if load is not None:
                load.turn(first, itl, usage.output_tokens, usage.input_tokens,
                          usage.input_tokens_details.cached_tokens if usage.input_tokens_details else 0)

        # warm-up: one conversation, one turn
        warm = clients[0].conversations.create()
        one_turn(clients[0], warm.id, C.user_messages(1, 20, seed=99)[0], None)
        convs = [c.conversations.create().id for c in clients]
        load = Load()

        def body(i: int, deadline: float) -> None:
            k = 0
            while time.perf_counter() < deadline:
                try:
                    one_turn(clients[i], convs[i], msgs[i][k % len(msgs[i])], load)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    load.error(exc)
                k += 1

        server_cpu0 = C.proc_cpu_s(proc.pid)
        with C.BackgroundLoad() as bg:
            wall = run_threads(w["clients"], body, w["duration_s"])
        server_cores = (C.proc_cpu_s(proc.pid) - server_cpu0) / wall
        out.update(load.result(wall))
        out["server_cores"] = server_cores
        out["background_cores_during_load"] = max(0.0, bg.cores - server_cores)  # minus our own server
        out["peak_rss_mb"] = C.proc_status_mb(proc.pid, "VmHWM")
        out["server_rss_end_mb"] = C.proc_status_mb(proc.pid, "VmRSS")
        out["client_peak_rss_mb"] = C.peak_rss_mb()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
                out["server_exit"] = f"SIGINT, exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                out["server_exit"] = "killed (did not exit 60 s after SIGINT)"
        log.close()
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    return out


def child_inproc(w: dict) -> dict:
    import gemma_sessions as gs

    model = gs.load_model(w["model_path"], progress=False)
    C.use_tokenizer(model.tokenizer)
    store = tempfile.mkdtemp(prefix="gs-bench-inproc-")
    engine = gs.Engine(model, kv_cache_bytes=w["kv_cache_bytes"], max_batch=64)
    manager = gs.SessionManager(engine, store=store)
    params = gs.SamplingParams().replace(temperature=0.0, max_tokens=w["gen_tokens"])  # what the server uses
    msgs = messages(w)
    out: dict = {}
    try:
        def one_turn(session, text: str, load: Load | None) -> None:
            t0 = time.perf_counter()
            first = last = None
            itl: list[float] = []
            stream = session.stream(text, sampling=params)
            for _ in stream:
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    itl.append(now - last)
                last = now
            st = stream.reply.stats
            if load is not None:
                load.turn(first, itl, st.generated_tokens, st.prompt_tokens, st.cached_tokens)

        one_turn(manager.create(), C.user_messages(1, 20, seed=99)[0], None)
        sessions = [manager.create() for _ in range(w["clients"])]
        load = Load()

        def body(i: int, deadline: float) -> None:
            k = 0
            while time.perf_counter() < deadline:
                try:
                    one_turn(sessions[i], msgs[i][k % len(msgs[i])], load)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    load.error(exc)
                k += 1

        with C.BackgroundLoad() as bg:
            wall = run_threads(w["clients"], body, w["duration_s"])
        out.update(load.result(wall))
        out["background_cores_during_load"] = bg.cores
    finally:
        manager.store.close(snapshot_all=False)
        engine.close()
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    out["peak_rss_mb"] = C.peak_rss_mb()
    return out


def child(args: argparse.Namespace) -> None:
    C.setup_torch()
    w = json.loads(Path(args.workload).read_text())
    with C.BackgroundLoad() as load:
        out = {"http": child_http, "inproc": child_inproc}[args.child](w)
    out.update(side=args.child, background_cores=out.get("background_cores_during_load", load.cores))
    Path(args.result).write_text(json.dumps(out))
    print(f"    {args.child}: {out['tokens_per_s']:.1f} tok/s, {out['turns']} turns, TTFT p50 {out['ttft_p50_s']:.3f} s, "
          f"errors {out['errors']}", file=sys.stderr, flush=True)


def main() -> None:
    C.parse_and_dispatch(__doc__, child, parent, "15 s of load instead of 60 s")


if __name__ == "__main__":
    main()
