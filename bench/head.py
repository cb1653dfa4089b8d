"""The engine's greedy LM head on the real model: ``kernels.q8_head`` (int8 activations, VNNI products, an error
bound, then exact logits for the few entries it cannot rule out) against the products the engine used before.

Usage::

    python bench/head.py            # medians of 7 rounds; alternatives interleaved within each round
    python bench/head.py --quick    # 3 rounds

Rows are real final hidden states of the fast model (Gemma 3 270M) over English prose, so the candidates counted
are the ones decoding meets. Per row count M, each round times back to back: ``q8_head`` (greedy tokens only);
``qmatmul`` + ``argmax`` (the exact kernel, what a decode step of up to 8 rows ran); ``qmatmul_bf16`` + ``argmax``
(9-16 rows before); the bf16 GEMM on a bf16 copy of the head + ``argmax`` (more rows before). Every token of
``q8_head`` is checked against the exact kernel's argmax of the same row (a mismatch aborts the run). The weights
stream from memory on every call, as in decoding (168 MB of codes). Results: a markdown table on stdout and
``bench/out/head.json``.
"""

from __future__ import annotations

import time

import common as C  # bench/common.py: shared command line and output

NAME = "head"
ROWS = (1, 2, 4, 5, 6, 8, 12, 16, 32, 64)
TEXT_TOKENS = 512


def hidden_states(model, n: int):
    """Final (normed) hidden states of the fast model over n tokens of the corpus: [n, hidden] float32."""
    import torch

    ids = list(C.corpus_ids()[:n])
    net = model.net
    with torch.inference_mode():
        kv = net.new_sequence(n)
        return net.hidden(torch.tensor(ids), torch.arange(n), kv).float()


def parent(args) -> None:
    import torch

    import gemma_sessions as gs
    from gemma_sessions import kernels

    C.setup_torch()
    if not kernels.q8_head_available():
        raise SystemExit("q8_head needs the compiled kernel with AVX512-VNNI")
    rounds = 3 if args.quick else 7
    model = gs.load_model(C.model_path(), progress=False)
    C.use_tokenizer(model.tokenizer)
    head = model.net.embed
    packed = head.prepare_greedy()
    h = hidden_states(model, TEXT_TOKENS)
    m = C.meta(args.quick, rounds=rounds, kernel_key=kernels.build_key(), text_tokens=TEXT_TOKENS)
    C.print_header(m)
    fns = {
        "q8_head": lambda x: kernels.q8_head(x, packed, head.codes, head.scales, False)[0],
        "qmatmul": lambda x: kernels.argmax(kernels.qmatmul(x, head.codes, head.scales, None, head.group)),
        "qmatmul_bf16": lambda x: kernels.argmax(kernels.qmatmul_bf16(x, head.codes, head.scales, None, head.group)),
        "bf16 GEMM": lambda x: kernels.argmax(head.bf16_gemm(x).float()),
    }
    results, table = [], []
    with torch.inference_mode():
        for rows in ROWS:
            # rows spread over the text (neighbouring positions are not alike)
            xs = [h[torch.arange(rows) * (TEXT_TOKENS // rows) + r].contiguous() for r in range(3)]
            exact = [torch.stack([kernels.argmax(kernels.qmatmul(x[i:i + 1], head.codes, head.scales, None, 32))[0]
                                  for i in range(rows)]) for x in xs]
            tokens, cands, _ = kernels.q8_head(xs[0], packed, head.codes, head.scales, False)
            for x, want in zip(xs, exact):
                got = fns["q8_head"](x)
                if not torch.equal(got, want):
                    raise SystemExit(f"q8_head disagrees with the exact head at {rows} rows: {got} vs {want}")
            times: dict[str, list[float]] = {name: [] for name in fns}
            for i in range(rounds):
                x = xs[i % len(xs)]
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - t) * 1e3)
            med = {name: C.median(v) for name, v in times.items()}
            before = med["qmatmul"] if rows <= 8 else med["qmatmul_bf16"] if rows <= 16 else med["bf16 GEMM"]
            results.append({"rows": rows, "ms": med, "candidates_per_row": cands.float().mean().item(),
                            "max_candidates": int(cands.max()), "before_ms": before})
            table.append([rows, f"{med['q8_head']:.2f}", f"{med['qmatmul']:.2f}", f"{med['qmatmul_bf16']:.2f}",
                          f"{med['bf16 GEMM']:.2f}", f"{before / med['q8_head']:.2f}x",
                          f"{cands.float().mean().item():.1f} / {int(cands.max())}"])
            print(f"  M={rows}: " + "  ".join(f"{a} {b:.2f} ms" for a, b in med.items()), flush=True)
    print()
    print(C.md_table(["rows", "q8_head ms", "qmatmul + argmax ms", "qmatmul_bf16 + argmax ms",
                      "bf16 GEMM + argmax ms", "engine before / q8_head", "exact logits per row (mean / max)"],
                     table))
    print("\n(engine before: qmatmul up to 8 rows, qmatmul_bf16 up to 16, the bf16 GEMM beyond; every q8_head token "
          "equal to the exact kernel's argmax)")
    path = C.write_json(NAME, {"meta": m, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    C.parse_and_dispatch(__doc__, child=None, parent=parent, quick_help="3 rounds instead of 7")
