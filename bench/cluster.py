"""Scale-out: a failover turn's time to first token against a recompute, and HTTP throughput of 2 replicas vs 1.

Usage::

    python bench/cluster.py                 # full: 4096 tokens of history, 8 clients x 4 turns, medians of 3 runs
    python bench/cluster.py --quick         # smoke run: 256 tokens of history, 2 clients x 2 turns of 8 tokens, 1 run
    python bench/cluster.py --history 8192 --clients 16 --model PATH --serve-args="--kv-cache-bytes 2000000000"

Everything runs on this machine as real processes on free 127.0.0.1 ports (deploy/cluster.py): one redis-server
(deploy/redis.conf: AOF, fsync always), two ``gemma-sessions serve --store redis://...`` replicas (r1, r2; the
default model at the default CPU dtype, as ``make cluster`` runs it), and two nginx (deploy/nginx.conf, hashing on
``X-Session-Id``): one in front of both replicas, one in front of r1 alone.

1. Failover TTFT (per run, fresh text so nothing is cached from an earlier run):
   - failover: a conversation whose first turn (a ~HISTORY-token message, 8 reply tokens) ran on r1; once r1's KV
     blobs are in Redis (its /metrics show no queued snapshot), its next turn (a short message) goes to r2, which has
     never seen it: r2 reads the history from the turn log and its KV pages from the blobs, and prefills only the
     new message;
   - recompute: the same shape on r2 with no KV anywhere: a conversation created on r2 with a history of the same
     length as items (``POST /v1/conversations``), then the same short turn, which prefills the whole history.
   TTFT is the client's (request sent -> first ``response.output_text.delta``, streaming). Target: failover <= 0.2x
   the recompute at 4k tokens of history.
2. Throughput: CLIENTS clients released together, each a conversation of TURNS turns of ~40-token unique messages
   (``X-Session-Id`` set, temperature 0, max GEN tokens, streaming), once through the 2-replica nginx and once
   through the 1-replica nginx; generated tokens/s = completion tokens / wall time from release to the last reply.
   On a 2-core machine both replicas share the same 2 cores, so 2 replicas cannot beat 1 here; the number says what
   the balancer and the shared store cost. On more cores or machines each replica gets its own (README "Scale-out").

Results: a markdown table on stdout and ``bench/out/cluster.json``; medians of RUNS runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def _deploy_cluster():
    """deploy/cluster.py (scripts, not a package; loaded by path: this file has the same name)."""
    spec = importlib.util.spec_from_file_location("deploy_cluster", C.BENCH.parent / "deploy" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DEPLOY = _deploy_cluster()
Cluster, Nginx = _DEPLOY.Cluster, _DEPLOY.Nginx

NAME = "cluster"
USER_TOKENS = 40
NEXT_MESSAGE = "Summarize that in one sentence."


# ------------------------------------------------------------------------------------------------ HTTP


def stream_turn(url: str, conv: str, text: str, max_tokens: int, sticky: bool = True) -> dict:
    """One streamed turn: {ttft_s, total_s, output_tokens, cached_tokens, input_tokens, replica}."""
    body = {"model": "m", "conversation": conv, "input": text, "max_output_tokens": max_tokens, "temperature": 0,
            "stream": True}
    headers = {"X-Session-Id": conv} if sticky else {}
    t0 = time.perf_counter()
    ttft, final = None, None
    with httpx.stream("POST", f"{url}/v1/responses", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        replica = r.headers.get("x-replica")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and ttft is None:
                ttft = time.perf_counter() - t0
            elif event["type"] in ("response.completed", "response.incomplete"):
                final = event["response"]
            elif event["type"] == "response.failed":
                raise RuntimeError(f"turn failed: {event['response'].get('error')}")
    if final is None:
        raise RuntimeError("the stream ended without a final response")
    u = final["usage"]
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "output_tokens": u["output_tokens"],
            "input_tokens": u["input_tokens"], "cached_tokens": u["input_tokens_details"]["cached_tokens"],
            "replica": replica}


def create_conversation(url: str, items: list[dict] | None = None) -> str:
    r = httpx.post(f"{url}/v1/conversations", json={"items": items or []}, timeout=120)
    r.raise_for_status()
    return r.json()["id"]


# ------------------------------------------------------------------------------------------------ 1. failover


def failover_run(cluster: Cluster, history: int, seed: int) -> dict:
    r1, r2 = cluster.replica("r1"), cluster.replica("r2")
    # failover: the history's turn on r1, its next turn on r2 (KV pages from Redis)
    conv = create_conversation(r1.url)
    first = stream_turn(r1.url, conv, C.text_of_tokens(history, seed), 8, sticky=False)
    cluster.wait_kv_written(r1)
    failover = stream_turn(r2.url, conv, NEXT_MESSAGE, 8, sticky=False)
    # recompute: a history of the same length given as items on r2 (no KV anywhere), then the same turn
    text = C.text_of_tokens(history, seed + 10_000)
    fresh = create_conversation(r2.url, [{"role": "user", "content": text},
                                         {"role": "assistant", "content": "All right."}])
    recompute = stream_turn(r2.url, fresh, NEXT_MESSAGE, 8, sticky=False)
    return {"history_tokens": first["input_tokens"] + first["output_tokens"], "failover": failover,
            "recompute": recompute, "ratio": C.ratio(failover["ttft_s"], recompute["ttft_s"])}


# ------------------------------------------------------------------------------------------------ 2. throughput


def throughput_run(url: str, clients: int, turns: int, gen: int, seed: int) -> dict:
    messages = C.user_messages(clients * turns, USER_TOKENS, seed)
    convs = [create_conversation(url) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    results: list[list[dict]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(i: int) -> None:
        barrier.wait()
        try:
            for t in range(turns):
                results[i].append(stream_turn(url, convs[i], messages[i * turns + t], gen))
        except (RuntimeError, httpx.HTTPError) as exc:
            errors.append(str(exc)[:300])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    turns_done = [x for r in results for x in r]
    tokens = sum(x["output_tokens"] for x in turns_done)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens, "turns": len(turns_done),
            "ttft_p50_s": C.percentile([x["ttft_s"] for x in turns_done], 50),
            "replicas_seen": sorted({x["replica"] for x in turns_done}), "errors": errors}


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict:
    w = {"history": args.history or (256 if args.quick else 4096), "clients": args.clients or (2 if args.quick else 8),
         "turns": args.turns or (2 if args.quick else 4), "gen": args.gen_tokens or (8 if args.quick else 32),
         "runs": args.runs or (1 if args.quick else 3), "model": args.model or C.model_path()}
    serve = args.serve_args.split() if args.serve_args else ["--kv-cache-bytes", str(1 << 30)]
    run_dir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    out: dict = {"workload": w, "serve_args": serve, "failover": [], "two": [], "one": []}
    print(f"--- starting redis + 2 replicas + nginx in {run_dir} ...", file=sys.stderr, flush=True)
    with Cluster(run_dir, n=2, model=w["model"], serve_args=serve) as cluster:
        solo = Nginx(run_dir / "solo", [cluster.replica("r1")]).start()  # the same r1, alone behind its own nginx
        try:
            for r in cluster.replicas:  # warm-up: each replica's first turn pays one-time costs
                stream_turn(r.url, create_conversation(r.url), "Hello.", 4, sticky=False)
            for i in range(w["runs"]):
                print(f"--- run {i + 1}/{w['runs']}: failover at {w['history']} tokens", file=sys.stderr, flush=True)
                out["failover"].append(failover_run(cluster, w["history"], seed=1000 * i + 7))
                for key, url in (("two", cluster.url), ("one", solo.url)):
                    print(f"--- run {i + 1}: throughput, {key} replica(s)", file=sys.stderr, flush=True)
                    out[key].append(throughput_run(url, w["clients"], w["turns"], w["gen"], seed=1000 * i + 11))
        finally:
            solo.stop()
    return out


def summarize(out: dict) -> dict:
    f = out["failover"]
    return {"history_tokens": C.median([r["history_tokens"] for r in f]),
            "failover_ttft_s": C.median([r["failover"]["ttft_s"] for r in f]),
            "recompute_ttft_s": C.median([r["recompute"]["ttft_s"] for r in f]),
            "failover_cached_tokens": C.median([r["failover"]["cached_tokens"] for r in f]),
            "recompute_cached_tokens": C.median([r["recompute"]["cached_tokens"] for r in f]),
            "ttft_ratio": C.median([r["ratio"] for r in f]),
            "two_tokens_per_s": C.median([r["tokens_per_s"] for r in out["two"]]),
            "one_tokens_per_s": C.median([r["tokens_per_s"] for r in out["one"]]),
            "two_ttft_p50_s": C.median([r["ttft_p50_s"] for r in out["two"]]),
            "one_ttft_p50_s": C.median([r["ttft_p50_s"] for r in out["one"]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run at tiny sizes")
    p.add_argument("--history", type=int, default=None, help="tokens of history before the failover turn")
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--gen-tokens", type=int, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--model", default=None, help="default: gemma3-270m from the user cache")
    p.add_argument("--serve-args", default=None, help="extra `serve` arguments for both replicas (one string)")
    args = p.parse_args()
    out = run(args)
    s = summarize(out)
    w = out["workload"]
    m = C.meta(args.quick, **w, serve_args=out["serve_args"])
    path = C.write_json(NAME, {"meta": m, "results": out, "summary": s})
    C.print_header(m)
    print(f"1. A turn after {C.fmt(s['history_tokens'], 0)} tokens of history on a replica that never saw the "
          f"conversation; client TTFT, streaming; medians of {w['runs']} run(s)\n")
    print(C.md_table(["path", "TTFT ms", "prompt tokens cached"], [
        ["failover (history from the turn log, KV pages from Redis)", C.fmt(s["failover_ttft_s"] * 1e3, 0),
         C.fmt(s["failover_cached_tokens"], 0)],
        ["recompute (same history, no KV)", C.fmt(s["recompute_ttft_s"] * 1e3, 0),
         C.fmt(s["recompute_cached_tokens"], 0)]]))
    print(f"\nfailover / recompute TTFT: {C.fmt(s['ttft_ratio'], 2)}x (target <= 0.2x at 4k tokens)\n")
    print(f"2. {w['clients']} clients x {w['turns']} turns, ~{USER_TOKENS}-token messages, max {w['gen']} tokens, "
          f"sticky (X-Session-Id), through nginx; medians of {w['runs']} run(s)\n")
    print(C.md_table(["replicas behind nginx", "generated tok/s", "TTFT p50 ms"], [
        [2, C.fmt(s["two_tokens_per_s"]), C.fmt(s["two_ttft_p50_s"] * 1e3, 0)],
        [1, C.fmt(s["one_tokens_per_s"]), C.fmt(s["one_ttft_p50_s"] * 1e3, 0)]]))
    print(f"\n2 / 1 replicas: {C.fmt(C.ratio(s['two_tokens_per_s'], s['one_tokens_per_s']), 2)}x tokens/s "
          f"on {m['cpus']} cpus")
    for key in ("two", "one"):
        for r in out[key]:
            for err in r["errors"][:3]:
                print(f"  {key} error: {err}")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
