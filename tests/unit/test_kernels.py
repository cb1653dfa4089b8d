"""The grouped int8 kernel (kernels.qmatmul) against float32 products of the dequantized weight; threads; the
torch fallback; the int8 Linear's paths."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from gemma_sessions import kernels
from gemma_sessions.kernels import backend
from gemma_sessions.kernels import build as kbuild
from gemma_sessions.models import gemma, quant


def weight(n: int, k: int, group: int, offsets: bool, seed: int = 0) -> quant.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01
    off = torch.randn(n, k // group, generator=g) * 0.05 if offsets else None
    return quant.QuantWeight(codes=codes, scales=scales, offsets=off, group=group)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()




@pytest.fixture
def wide(op):
    """qmatmul_wide's tests: the AVX2-only build's kernel."""
    if not kernels.wide_available():
        pytest.skip("qmatmul_wide is the AVX2-only build's (this CPU has AVX-512 or no AVX2)")
    return op


@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("offsets", [False, True])
def test_qmatmul_matches_float32(op, m, group, offsets):
    w = weight(37, 640, group, offsets)  # odd N
    x = torch.randn(m, 640)
    out = kernels.qmatmul(x, w.codes, w.scales, w.offsets, group)
    ref = x @ w.dequantize().T
    assert out.shape == (m, 37) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


def test_qmatmul_large_n_and_group_not_multiple_of_16(op):
    w = weight(5003, 96, 32, True)
    x = torch.randn(2, 96)
    assert rel_err(kernels.qmatmul(x, w.codes, w.scales, w.offsets, 32), x @ w.dequantize().T) <= 1e-5
    w8 = weight(11, 64, 8, False)  # G = 8: the portable loop
    assert rel_err(kernels.qmatmul(x[:, :64], w8.codes, w8.scales, None, 8), x[:, :64] @ w8.dequantize().T) <= 1e-5


def test_qmatmul_rejects_bad_shapes(op):
    w = weight(4, 64, 32, False)
    with pytest.raises(RuntimeError, match="group size"):
        op(torch.randn(1, 64), w.codes, w.scales, None, 24)
    with pytest.raises(RuntimeError, match="K="):
        op(torch.randn(1, 32), w.codes, w.scales, None, 32)


def test_qmatmul_threads_agree(op):
    w = weight(4099, 640, 32, True)
    xs = [torch.randn(1 + i % 4, 640, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    want = [kernels.qmatmul(x, w.codes, w.scales, w.offsets, 32) for x in xs]
    got: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(5):
            got[i] = kernels.qmatmul(xs[i], w.codes, w.scales, w.offsets, 32)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], want[i]) for i in range(8))


def test_build_key_depends_on_variant_flags_and_compiler_not_on_the_cpu(monkeypatch):
    """A variant's library depends on its sources, flags, compiler and torch only: a clean clone (or another CPU that
    executes the variant) reuses it."""
    key = kbuild.key("avx2")
    assert kbuild.key("avx512") != key
    monkeypatch.setattr(kbuild, "cpu_features", lambda: frozenset({"sse2"}))
    assert kbuild.key("avx2") == key
    monkeypatch.setattr(kbuild, "CFLAGS", ("-O2",))
    assert kbuild.key("avx2") != key and len(kbuild.key("avx2")) == 16
    monkeypatch.setattr(kbuild, "_compiler_id", lambda cxx: "clang 99")
    assert kbuild.key("avx2", "c++") != kbuild.key("avx512", "c++")


def test_fallback_without_kernel(monkeypatch):
    """No compiler: qmatmul is the torch reference, and an int8 Linear still works (via its bf16 copy)."""
    monkeypatch.setattr(kernels, "_state", {"error": "no compiler"})
    assert not kernels.available()
    w = weight(33, 64, 32, True)
    x = torch.randn(3, 64)
    assert rel_err(kernels.qmatmul(x, w.codes, w.scales, w.offsets, 32), x @ w.dequantize().T) <= 1e-6
    lin = gemma.Linear(w, "int8")
    assert rel_err(lin(x), x @ w.dequantize().T) <= 1e-2  # bf16 products
    assert lin.bf16 is not None


def test_load_failure_falls_back_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("GEMMA_SESSIONS_NO_KERNELS", "1")
    assert kernels.kernel() is None and kernels.kernel() is None
    assert sum("unavailable" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("native", [True, False])
def test_int8_linear_paths(op, monkeypatch, native):
    """Each row count's path. The exact kernel up to exact_max_rows() rows (8 where a many-row kernel runs, 64 on a
    CPU with none); above, qmatmul_wide on AVX2 (any number of rows), or qmatmul_bf16 where it runs, then the bf16
    GEMM on a bf16 copy with native bf16, or float32 over dequantized tiles (no copy) without it (software bf16 is
    ~5x slower than float32)."""
    monkeypatch.setitem(kernels._state, "native_bf16", native)
    many_kernels = kernels.i16_available() or kernels.bf16_dot_available() or kernels.wide_available()
    exact = backend.exact_max_rows()
    assert exact == (backend.QMATMUL_MAX_ROWS if many_kernels else backend.EXACT_WIDE_MAX_ROWS)
    w = weight(40, 64, 16, True)
    ref = lambda x: x @ w.dequantize().T  # noqa: E731
    lin = gemma.Linear(w, "int8")
    small, big = torch.randn(exact, 64), torch.randn(backend.QMATMUL_MAX_ROWS + 5, 64)
    many = torch.randn(max(backend.BF16_DOT_MAX_ELEMENTS // 64, exact) + 1, 64)
    assert rel_err(lin(small), ref(small)) <= 1e-5 and lin.bf16 is None  # the kernel, no copy made
    if kernels.bf16_dot_available():  # bf16 inputs and weights, float32 sums: no copy made either
        bf16_ref = big.bfloat16().float() @ w.dequantize().bfloat16().float().T
        assert rel_err(lin(big), bf16_ref) <= 1e-6 and lin.bf16 is None
    if kernels.wide_available():  # float32 throughout: as exact as the kernel, its own bits
        assert lin.wide_rows(big.shape[0]) and lin.wide_rows(many.shape[0]) and not lin.wide_rows(exact)
        for x in (big, many):
            assert torch.equal(lin(x), kernels.qmatmul_wide(x, w.codes, w.scales, w.offsets, w.group))
            assert rel_err(lin(x), ref(x)) <= 1e-5 and lin.bf16 is None
    assert rel_err(lin(big), ref(big)) <= 1e-2
    if native and not kernels.wide_available():
        assert rel_err(lin(many), ref(many)) <= 1e-2 and lin.bf16 is not None  # bf16 GEMM
    else:
        assert rel_err(lin(many), ref(many)) <= 1e-5 and lin.bf16 is None  # float32 tiles
    head = gemma.Linear(w, "int8", head=True)
    bigger = torch.randn(max(backend.HEAD_QMATMUL_MAX_ROWS, exact) + 1, 64)
    assert rel_err(head(big), ref(big)) <= 1e-5 and head.bf16 is None  # the kernel (qmatmul_wide on AVX2)
    assert rel_err(head(bigger), ref(bigger)) <= 1e-5 and head.bf16 is None  # float32 tiles (qmatmul_wide on AVX2)
    # the engine's batched decode of the head: the kernel, then bf16 products, then the bf16 GEMM (float32 tiles)
    assert torch.equal(head.forward_batch(small), head(small))
    no_copy = kernels.bf16_dot_available() or kernels.wide_available() or big.shape[0] <= exact or not native
    assert rel_err(head.forward_batch(big), ref(big)) <= 1e-2 and (head.bf16 is None) == no_copy
    assert rel_err(head.forward_batch(many), ref(many)) <= (1e-2 if native else 1e-5)
    assert (head.bf16 is not None) == (native and not kernels.wide_available())


@pytest.mark.parametrize("m", [9, 16, 21])
@pytest.mark.parametrize("group,offsets", [(32, False), (16, True)])
def test_qmatmul_bf16_is_the_bf16_product(op, m, group, offsets):
    if not kernels.bf16_dot_available():
        pytest.skip("no AVX512-BF16 on this CPU")
    w = weight(301, 2048, group, offsets)  # K = 2048: several row blocks of 6
    x = torch.randn(m, 2048)
    want = x.bfloat16().float() @ w.dequantize().bfloat16().float().T  # what a bf16 GEMM multiplies, in float32
    out = kernels.qmatmul_bf16(x, w.codes, w.scales, w.offsets, group)
    # float32 sums: 2e-7 here without offsets; with offsets (large partial sums that cancel) this CPU's vdpbf16ps
    # accumulation drifts to ~1e-4, still ~30x finer than the bf16 GEMM it replaces, which rounds its output
    gemm = torch.nn.functional.linear(x.bfloat16(), w.dequantize().bfloat16()).float()
    assert out.dtype == torch.float32 and rel_err(out, want) <= (3e-4 if offsets else 1e-6)
    assert rel_err(out, want) * 10 < rel_err(gemm, want)
    alone = kernels.qmatmul_bf16(x[3:4], w.codes, w.scales, w.offsets, group)
    assert torch.equal(alone[0], out[3])  # a row's result does not depend on the others
    assert torch.equal(gemma.Linear(w.dequantize(), "float32").weight, w.dequantize())


@pytest.mark.parametrize("group,offsets", [(32, False), (32, True), (16, True), (8, False)])
def test_qmatmul_wide_rows_are_float32_chains_independent_of_the_batch(wide, group, offsets):
    """qmatmul_wide (AVX2 without AVX-512): each output one float32 FMA chain over k against W dequantized in
    float32 (one rounding of codes * scale + offset), so a row's bits are the same in any batch (alone, at any
    place, with 9 or 61 others, across the kernel's chunks of x and tiles of W); float32 accuracy."""
    w = weight(301, 640, group, offsets)  # N = 301: tiles of 48 and blocks of 6 with tails
    x = torch.randn(70, 640)  # the GEMM loop (panels of 6 rows, a tail); slices of up to 16 rows the small loop
    out = kernels.qmatmul_wide(x, w.codes, w.scales, w.offsets, group)
    want = (x.double() @ w.dequantize().double().T).float()
    exact = kernels.qmatmul(x, w.codes, w.scales, w.offsets, group)
    assert out.dtype == torch.float32 and out.shape == (70, 301)
    # one chain of 640 terms rounds more than the exact kernel's 8 lanes of group sums (measured 8.7e-7 / 1.3e-7)
    assert rel_err(out, want) <= 2e-6 and rel_err(exact, want) <= 1e-6
    for rows in (slice(3, 4), slice(0, 9), slice(5, 21), slice(5, 66), slice(64, 70)):
        assert torch.equal(kernels.qmatmul_wide(x[rows], w.codes, w.scales, w.offsets, group), out[rows])
    # the chain itself, for one output: fma in the order of k (float64 then rounded == one float32 fma)
    wd = w.codes[7].double() * w.scales[7].double().repeat_interleave(group)
    if offsets:  # W as one fma: codes * scale + offset rounded once
        wd = wd + w.offsets[7].double().repeat_interleave(group)
    wd, acc = wd.float(), torch.tensor(0.0, dtype=torch.float32)
    for k in range(640):
        acc = (x[11, k].double() * wd[k].double() + acc.double()).float()
    assert out[11, 7] == acc
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels.qmatmul_wide(x[:, :12], w.codes[:, :12], w.scales[:, :3], None, 4)


@pytest.mark.parametrize("group,offsets", [(32, False), (16, True)])
def test_qmatmul_wide_prompt_rows_keep_the_chain_across_blocks_of_k(wide, group, offsets):
    """Beyond 16 rows qmatmul_wide packs x in panels of 6 rows and W in panels of 16 (a GEMM's loop); at K = 2048 it
    runs k in blocks of 512, storing and reloading the float32 sums. Every output is still the one chain in the order
    of k: the same bits as the small-batch loop (rows alone, 10 or 16 at a time) and as other batches, in edge tiles
    (200 rows, N = 301) too."""
    w = weight(301, 2048, group, offsets)
    x = torch.randn(200, 2048)
    out = kernels.qmatmul_wide(x, w.codes, w.scales, w.offsets, group)
    want = (x.double() @ w.dequantize().double().T).float()
    assert out.shape == (200, 301) and rel_err(out, want) <= 4e-6
    for rows in (slice(0, 1), slice(150, 166), slice(190, 200), slice(160, 200), slice(7, 100)):
        assert torch.equal(kernels.qmatmul_wide(x[rows], w.codes, w.scales, w.offsets, group), out[rows])
    wd = w.codes.double() * w.scales.double().repeat_interleave(group, dim=1)
    if offsets:
        wd = wd + w.offsets.double().repeat_interleave(group, dim=1)
    wd = wd.float()
    for m, n in ((11, 7), (199, 300)):  # a full tile; the last row and column (an edge tile)
        acc = torch.tensor(0.0, dtype=torch.float32)
        for k in range(2048):
            acc = (x[m, k].double() * wd[n, k].double() + acc.double()).float()
        assert out[m, n] == acc


@pytest.mark.parametrize("group,offsets", [(32, True), (16, False), (8, True)])
def test_dequantize_rows_are_torch_bits(op, group, offsets):
    """The compiled dequantize (the float32 tiles of prefill products) gives quant.dequantize_rows' bits: codes *
    scale rounded, then + offset rounded (random scales: the products are not exact, so a fused multiply-add would
    differ); any row range; bad ranges refused."""
    w = weight(301, 640, group, offsets)
    full = quant.dequantize_rows(w, slice(None))
    assert torch.equal(kernels.dequantize(w.codes, w.scales, w.offsets, group), full)
    for a, b in ((0, 1), (17, 230), (300, 301), (5, 5)):
        assert torch.equal(kernels.dequantize_rows(w.codes, w.scales, w.offsets, group, a, b), full[a:b])
    with pytest.raises(RuntimeError, match="outside"):
        kernels.dequantize_rows(w.codes, w.scales, w.offsets, group, 0, 302)


def test_rms_norm_matches_torch(op):
    x, scale = torch.randn(3, 4, 256) * 5, 1 + torch.randn(256) * 0.1
    want = torch.nn.functional.rms_norm(x, (256,), scale, 1e-6)
    assert rel_err(kernels.rms_norm(x, scale, 1e-6), want) <= 1e-6
    assert rel_err(kernels.rms_norm(x[:, 1], scale, 1e-6), want[:, 1]) <= 1e-6  # non-contiguous input


def test_qmatmul_rows_do_not_depend_on_the_batch(op):
    """Up to 8 rows, each output row is computed by the same instruction sequence whatever the batch: bit equal."""
    w = weight(300, 640, 32, True)
    x = torch.randn(8, 640)
    full = kernels.qmatmul(x, w.codes, w.scales, w.offsets, 32)
    assert all(torch.equal(kernels.qmatmul(x[i:i + 1], w.codes, w.scales, w.offsets, 32)[0], full[i]) for i in range(8))
    assert torch.equal(kernels.qmatmul(x[2:5], w.codes, w.scales, w.offsets, 32), full[2:5])


def reference_decode_attention(q, k, v, index, lengths, scale, softcap):
    """Gather each row's visible keys and run the model's eager attention in float32."""
    outs = []
    for b in range(q.shape[0]):
        rows = index[b, :lengths[b]]
        keys, vals = k[rows].float().transpose(0, 1)[None], v[rows].float().transpose(0, 1)[None]
        outs.append(gemma.attention(q[b:b + 1, :, None].float(), keys, vals, None, scale, softcap)[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,d", [((4, 1), 256), ((8, 4), 128), ((4, 2), 16), ((2, 2), 24)])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_decode_attention_matches_eager(op, dtype, heads, d, softcap):
    hq, hkv = heads
    g = torch.Generator().manual_seed(hq * d)
    pool = torch.randn(300, hkv, d, generator=g).to(dtype)
    lengths = torch.tensor([1, 37, 0, 250])  # a row with no key gets zeros
    index = torch.randint(0, 150, (4, 250), generator=g)
    q = torch.randn(4, hq, d, generator=g)
    # K and V as two views into one pool, as the paged cache passes them (V at an offset)
    out = kernels.decode_attention(q, pool, pool[150:], index, torch.zeros(4, dtype=torch.long), lengths, 1, 1, 0.0625,
                                   softcap)
    ref = reference_decode_attention(q, pool, pool[150:], index, lengths.clamp(min=1), 0.0625, softcap)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.equal(out[2], torch.zeros(hq, d))
    keep = [0, 1, 3]
    assert (out[keep] - ref[keep]).abs().max().item() <= 1e-5


def test_decode_attention_strided_and_batch_independent(op):
    # a dense cache [Hkv, T, D] seen as [T, Hkv, D]: rows are strided; and a row's output does not depend on the
    # other rows of the call (the engine's batched-equals-alone rests on it)
    k = torch.randn(2, 64, 32).to(torch.bfloat16)
    v = torch.randn(2, 64, 32).to(torch.bfloat16)
    q = torch.randn(3, 4, 32)
    index = torch.arange(64).repeat(3, 1)
    lengths = torch.tensor([64, 10, 33])
    zeros = torch.zeros(3, dtype=torch.long)
    both = kernels.decode_attention(q, k.transpose(0, 1), v.transpose(0, 1), index, zeros, lengths, 1, 1, 0.2, None)
    for b in range(3):
        alone = kernels.decode_attention(q[b:b + 1], k.transpose(0, 1), v.transpose(0, 1), index[b:b + 1],
                                         zeros[b:b + 1], lengths[b:b + 1], 1, 1, 0.2, None)
        assert torch.equal(both[b], alone[0])
    ref = reference_decode_attention(q, k.transpose(0, 1), v.transpose(0, 1), index, lengths, 0.2, None)
    assert (both - ref).abs().max().item() <= 1e-5


def test_decode_attention_refuses_out_of_range_slots(op):
    k = torch.randn(10, 1, 16)
    one, zero = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.decode_attention(torch.randn(1, 2, 16), k, k, torch.tensor([[3, 10]]), zero, torch.tensor([2]), 1, 1,
                                 1.0, None)
    with pytest.raises(RuntimeError, match="needs page"):  # a table too short for the row's keys
        kernels.decode_attention(torch.randn(1, 2, 16), k, k, torch.tensor([[0]]), zero, torch.tensor([5]), 4, 4, 1.0,
                                 None)
    # padding past a row's length is never read, whatever it holds
    out = kernels.decode_attention(torch.randn(1, 2, 16), k, k, torch.tensor([[3, 99]]), zero, one, 1, 1, 1.0, None)
    assert torch.isfinite(out).all()


def test_decode_attention_through_block_tables(op):
    # pages of 4 slots spaced 12 apart (another layer's slots in between), rows starting mid-page
    block, stride = 4, 12
    flat = torch.randn(20 * stride, 1, 64).to(torch.bfloat16)
    table = torch.tensor([[7, 2, 9, 0], [5, 11, 3, 0]])
    start, lengths = torch.tensor([1, 3]), torch.tensor([10, 5])
    q = torch.randn(2, 4, 64)
    out = kernels.decode_attention(q, flat, flat[4:], table, start, lengths, block, stride, 0.1, None)
    # the same keys as a plain slot list
    slots = [[table[b, p // block] * stride + p % block for p in range(start[b], start[b] + lengths[b])]
             for b in range(2)]
    index = torch.tensor([s + [0] * (10 - len(s)) for s in slots])
    ref = reference_decode_attention(q, flat, flat[4:], index, lengths, 0.1, None)
    assert (out - ref).abs().max().item() <= 1e-5


def test_rms_norm_any_width(op):
    x = torch.randn(5, 70)  # 70: four 16-wide vectors and a scalar tail
    scale = 1 + torch.randn(70) * 0.1
    assert rel_err(kernels.rms_norm(x, scale, 1e-6), torch.nn.functional.rms_norm(x, (70,), scale, 1e-6)) <= 1e-6


@pytest.mark.parametrize("width", [4096, 40])  # 40: a scalar tail after the 16-wide vectors
def test_geglu_matches_torch(op, width):
    gu = torch.randn(33, width) * 3
    gu[0, :6] = torch.tensor([0.0, 60.0, -60.0, 1e-4, -1e-4, 1e-30])
    gate, up = gu.chunk(2, dim=-1)
    want = torch.nn.functional.gelu(gate.double(), approximate="tanh") * up.double()
    out = kernels.geglu(gu)
    # x / (1 + exp(-2u)): within 1e-5 relative everywhere (where 1 + tanh(u) cancels, torch f32 is worse)
    assert out.dtype == torch.float32 and ((out.double() - want).abs() <= 1e-5 * want.abs() + 1e-12).all()
    # bf16 in and out: the float32 result rounded once (to nearest even), whatever the path
    assert torch.equal(kernels.geglu(gu.bfloat16()), kernels.geglu(gu.bfloat16().float()).bfloat16())


def test_prune_builds_keeps_recent_and_current(tmp_path):
    import os
    import time

    root = tmp_path / "kernels"
    current, recent, stale, other = (root / n for n in ("qmatmul-a", "qmatmul-b", "qmatmul-c", "unrelated"))
    for d in (current, recent, stale, other):
        d.mkdir(parents=True)
        (d / "x.so").write_bytes(b"0")
    old = time.time() - 40 * 86400
    for d in (current, stale, other):
        os.utime(d, (old, old))
    removed = kernels.prune_builds(current)
    assert removed == [stale]
    assert current.exists() and recent.exists() and other.exists() and not stale.exists()
    assert current.stat().st_mtime > old  # touched: the build in use is never the stale one


def test_load_ignores_a_build_lock_left_behind(op, monkeypatch):
    """A process killed while building leaves its lock file behind; a built library must still load
    (before, every later load waited on the lock forever: a killed server hung the next ones)."""
    so = kbuild.library_path(kernels.variant())
    assert so.exists()
    lock = so.parent / "lock"
    lock.touch()
    try:
        monkeypatch.setattr(kernels, "_state", {})
        loader = threading.Thread(target=kernels.kernel, daemon=True)
        loader.start()
        loader.join(60)
        assert not loader.is_alive() and kernels.available()
    finally:
        lock.unlink(missing_ok=True)


def test_add_rms_norm_matches_torch(op):
    x, y = torch.randn(5, 640), torch.randn(5, 640) * 3
    s1, s2 = 1 + torch.randn(640) * 0.1, 1 + torch.randn(640) * 0.1
    xo, h = kernels.add_rms_norm(x, y, s1, s2, 1e-6)
    want = x + torch.nn.functional.rms_norm(y, (640,), s1, 1e-6)
    assert rel_err(xo, want) <= 1e-6 and rel_err(h, torch.nn.functional.rms_norm(want, (640,), s2, 1e-6)) <= 1e-6
    xo, h = kernels.add_rms_norm(x, y, None, None, 1e-6)  # Gemma 1: no post-norm, no next norm wanted
    assert torch.equal(xo, x + y) and h is None


@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_matches_the_model_torch_path(op, norm):
    n, hq, hkv, d = 3, 4, 1, 256
    qkv = torch.randn(n, (hq + 2 * hkv) * d)
    qs, ks = (1 + torch.randn(d) * 0.1, 1 + torch.randn(d) * 0.1) if norm else (None, None)
    freqs = torch.arange(n).float()[:, None] * torch.rand(d // 2)[None]
    cos = torch.cat((freqs, freqs), -1).cos()
    sin = torch.cat((-freqs.sin(), freqs.sin()), -1)
    q, k, v = kernels.qk_norm_rope(qkv, qs, ks, cos, sin, hq, hkv, 1e-6)
    wq, wk, wv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    wq, wk, wv = wq.view(n, hq, d), wk.view(n, hkv, d), wv.view(n, hkv, d)
    if norm:
        wq, wk = (torch.nn.functional.rms_norm(wq, (d,), qs, 1e-6), torch.nn.functional.rms_norm(wk, (d,), ks, 1e-6))
    wq, wk = gemma.apply_rope(wq, cos[:, None], sin[:, None]), gemma.apply_rope(wk, cos[:, None], sin[:, None])
    assert rel_err(q, wq) <= 1e-6 and rel_err(k, wk) <= 1e-6 and torch.equal(v, wv)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("i16", [False, True])
def test_fast_mode_fused_layers_equal_the_torch_layers(op, arch, i16, monkeypatch):
    """The fast mode's fused passes (norms + RoPE, residual steps, GeGLU) compute DecoderLayer.forward's math: the
    same int8 model gives the same logits through them and through the torch layers (the products stay on the same
    kernels: only the fused branches, which ask kernels.available(), are turned off), up to float32 rounding.

    The 21-row products run qmatmul_bf16, qmatmul_i16, or (a CPU with neither: AVX2) the exact float32 kernel. bf16
    inputs absorb the two paths' last-bit differences, so the logits agree to 1e-4. int16 and float32 inputs keep
    them, and then some K/V values round to the other neighbouring bf16 in the cache: the logits agree to a bf16 step
    (measured 1.5e-3 on gemma3 with int16, 3.6e-4 and 4.2e-3 with float32)."""
    from gemma_sessions.testing import tiny_model

    if not i16:
        monkeypatch.setattr(kernels, "i16_available", lambda: False)
    elif not kernels.i16_available():
        pytest.skip("qmatmul_i16 needs AVX512-VNNI")
    model = tiny_model(arch, seed=3, weight_format="int8")
    assert model.net.layers[0].mlp.down_proj.i16_rows(21) == i16
    ids = [2] + list(range(10, 30))
    fused = model.forward(ids)
    monkeypatch.setattr(kernels, "available", lambda: False)
    plain = model.forward(ids)
    bf16_inputs = not i16 and kernels.bf16_dot_available()
    assert rel_err(fused, plain) <= (1e-4 if bf16_inputs else 5e-3)


def test_argmax_is_torch_argmax(op):
    g = torch.Generator().manual_seed(3)
    for r, v in [(1, 262144), (5, 70001), (3, 17), (2, 1)]:
        x = torch.randn(r, v, generator=g)
        assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    x = torch.randn(6, 100000, generator=g)
    x[0, 7] = x[0, 99999] = float("nan")  # the first NaN wins
    x[1] = float("-inf")  # all equal: the first index
    x[2, 40000] = x[2, 90000] = x[2].max() + 1  # a tie across chunks: the first
    x[3, 5] = x[3, 6] = x[3].max() + 1  # a tie within a vector
    x[4, 99999] = float("inf")
    x[5, 65536] = float("nan")  # a NaN after a larger value
    x[5, 3] = float("inf")
    assert kernels.argmax(x).tolist() == x.argmax(dim=-1).tolist() == [7, 0, 40000, 5, 99999, 65536]
    assert int(kernels.argmax(x[2])) == 40000  # a single row
    assert torch.equal(kernels.argmax(x.t().contiguous().t()), x.argmax(dim=-1))  # non-contiguous
    assert torch.equal(kernels.argmax(x.double()), x.double().argmax(dim=-1))  # other dtypes: torch


def test_kernel_pool_from_many_threads_and_thread_counts(op):
    """The kernels' own thread pool: many threads at once (one runs on the pool, the others inline) and any
    torch.set_num_threads give the same results as one thread alone."""
    w = weight(1536, 640, 32, False)
    xs = [torch.randn(1 + i % 3, 640, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    logits = torch.randn(4, 262144, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [kernels.qmatmul(x, w.codes, w.scales, None, 32) for x in xs]
        want_argmax = kernels.argmax(logits)
        torch.set_num_threads(max(before, 2))
        got: dict[int, list] = {i: [] for i in range(16)}

        def run(i: int) -> None:
            for _ in range(20):
                got[i].append((kernels.qmatmul(xs[i], w.codes, w.scales, None, 32), kernels.argmax(logits)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    for i in range(16):
        assert len(got[i]) == 20
        assert all(torch.equal(a, want[i]) and torch.equal(b, want_argmax) for a, b in got[i])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_kernels_work_in_a_forked_child(op):
    """A forked child has none of the parent's pool workers; it must start its own rather than wait on them."""
    import os

    w = weight(2048, 640, 32, False)
    x = torch.randn(2, 640)
    want = kernels.qmatmul(x, w.codes, w.scales, None, 32)  # the parent's pool is up
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the kernel runs and agrees
        ok = False
        try:
            ok = torch.equal(kernels.qmatmul(x, w.codes, w.scales, None, 32), want)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_rope_tables_do_not_depend_on_the_step():
    """RoPE tables come from per-position blocks: a position's cos/sin are the same whether a decode step asks for
    it alone or a prefill chunk asks for a range, and equal the formula (float32 position x inv_freq)."""
    from gemma_sessions.testing import tiny_config

    rope = gemma.Rope(tiny_config("gemma3"), torch.device("cpu"))
    wide = rope.tables(torch.arange(0, 1000), torch.float32)
    for p in (0, 1, 255, 256, 257, 999):
        one = rope.tables(torch.tensor([p]), torch.float32)
        for key in wide:
            assert torch.equal(one[key][0][0], wide[key][0][p]) and torch.equal(one[key][1][0], wide[key][1][p])
    mixed = rope.tables(torch.tensor([999, 3, 512]), torch.float32)
    for key, inv in rope.inv_freq.items():
        assert torch.equal(mixed[key][0][:, 0], wide[key][0][[999, 3, 512], 0])
        freqs = torch.tensor([999.0])[:, None] * inv[None, :]
        assert torch.allclose(mixed[key][0][0, 0], torch.cat((freqs, freqs), -1).cos()[0], atol=1e-6)
        assert torch.allclose(mixed[key][1][0, 0], torch.cat((-freqs.sin(), freqs.sin()), -1)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_long_rows_split_in_segments(op, dtype):
    """Rows longer than 128 keys are attended in segments in parallel and merged: the result matches eager attention,
    and a row's output is the same alone or batched (the split depends only on its length)."""
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(2400, 1, 256, generator=g).to(dtype)
    lengths = torch.tensor([1000, 129, 128, 5, 1200])
    index = torch.randint(0, 1200, (5, 1200), generator=g)
    q = torch.randn(5, 4, 256, generator=g)
    zeros = torch.zeros(5, dtype=torch.long)
    both = kernels.decode_attention(q, pool, pool[1200:], index, zeros, lengths, 1, 1, 0.0625, 50.0)
    ref = reference_decode_attention(q, pool, pool[1200:], index, lengths, 0.0625, 50.0)
    assert (both - ref).abs().max().item() <= 1e-5
    for b in range(5):
        alone = kernels.decode_attention(q[b:b + 1], pool, pool[1200:], index[b:b + 1], zeros[b:b + 1],
                                         lengths[b:b + 1], 1, 1, 0.0625, 50.0)
        assert torch.equal(both[b], alone[0])


@pytest.fixture(scope="module")
def q8(op):
    if not kernels.q8_head_available():
        pytest.skip("q8_head needs AVX512-VNNI or AVX2")
    return kernels.q8_head


def head_weight(n: int, k: int, seed: int = 0) -> quant.QuantWeight:
    """A Q8_0-like head: codes in [-127, 127] (as Q8_0 and quantize_symmetric make them)."""
    w = weight(n, k, 32, False, seed=seed)
    return quant.QuantWeight(codes=w.codes.clamp(-127, 127), scales=w.scales, offsets=None, group=32)


def _exact_tokens(x: torch.Tensor, w: quant.QuantWeight) -> list[int]:
    """The exact kernel's greedy token of each row, computed alone (what a decode row alone gets)."""
    return [int(kernels.qmatmul(x[i:i + 1], w.codes, w.scales, None, w.group).argmax()) for i in range(len(x))]


@pytest.mark.parametrize("half_scales", [False, True])
def test_q8_head_gives_the_exact_greedy_token(q8, half_scales):
    """Tokens from the int8-activation head equal the exact kernel's argmax row by row, for every row count, on
    hidden-state-like inputs (a few outlier channels) and on adversarial near-ties: duplicated weight rows (exact ties:
    the lower index wins, as torch.argmax) and rows one code apart. With scales that are float16 values (a Q8_0 head's)
    the AVX2 layout keeps them in float16, exactly; others stay float32."""
    torch.manual_seed(3)
    w = head_weight(4096, 640, seed=5)
    if half_scales:
        w = quant.QuantWeight(codes=w.codes, scales=w.scales.half().float(), offsets=None, group=32)
    else:
        assert not torch.equal(w.scales.half().float(), w.scales)  # the float32 layout is the one tested
    codes = w.codes.clone()
    codes[1000] = codes[7]          # an exact tie between 7 and 1000
    codes[2001] = codes[2000]
    codes[2001, 17] += 1 if codes[2001, 17] < 127 else -1  # one code apart
    scales = w.scales.clone()
    scales[1000], scales[2001] = scales[7], scales[2000]
    w = quant.QuantWeight(codes=codes, scales=scales, offsets=None, group=32)
    packed = kernels.q8_head_pack(w.codes, w.scales)
    assert packed[1].dtype == (torch.float16 if half_scales and kernels.wide_available() else torch.float32)
    x = torch.randn(20, 640)
    x[:, 5] *= 40  # outlier channels, as real hidden states have
    x[:, 300] *= -25
    x[3] = 0.0  # an all-zero row: every logit ties at 0 -> token 0
    dense = w.dequantize()
    x[4] = dense[7] * 50  # aims at the tie 7 / 1000
    x[5] = dense[2000] * 50 + dense[2001] * 50  # aims at the pair one code apart
    want = _exact_tokens(x, w)
    for m in (1, 2, 7, 8, 9, 16, 20):
        tokens, cands, logits = q8(x[:m], packed, w.codes, w.scales, True)
        assert tokens.tolist() == want[:m], m
        assert bool((cands >= 1).all())
        # the approximation is the product with x rounded per group of 32 to int8 (7 bits on AVX2, see csrc/head.h)
        xg = x[:m].view(m, 20, 32)
        levels = 63.0 if kernels.wide_available() else 127.0
        amax = xg.abs().amax(-1, keepdim=True)
        # q = round(x * inv) as the kernel: inv = levels / amax rounded once (torch's scalar / tensor is a
        # reciprocal, then a product: two roundings)
        inv = torch.where(amax > 0, torch.full_like(amax, levels) / amax, torch.zeros_like(amax))
        xhat = (torch.round(xg * inv) * (amax / levels)).view(m, 640)
        ref = xhat.double() @ dense.double().T
        assert ((logits.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert want[3] == 0 and want[4] == 7


def test_q8_head_refuses_non_finite_rows_and_bad_packing(q8):
    w = head_weight(64, 64)
    packed = kernels.q8_head_pack(w.codes, w.scales)
    x = torch.randn(3, 64)
    x[1, 3] = float("nan")
    tokens, _, logits = q8(x, packed, w.codes, w.scales, False)
    assert logits is None
    assert tokens.tolist() == [_exact_tokens(x[:1], w)[0], -1, _exact_tokens(x[2:], w)[0]]
    other = kernels.q8_head_pack(head_weight(32, 64).codes, head_weight(32, 64).scales)
    with pytest.raises(RuntimeError, match="packed weights"):
        q8(x, other, w.codes, w.scales, False)
    with pytest.raises(RuntimeError, match="scales must be"):
        q8(x, packed, w.codes, w.scales[:, :1].contiguous(), False)
    with pytest.raises(RuntimeError, match="N % 16"):
        kernels.q8_head_pack(head_weight(8, 64).codes, head_weight(8, 64).scales)


def test_q8_head_from_many_threads(q8):
    w = head_weight(2048, 128, seed=9)
    packed = kernels.q8_head_pack(w.codes, w.scales)
    xs = [torch.randn(1 + i % 12, 128) for i in range(24)]
    want = [_exact_tokens(x, w) for x in xs]
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        for _ in range(5):
            got[i] = q8(xs[i], packed, w.codes, w.scales, False)[0].tolist()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(24)] == want


# ------------------------------------------------------------------------------------------------ qmatmul_i16


@pytest.fixture(scope="module")
def i16(op):
    if not kernels.i16_available():
        pytest.skip("qmatmul_i16 needs AVX512-VNNI")
    return kernels.qmatmul_i16


@pytest.mark.parametrize("group,offsets", [(32, False), (32, True), (16, False), (16, True)])
@pytest.mark.parametrize("m", [1, 5, 9, 16, 33, 64])
def test_qmatmul_i16_within_its_error_bound(i16, m, group, offsets):
    """x rounded to int16 with one scale per row, the codes used as integers, group sums exact: each output is
    within (max|x| / 65534) * sum_k |W[n, k]| of the exact float32 product (plus float32 rounding), and that is far
    inside what the bf16 kernel errs by. Every row count and layout that the engine meets: groups of 32 and 16
    (Q6_K), with and without offsets."""
    torch.manual_seed(m)
    w = weight(64, 256, group, offsets, seed=m)
    x = torch.randn(m, 256)
    x[:, 7] *= 30  # an outlier channel sets the row's scale, as in real hidden states
    if m > 1:
        x[1] = 0.0  # an all-zero row gives zeros
    exact = kernels.qmatmul(x, w.codes, w.scales, w.offsets, group).double()
    got = i16(x, kernels.i16_pack(w.codes, w.scales, w.offsets, group), group).double()
    dense = w.dequantize().double()
    bound = (x.abs().amax(1, keepdim=True).double() / 65534) * dense.abs().sum(1)[None, :]
    slack = 1e-5 * (x.abs().double() @ dense.abs().T) + 1e-6
    assert bool(((got - exact).abs() <= bound + slack).all())
    if m > 1:
        assert bool((got[1] == 0).all())
    if m >= 9:
        bf16 = kernels.qmatmul_bf16(x, w.codes, w.scales, w.offsets, group).double()
        assert (got - exact).abs().max() * 10 < (bf16 - exact).abs().max()


@pytest.mark.parametrize("group,offsets", [(32, False), (32, True), (16, True), (8, False), (64, True), (128, False)])
def test_qmatmul_i16_on_amx_gives_the_avx512_kernels_bits(i16, group, offsets):
    """On AMX (x split into int8 halves, the two halves' group sums from the tile unit) every output is bit for bit
    what vpdpwssd's layout gives: the same exact int32 group sums, then the same float32 steps. Every row count
    from 1 to 64 (partial tiles of 16 rows), a row with an infinity, an all-zero row, a row of x at int16's ends."""
    if not kernels.amx_available():
        pytest.skip("no AMX-INT8 on this CPU (or GEMMA_SESSIONS_NO_AMX)")
    w = weight(48, 512, group, offsets, seed=group)
    vnni = kernels.i16_pack(w.codes, w.scales, w.offsets, group, amx=False)
    amx = kernels.i16_pack(w.codes, w.scales, w.offsets, group, amx=True)
    assert amx[0].shape == (3, 128, 16, 4) and vnni[0].shape == (3, 256, 16, 2)
    assert kernels.i16_pack(w.codes, w.scales, w.offsets, group)[0].shape == amx[0].shape  # the default here
    for m in (1, 2, 9, 15, 16, 17, 31, 33, 64):
        torch.manual_seed(m)
        x = torch.randn(m, 512) * torch.rand(m, 1) * 10
        x[:, 3] *= 40
        x[0, :8] = torch.tensor([1.0, -1.0, 0.5, -0.5, 1e-9, -1e-9, 0.0, 0.0]) * x[0].abs().max()
        if m > 2:
            x[1] = 0.0
            x[2, 100] = float("inf")
        a, b = i16(x, amx, group), i16(x, vnni, group)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), m


def test_qmatmul_i16_non_finite_rows_and_bad_packing(i16):
    w = weight(32, 64, 32, True)
    packed = kernels.i16_pack(w.codes, w.scales, w.offsets, 32)
    x = torch.randn(10, 64)
    x[3, 5] = float("inf")
    x[6, 60] = float("nan")  # also past the last full vector of 16
    out = i16(x, packed, 32)
    bad = (torch.arange(10) == 3) | (torch.arange(10) == 6)
    assert bool(out[bad].isnan().all()) and bool(out[~bad].isfinite().all())
    assert torch.equal(out[7:], i16(x[7:].contiguous(), packed, 32))  # a row's result does not depend on the others
    odd = weight(16, 40, 8, False)  # K not a multiple of 16: the vectors' tails
    xo = torch.randn(9, 40)
    got = i16(xo, kernels.i16_pack(odd.codes, odd.scales, None, 8), 8)
    assert rel_err(got, kernels.qmatmul(xo, odd.codes, odd.scales, None, 8)) < 1e-4
    with pytest.raises(RuntimeError, match="packed codes"):
        i16(torch.randn(2, 128), packed, 32)
    with pytest.raises(RuntimeError, match="group size"):
        i16(x, packed, 24)
    with pytest.raises(RuntimeError, match="N % 16"):
        kernels.i16_pack(weight(8, 64, 32, False).codes, weight(8, 64, 32, False).scales, None, 32)
    other = weight(32, 64, 16, False)
    with pytest.raises(RuntimeError, match="packed scales"):
        i16(x, (packed[0], kernels.i16_pack(other.codes, other.scales, None, 16)[1], packed[2]), 32)


def test_qmatmul_i16_from_many_threads(i16):
    w = weight(256, 640, 32, True, seed=4)
    packed = kernels.i16_pack(w.codes, w.scales, w.offsets, 32)
    xs = [torch.randn(9 + i % 40, 640) for i in range(16)]
    want = [i16(x, packed, 32) for x in xs]
    got: dict[int, bool] = {}

    def run(i: int) -> None:
        got[i] = all(torch.equal(i16(xs[i], packed, 32), want[i]) for _ in range(5))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] for i in range(16))


def test_openmp_workers_do_not_spin_against_the_kernels_pool():
    """torch's idle OpenMP workers would spin on the cores the kernels' own pool needs: gemma_sessions makes them
    passive when it is imported before torch, keeps a second OpenMP team (libgomp then throttles the spin) when torch
    came first, and leaves a policy the user set alone."""
    probe = ("import os, threading, torch; from gemma_sessions import kernels; can = kernels.available() and "
             "torch.get_num_threads() > 1; print(os.environ.get('OMP_WAIT_POLICY'), any(t.name == "
             "'gemma-sessions-openmp-team' for t in threading.enumerate()), can)")

    def run(first: str, env_policy: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if env_policy:
            env["OMP_WAIT_POLICY"] = env_policy
        out = subprocess.run([sys.executable, "-c", f"import {first}, gemma_sessions; {probe}"], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        return out.stdout.split()[-3:]

    assert run("os", None)[:2] == ["PASSIVE", "False"]  # before torch: libgomp reads the passive policy
    policy, team, can = run("torch", None)  # after torch: a second team (with the kernels and 2+ threads)
    assert policy == "PASSIVE" and team == can
    assert run("torch", "active")[:2] == ["active", "False"]  # the user's choice stands
