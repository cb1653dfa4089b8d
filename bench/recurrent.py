"""RecurrentGemma vs Gemma 3 over one long conversation: time and cache memory per turn (issue 6).

Usage::

    python bench/recurrent.py              # 64 turns: RecurrentGemma 2B vs Gemma 3 4B, published config sizes
    python bench/recurrent.py --quick      # 8 turns, smoke run
    python bench/recurrent.py --models recurrentgemma-2b,gemma3-1b

Each model has random bfloat16 weights of its published config (timing and memory do not depend on the values)
and runs in its own process, through the real stack: ``gs.Engine`` + ``gs.SessionManager``, one session with a
system prompt, ``--turns`` turns of ~``--user-tokens`` user tokens (English prose, the Gemma 3 tokenizer of the
default GGUF, ids checked to be inside both vocabularies), ``--gen`` greedy tokens per turn (ignore_eos).
Per turn: wall time of ``send`` (prefill of the new tokens + decode), the tokens computed, and the cache bytes the
session holds (``engine.kv_bytes``: Gemma's KV pages, RecurrentGemma's state slot) plus the process RSS.

Reading: with KV reuse both models compute only the new tokens of a turn. Gemma 3's global layers keep every
token's K/V (its sliding layers keep 1,024), so its per-session memory grows with the conversation and its
global attention reads more each turn; RecurrentGemma's state is fixed (recurrent layers: conv + RG-LRU state,
attention layers: a 2,047-token ring), so memory is flat from the first turn.

Results: markdown tables on stdout and ``bench/out/recurrent.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NAME = "recurrent"

# Published configs (config.json of google/recurrentgemma-2b, google/gemma-3-4b-it's text_config,
# google/gemma-3-1b-it).
CONFIGS = {
    "recurrentgemma-2b": dict(
        model_type="recurrent_gemma", vocab_size=256000, hidden_size=2560, intermediate_size=15360,
        num_hidden_layers=26, num_attention_heads=10, num_key_value_heads=1, lru_width=2560,
        attention_window_size=2048, conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
        rope_theta=10000.0, partial_rotary_factor=0.5, block_types=["recurrent", "recurrent", "attention"]),
    "gemma3-4b": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        sliding_window=1024, rope_theta=1e6, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131072,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        sliding_window=512, rope_theta=1e6, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
        pad_token_id=0),
}


def build(name: str):
    """A Model with random bf16 weights of the named config and the default GGUF's tokenizer."""
    import torch

    from gemma_sessions.loading import Model

    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(0)

    def rand(shape, std):
        t = torch.empty(shape, dtype=torch.bfloat16)
        return t.normal_(0.0, std, generator=g) if len(shape) > 1 else t.uniform_(-0.2, 0.2, generator=g)

    if cfg["model_type"] == "recurrent_gemma":
        from gemma_sessions.models.griffin import GriffinConfig, GriffinModel

        config = GriffinConfig.from_hf_config(cfg)
        tensors = {}
        for k, shape in config.tensor_shapes().items():
            tensors[k] = rand(shape, 0.02)
            if k.endswith("recurrent_param"):
                tensors[k] = torch.full(shape, 4.0, dtype=torch.bfloat16)
        net = GriffinModel(config, tensors, torch.bfloat16).eval()
    else:
        from gemma_sessions.config import ModelConfig
        from gemma_sessions.models.gemma import GemmaModel
        from gemma_sessions.models.weights import expected_shapes

        config = ModelConfig.from_hf_config(cfg)
        tensors = {k: rand(shape, 0.02) for k, shape in expected_shapes(config).items()}
        net = GemmaModel(config, tensors, "bfloat16", torch.device("cpu")).eval()
    del tensors
    params = sum(p.numel() for p in net.state_dict().values())
    if cfg["model_type"] == "recurrent_gemma":
        params += net.embed.numel()  # a plain tensor attribute there (tied embedding / LM head)
    model = Model(net, C.tokenizer(), Path(name), 0.0, fingerprint=f"bench:{name}")
    return model, params


def user_messages(n: int, tokens: int, vocab: int) -> list[str]:
    tok = C.tokenizer()
    words = C.corpus().split()
    out, i = [], 0
    while len(out) < n:
        text = " ".join(words[i:i + tokens * 3 // 4])
        i += tokens * 3 // 4
        ids = tok.encode(text)
        if ids and max(ids) < vocab:
            out.append(text)
    return out


def child(workload: dict) -> dict:
    C.setup_torch()
    import gemma_sessions as gs

    t0 = time.perf_counter()
    model, params = build(workload["model"])
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    msgs = user_messages(workload["turns"] + 1, workload["user_tokens"], min(vocab, 256000))
    p = gs.SamplingParams(temperature=0.0, max_tokens=workload["gen"], ignore_eos=True)
    turns = []
    with gs.Engine(model, kv_cache_bytes=2 << 30, max_batch=4) as engine:
        m = gs.SessionManager(engine)
        warm = m.create(system="You are a helpful assistant.", sampling=p)
        warm.send(msgs[-1])  # warm-up (allocator, first-call costs); its own session
        m.delete(warm.id)
        s = m.create(system="You are a helpful assistant. Answer briefly.", sampling=p)
        for i in range(workload["turns"]):
            t = time.perf_counter()
            r = s.send(msgs[i])
            wall = time.perf_counter() - t
            turns.append({"turn": i + 1, "s": wall, "prompt_tokens": r.stats.prompt_tokens,
                          "cached_tokens": r.stats.cached_tokens, "prefilled_tokens": r.stats.prefilled_tokens,
                          "generated_tokens": r.stats.generated_tokens, "ttft_s": r.stats.ttft_s,
                          "cache_bytes": engine.kv_bytes(s.kv), "rss_mb": C.current_rss_mb()})
            print(f"  {workload['model']} turn {i + 1}: {wall:.2f} s, {turns[-1]['cache_bytes'] / 2**20:.1f} MiB",
                  file=sys.stderr, flush=True)
    return {"engine": workload["model"], "params": params, "build_s": build_s, "turns": turns,
            "peak_rss_mb": C.peak_rss_mb()}


def window_median(turns: list[dict], lo: int, hi: int, key: str) -> float:
    return C.median([t[key] for t in turns if lo <= t["turn"] <= hi])


def report(results: list[dict], args) -> dict:
    n = args.turns
    marks = sorted({1, *(k for k in (8, 16, 32, 48, 64) if k <= n), n})
    ok = [r for r in results if "error" not in r]
    headers = ["turn"]
    for r in ok:
        headers += [f"{r['engine']} s", f"{r['engine']} cache MiB"]
    rows = []
    for k in marks:
        row = [k]
        for r in ok:
            t = r["turns"][k - 1]
            row += [f"{t['s']:.2f}", f"{t['cache_bytes'] / 2**20:.1f}"]
        rows.append(row)
    print(C.md_table(headers, rows))
    print()
    summary = []
    q = max(1, n // 8)
    for r in ok:
        first = window_median(r["turns"], 1, q, "s")
        last = window_median(r["turns"], n - q + 1, n, "s")
        summary.append([r["engine"], f"{r['params'] / 1e9:.2f}", f"{first:.2f}", f"{last:.2f}",
                        f"{last / first:.2f}x", f"{r['turns'][0]['cache_bytes'] / 2**20:.1f}",
                        f"{r['turns'][-1]['cache_bytes'] / 2**20:.1f}",
                        f"{r['turns'][-1]['cache_bytes'] / max(r['turns'][0]['cache_bytes'], 1):.2f}x",
                        f"{r['turns'][-1]['prompt_tokens']}", f"{r['peak_rss_mb']:.0f}"])
    print(C.md_table(["model", "params (B)", f"median s, turns 1-{q}", f"median s, turns {n - q + 1}-{n}",
                      "last / first", "cache MiB after turn 1", f"cache MiB after turn {n}",
                      "cache growth", "context tokens at the end", "peak RSS MB"], summary))
    for r in results:
        if "error" in r:
            print(f"\n{r['engine']}: {r['error']}")
    return {"results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="recurrentgemma-2b,gemma3-4b")
    ap.add_argument("--turns", type=int, default=64)
    ap.add_argument("--gen", type=int, default=4)
    ap.add_argument("--user-tokens", type=int, default=24)
    ap.add_argument("--child")
    ap.add_argument("--workload")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.child:
        result = child(json.loads(Path(args.workload).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return
    if args.quick:
        args.turns = 8
    m = C.meta(args.quick, turns=args.turns, gen=args.gen, user_tokens=args.user_tokens)
    C.print_header(m)
    print(f"one session, {args.turns} turns of ~{args.user_tokens} user tokens + {args.gen} greedy tokens "
          "(ignore_eos); random bf16 weights of the published configs; each model in its own process\n")
    results = []
    for name in args.models.split(","):
        results.append(C.run_child(__file__, name, {"model": name, "turns": args.turns, "gen": args.gen,
                                                    "user_tokens": args.user_tokens}))
    data = report(results, args)
    print(f"\nwrote {C.write_json(NAME, {**m, **data})}")


if __name__ == "__main__":
    main()
