"""Grouped int8 weights (models/quant.py): exact against the gguf package's dequantization for every GGUF block
type we convert, on random blocks and on the real model file; symmetric quantization; row stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from gemma_sessions.models import quant

EXACT = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
WRITABLE = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}  # gguf-py can quantize these; K-quants get random bytes
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q5_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2],
              Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw bytes of an [n, k] tensor: quantized random floats, or random bytes with finite float16 fields."""
    rng = np.random.default_rng(seed)
    if qtype in WRITABLE:
        return quantize(rng.standard_normal((n, k)).astype(np.float32), qtype).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = rng.uniform(-0.1, 0.1, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_from_gguf_is_exact(qtype):
    n, k = 7, 512
    raw = random_blocks(qtype, n, k)
    w = quant.from_gguf(raw, qtype, (n, k))
    ref = torch.from_numpy(dequantize(raw.reshape(n, -1), qtype).astype(np.float32))
    assert w.shape == (n, k) and w.codes.dtype == torch.int8 and w.group == (16 if qtype == Q.Q6_K else 32)
    assert (w.offsets is not None) == (qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K))
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(quant.dequantize_rows(w, torch.tensor([5, 0])), ref[[5, 0]])


def test_unsupported_type_gives_none():
    assert quant.from_gguf(np.zeros(4 * 64, np.uint8), Q.F16, (2, 64)) is None
    assert not quant.supported(Q.Q2_K) and quant.supported(Q.Q6_K)


def test_cat_rows_mixes_groups_and_offsets_exactly():
    a = quant.from_gguf(random_blocks(Q.Q6_K, 3, 256, 1), Q.Q6_K, (3, 256))   # G 16, no offsets
    b = quant.from_gguf(random_blocks(Q.Q4_K, 5, 256, 2), Q.Q4_K, (5, 256))   # G 32, offsets
    c = quant.cat_rows([a, b])
    assert c.group == 16 and c.offsets is not None and c.shape == (8, 256)
    assert torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def test_quantize_symmetric_error_bound():
    w = torch.randn(9, 96) * torch.rand(9, 1)
    q = quant.quantize_symmetric(w)
    assert q.group == 32 and q.offsets is None
    err = (q.dequantize() - w).abs().view(9, 3, 32)
    assert (err <= q.scales[:, :, None] / 2 + 1e-7).all()
    assert quant.quantize_symmetric(torch.randn(2, 40)).group == 40  # 32 does not divide 40: one group per row


@pytest.mark.slow
def test_real_file_tensors_are_exact(real_model_path):
    from gemma_sessions.models.gguf_file import GGUFFile
    from gemma_sessions.models.weights import dequantize_tensor

    seen = set()
    for t in GGUFFile(real_model_path).tensors:
        if len(t.shape) != 2 or t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        shape = (int(t.shape[1]), int(t.shape[0]))
        rows = min(shape[0], 4096)  # the embedding's first 4096 rows are enough (and quick)
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        raw = np.asarray(t.data[:rows * shape[1] // block * size])
        w = quant.from_gguf(raw, t.tensor_type, (rows, shape[1]))
        assert w is not None, t.tensor_type
        assert torch.equal(w.dequantize(), dequantize_tensor(raw, t.tensor_type).reshape(rows, -1)), t.name
    assert {Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K} <= seen
