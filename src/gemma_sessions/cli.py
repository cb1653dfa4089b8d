"""The ``gemma-sessions`` command line: serve, chat, sessions, generate, model.

Contract: a thin shell over the Python API; every failure the library raises on purpose prints one line
``error: ...`` and exits with status 2 (bad usage) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import GemmaSessionsError, InvalidRequestError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma3-270m", help="model name, .gguf file or HF directory")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | int8 (fast, the CPU default)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                          reasoning=getattr(args, "reasoning", False))


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_stream
    from .loading import load_model

    params = _sampling(args)  # validate before the (slow) model load
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    for delta in generate_stream(model, prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from .loading import load_model, resolve_model_path

    path = resolve_model_path(args.name)
    if args.action == "fetch":
        print(path)
        return 0
    model = load_model(args.name, dtype=args.dtype, device=args.device)
    c = model.config
    print(f"path: {path}\narchitecture: {c.architecture}\nlayers: {c.num_layers}\nhidden: {c.hidden_size}\n"
          f"heads: {c.num_heads} (kv {c.num_kv_heads}, head_dim {c.head_dim})\nvocab: {c.vocab_size}\n"
          f"context: {c.max_position_embeddings}\nsliding_window: {c.sliding_window}\n"
          f"weights: {model.weight_format}\nload_seconds: {model.load_seconds:.2f}")
    if hasattr(c, "global_head_dim"):  # Gemma 4: full layers have their own K/V shape; the last layers share K/V
        full = c.layer_types.index("full")
        print(f"full layers: kv {c.layer_kv_heads(full)}, head_dim {c.layer_head_dim(full)}\n"
              f"kv_shared_layers: {c.num_kv_shared_layers}")
    return 0


def _api_keys(args: argparse.Namespace) -> list[str]:
    import os

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("GEMMA_SESSIONS_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return keys


def _open_store(spec: str | None, readonly: bool = False):
    """The store ``spec`` names: ``redis://host:port/db`` (shared by replicas) or a directory (default: the user
    data dir). An unreachable Redis raises StoreUnavailableError naming the URL."""
    from .sessions import open_store

    return open_store(spec, readonly=readonly)


def _open_manager(args: argparse.Namespace, readonly_store: bool = False):
    """(engine, manager) for the model and store in ``args``. The store opens first: a bad one (an unreachable
    Redis) fails in a second, not after the model's load."""
    from .engine import Engine
    from .loading import load_model
    from .sessions import SessionManager

    store = None if getattr(args, "no_store", False) else _open_store(args.store, readonly=readonly_store)
    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        engine = Engine(model, kv_cache_bytes=getattr(args, "kv_cache_bytes", None),
                        max_batch=getattr(args, "max_batch", 64),
                        prefill_tokens_while_decoding=getattr(args, "prefill_tokens_while_decoding", 256),
                        **({"score_chunk": args.score_chunk} if getattr(args, "score_chunk", None) is not None else {}))
    except BaseException:
        if store is not None:
            store.close(snapshot_all=False)
        raise
    return engine, SessionManager(engine, store=store)


def _replica_name(args: argparse.Namespace) -> str:
    """``--replica-name`` (default host:port), checked: it goes out as a header on every response."""
    import re

    name = args.replica_name or f"{args.host}:{args.port}"
    if not re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,64}", name):
        raise InvalidRequestError(f"--replica-name {name!r}: use 1-64 of A-Z a-z 0-9 . _ : - [ ]")
    return name


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import create_app
    from .server.app import Limits
    from .server.heap import limit_arenas, start_trimming

    replica = _replica_name(args)
    limit_arenas()  # before the server's threads exist: each extra arena keeps its own freed memory
    engine, manager = _open_manager(args)
    if not args.lazy_kv:
        engine.reserve_memory()
    start_trimming()

    def shutdown() -> None:
        manager.close()
        engine.close()

    limits = Limits(max_body_bytes=args.max_body_bytes, max_import_bytes=args.max_import_bytes,
                    max_output_tokens=args.max_output_tokens, max_input_chars=args.max_input_chars,
                    max_waiting=args.max_waiting)
    app = create_app(manager, model_name=args.served_model_name or str(args.model), api_keys=_api_keys(args),
                     limits=limits, on_shutdown=shutdown, replica_name=replica)
    where = "memory only" if manager.store is None else manager.store.path  # a Redis URL without its password
    print(f"gemma-sessions serving {args.model} on http://{args.host}:{args.port} as {replica} (store: {where})",
          flush=True)
    _serve(app, args, engine)
    return 0


def _serve(app, args: argparse.Namespace, engine) -> None:
    """uvicorn, with a bounded graceful shutdown: on SIGTERM / SIGINT new requests get 503 at once, running
    turns may finish for ``--shutdown-grace`` seconds and are then cancelled (a cancelled turn adds nothing to
    its history), completed turns are already durable, KV snapshots are written, and the process exits 0."""
    import contextlib
    import signal
    import threading

    import uvicorn

    state = app.state.gs

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # NOTE: uvicorn's own version raises the signal again after a graceful shutdown (the process then
            # dies of SIGTERM); a drained, completed shutdown is a success and exits 0.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if not state.draining:
                state.draining = True
                timer = threading.Timer(args.shutdown_grace, engine.cancel_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=args.shutdown_grace + 5)
    Server(config).run()


def cmd_chat(args: argparse.Namespace) -> int:
    import signal

    from .repl import Repl

    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine, manager = _open_manager(args)
    sampling = _sampling(args)
    try:
        session = manager.get(args.session) if args.session else manager.create(system=args.system,
                                                                                 sampling=sampling)
        return Repl(manager, session, system=args.system, sampling=sampling).run()
    finally:
        manager.close()
        engine.close()


def cmd_sessions(args: argparse.Namespace) -> int:
    from .sessions.store import Store

    if args.action in ("ls", "show", "rm"):
        store = Store(args.store, readonly=args.action != "rm")
        try:
            return _sessions_offline(store, args)
        finally:
            store.close(snapshot_all=False)
    engine, manager = _open_manager(args)
    try:
        if args.action == "export":
            n = manager.export(args.id, args.path, quantize=args.quantize, compress=args.compress)
            print(f"wrote {args.path} ({n} bytes)")
        else:
            path = args.path or args.id  # `sessions import FILE`
            s = manager.import_file(path, history_only=args.history_only, new_id=args.new_id)
            print(s.id)
        return 0
    finally:
        manager.close()
        engine.close()


def _sessions_offline(store, args: argparse.Namespace) -> int:
    import datetime

    from .errors import SessionNotFoundError

    if args.action == "ls":
        for row in store.summaries():
            when = datetime.datetime.fromtimestamp(row["updated_at"]).strftime("%Y-%m-%d %H:%M")
            print(f"{row['id']}  {when}  {row['messages'] // 2:4d} turns  {row['tokens']:7d} tokens")
        return 0
    messages = store.messages(args.id)
    if messages is None:
        raise SessionNotFoundError(f"no session {args.id!r} in {store.path}")
    if args.action == "show":
        for m in messages:
            print(f"[{m.role}] {m.text}")
        return 0
    store.delete_session(args.id)
    print(f"removed {args.id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-sessions", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gemma-sessions {__version__}")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt and stream the text")
    g.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    _add_model_args(sv)
    sv.add_argument("--store", default=None, help="store directory (default: the user data dir), or "
                    "redis://host:port/db: a Redis shared by replicas behind a balancer (see deploy/)")
    sv.add_argument("--no-store", action="store_true", help="keep sessions in memory only")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", action="append", help="accepted API key (repeatable); also "
                    "$GEMMA_SESSIONS_API_KEYS (comma-separated) and --api-key-file")
    sv.add_argument("--api-key-file", default=None, help="file with one API key per line")
    sv.add_argument("--kv-cache-bytes", type=int, default=None)
    sv.add_argument("--max-batch", type=int, default=64)
    sv.add_argument("--prefill-tokens-while-decoding", type=int, default=256,
                    help="prompt tokens one engine step computes at most while any request is decoding: lower keeps "
                    "streams smoother and short turns' first tokens sooner under load, higher gives long prompts more")
    sv.add_argument("--score-chunk", type=int, default=None,
                    help="prompt tokens scored at a time (echo + logprobs; default 16): higher scores faster and holds "
                    "other requests back longer while scoring takes its turn; 128 or more for a server that mostly "
                    "scores")
    sv.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 503")
    sv.add_argument("--max-output-tokens", type=int, default=4096,
                    help="cap on every request's max_tokens / max_output_tokens")
    sv.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    sv.add_argument("--max-import-bytes", type=int, default=256 << 20,
                    help="largest session file POST /v1/sessions/import takes (and decompresses to)")
    sv.add_argument("--max-input-chars", type=int, default=None,
                    help="characters of text one request may send (default: 8 x the model's context)")
    sv.add_argument("--lazy-kv", action="store_true",
                    help="let the KV budget become resident as it is used (default: all of it at start)")
    sv.add_argument("--shutdown-grace", type=float, default=5.0,
                    help="seconds running turns may finish on SIGTERM before they are cancelled")
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--replica-name", default=None,
                    help="this replica's name, sent as X-Replica on every response (default: host:port)")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="an interactive chat that keeps its sessions in the store")
    _add_model_args(ch)
    _add_sampling_args(ch)
    ch.add_argument("--store", default=None)
    ch.add_argument("--session", default=None, help="continue this session id")
    ch.add_argument("--system", default=None, help="system prompt for new sessions")
    ch.add_argument("--reasoning", action="store_true",
                    help="thinking on (Gemma 4: thoughts are shown apart and kept out of the history)")
    ch.set_defaults(func=cmd_chat)

    se = sub.add_parser("sessions", help="list, show, remove, export or import stored sessions")
    se.add_argument("action", choices=["ls", "show", "rm", "export", "import"])
    se.add_argument("id", nargs="?", help="session id (show, rm, export)")
    se.add_argument("path", nargs="?", help="file (export, import)")
    se.add_argument("--store", default=None)
    se.add_argument("--quantize", action="store_true", help="export: int8 KV with per-row scales")
    se.add_argument("--compress", action="store_true", help="export: zstd-compress the file")
    se.add_argument("--history-only", action="store_true", help="import: keep the history, drop the KV")
    se.add_argument("--new-id", action="store_true", help="import: give the session a new id")
    _add_model_args(se)
    se.set_defaults(func=cmd_sessions)

    m = sub.add_parser("model", help="fetch (assemble) or describe a model")
    m.add_argument("action", choices=["fetch", "info"])
    m.add_argument("name", nargs="?", default="gemma3-270m")
    m.add_argument("--dtype", default=None)
    m.add_argument("--device", default=None)
    m.set_defaults(func=cmd_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GemmaSessionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
