"""Micro-benchmark of the fast mode's matrix products on Gemma 3 270M's shapes: the grouped int8 kernels
(``kernels.qmatmul``: int8 codes + float32 group scales, float32 activations; ``kernels.qmatmul_bf16``: the same
codes at the bf16 rate; ``kernels.qmatmul_i16``: int16 activations against the codes as integers, on their own
layout, what the layers run at 9-64 rows) against bf16 and float32
``F.linear`` and torch's weight-only int8 kernel (``aten._weight_int8pack_mm``: per-row scales, bf16 activations).

Usage::

    python bench/kernels.py            # medians of 7 rounds; alternatives interleaved within each round
    python bench/kernels.py --quick    # 3 rounds

Each round times every alternative on the same shape and row count back to back (the machine is shared: compare
within a row, and read the ratio columns). Every call reads a weight that is not in cache (each alternative cycles
through copies of its weight, ``COLD_BYTES`` of codes), as decoding does: a hot-cache loop over one small weight
flatters layouts that decoding does not reward. Weights are random codes in the layouts of the real file (Q5_0-like
group-32 codes for the inputs of width 640, Q4_K-like codes with offsets for attn_output and ffn_down, Q8_0 for the
LM head). Results: a markdown table on stdout and ``bench/out/kernels.json``.
"""

from __future__ import annotations

import time

import common as C  # bench/common.py: shared command line and output

NAME = "kernels"
# (label, N, K, offsets): the 270M's projections (fused q+k+v and gate+up as the model runs them) and its LM head
SHAPES = [("q+k+v 640->1536", 1536, 640, False), ("k or v 640->256", 256, 640, False),
          ("attn_output 1024->640", 640, 1024, True), ("gate+up 640->4096", 4096, 640, False),
          ("ffn_down 2048->640", 640, 2048, True), ("LM head 640->262144", 262144, 640, False)]
ROWS = (1, 4, 8, 16, 32, 64)
COLD_BYTES = 96 << 20  # int8 codes cycled through per shape: 3x the L3, as in decoding


def timed(fn, reps: int, copies: int) -> float:
    """Median milliseconds of ``reps`` calls (after one warm-up call); call i reads weight copy i % copies."""
    fn(0)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i % copies)
        ts.append(time.perf_counter() - t)
    return C.median(ts) * 1e3


def bench_shape(n: int, k: int, offsets: bool, rounds: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from gemma_sessions import kernels
    from gemma_sessions.models import quant

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-16, 16, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // 32, generator=g) * 0.01
    off = torch.randn(n, k // 32, generator=g) * 0.01 if offsets else None
    w32 = quant.QuantWeight(codes=codes, scales=scales, offsets=off, group=32).dequantize()
    per_row = quant.quantize_symmetric(w32, group=k)  # int8pack: one scale per output row
    # Decoding reads every weight from memory once per token (~300 MB per token on the 270M, far beyond the
    # caches); so each alternative cycles through enough copies of its weight to hold COLD_BYTES of int8 codes.
    copies = max(1, COLD_BYTES // codes.numel())
    cq = [(codes.clone(), scales.clone(), None if off is None else off.clone()) for _ in range(copies)]
    cbf = [w32.to(torch.bfloat16) for _ in range(copies)]
    c32 = [w32.clone() for _ in range(copies)]
    c8 = [(per_row.codes.clone(), per_row.scales[:, 0].to(torch.bfloat16)) for _ in range(copies)]
    ci = [kernels.i16_pack(*c, 32) for c in cq] if kernels.i16_available() else []
    reps = 5 if n > 100_000 else 40
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, generator=g)
        fns = {"qmatmul": lambda i: kernels.qmatmul(x, *cq[i], 32),
               "qmatmul_bf16": lambda i: kernels.qmatmul_bf16(x, *cq[i], 32),
               "qmatmul_i16": lambda i: kernels.qmatmul_i16(x, ci[i], 32),
               "bf16": lambda i: F.linear(x.to(torch.bfloat16), cbf[i]).float(),
               "float32": lambda i: F.linear(x, c32[i]),
               "int8pack": lambda i: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), *c8[i]).float()}
        times: dict[str, list[float]] = {name: [] for name in fns}
        if not kernels.bf16_dot_available():
            del fns["qmatmul_bf16"]
        if not ci:
            del fns["qmatmul_i16"]
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(timed(fn, reps, copies))
        med = {name: C.median(v) for name, v in times.items()}
        rows.append({"n": n, "k": k, "m": m, "offsets": offsets, "ms": med, "copies": copies,
                     "weight_mb": {"qmatmul": (codes.numel() + scales.numel() * 4 * (2 if offsets else 1)) / 1e6,
                                   "bf16": w32.numel() * 2 / 1e6, "float32": w32.numel() * 4 / 1e6,
                                   "int8pack": codes.numel() / 1e6}})
    return rows


def parent(args) -> None:
    import torch

    from gemma_sessions import kernels

    C.setup_torch()
    if not kernels.available():
        raise SystemExit(f"the qmatmul kernel is not available here: {kernels._state.get('error')}")
    rounds = 3 if args.quick else 7
    m = C.meta(args.quick, rounds=rounds, kernel_key=kernels.build_key())
    C.print_header(m)
    results, table = [], []
    with torch.inference_mode():
        for label, n, k, off in SHAPES:
            for r in bench_shape(n, k, off, rounds):
                r["shape"] = label
                results.append(r)
                t = r["ms"]
                dot, i16 = t.get("qmatmul_bf16"), t.get("qmatmul_i16")
                table.append([label, r["m"], f"{t['qmatmul']:.3f}", "-" if dot is None else f"{dot:.3f}",
                              "-" if i16 is None else f"{i16:.3f}", f"{t['bf16']:.3f}", f"{t['float32']:.3f}",
                              f"{t['int8pack']:.3f}", f"{t['bf16'] / t['qmatmul']:.2f}x",
                              "-" if dot is None else f"{t['bf16'] / dot:.2f}x",
                              "-" if i16 is None else f"{t['bf16'] / i16:.2f}x",
                              f"{t['int8pack'] / t['qmatmul']:.2f}x",
                              f"{r['weight_mb']['qmatmul'] / t['qmatmul']:.1f}"])
                print(f"  {label} M={r['m']}: " + "  ".join(f"{a} {b:.3f} ms" for a, b in t.items()), flush=True)
    print()
    print(C.md_table(["shape (N x K)", "rows M", "qmatmul ms", "qmatmul_bf16 ms", "qmatmul_i16 ms", "bf16 ms",
                      "float32 ms", "int8pack ms", "bf16 / qmatmul", "bf16 / qmatmul_bf16", "bf16 / qmatmul_i16",
                      "int8pack / qmatmul", "qmatmul GB/s"],
                     table))
    path = C.write_json(NAME, {"meta": m, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    C.parse_and_dispatch(__doc__, child=None, parent=parent, quick_help="3 rounds instead of 7")
