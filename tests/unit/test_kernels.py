"""The grouped int8 kernel (kernels.qmatmul) against float32 products of the dequantized weight; threads; the
torch fallback; the int8 Linear's paths."""

from __future__ import annotations

import threading

import pytest
import torch

from gemma_sessions import kernels
from gemma_sessions.models import gemma, quant


def weight(n: int, k: int, group: int, offsets: bool, seed: int = 0) -> quant.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01
    off = torch.randn(n, k // group, generator=g) * 0.05 if offsets else None
    return quant.QuantWeight(codes=codes, scales=scales, offsets=off, group=group)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def op():
    if not kernels.available():
        pytest.skip(f"kernel not built here: {kernels._state.get('error')}")
    return kernels.kernel()


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


def test_build_key_depends_on_cpu_and_flags(monkeypatch):
    key = kernels.build_key()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags : sse2")
    assert kernels.build_key() != key
    monkeypatch.setattr(kernels, "CFLAGS", ("-O2",))
    assert len(kernels.build_key()) == 16


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


def test_int8_linear_paths(op):
    w = weight(40, 64, 16, True)
    ref = lambda x: x @ w.dequantize().T  # noqa: E731
    lin = gemma.Linear(w, "int8")
    small, big = torch.randn(gemma.QMATMUL_MAX_ROWS, 64), torch.randn(gemma.QMATMUL_MAX_ROWS + 5, 64)
    assert rel_err(lin(small), ref(small)) <= 1e-5 and lin.bf16 is None  # the kernel, no copy made
    assert rel_err(lin(big), ref(big)) <= 1e-2 and lin.bf16 is not None  # bf16 GEMM
    head = gemma.Linear(w, "int8", head=True)
    bigger = torch.randn(gemma.HEAD_QMATMUL_MAX_ROWS + 1, 64)
    assert rel_err(head(big), ref(big)) <= 1e-5 and head.bf16 is None  # the kernel
    assert rel_err(head(bigger), ref(bigger)) <= 1e-5 and head.bf16 is None  # float32 tiles
    assert torch.equal(gemma.Linear(w.dequantize(), "float32").weight, w.dequantize())


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
