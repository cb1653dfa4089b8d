"""Grouped int8 weights: int8 codes with a float32 scale (and offset) per group of G inputs, exact for GGUF blocks.

Contract: a :class:`QuantWeight` holds ``W[n, k] = scales[n, k // G] * codes[n, k] + offsets[n, k // G]``.
``from_gguf(raw, qtype, shape)`` makes one from a GGUF tensor's raw block bytes, EXACTLY (``dequantize()`` equals
the ``gguf`` package's dequantization bit for bit) for Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K; it returns
None for other types. ``quantize_symmetric(w)`` is the lossy fallback for every other weight (float files, other
GGUF types): symmetric int8 per group of 32, ``scale = max|w| / 127``.

Every GGUF type here is "integer codes times a per-group scale, plus a per-group offset"::

    Q8_0  block 32:  w = d * q                      q int8            G = 32
    Q5_0  block 32:  w = d * (q - 16)               q 0..31           G = 32
    Q4_0  block 32:  w = d * (q - 8)                q 0..15           G = 32
    Q5_1 / Q4_1:     w = d * q + m                  q 0..31 / 0..15   G = 32, offset m
    Q4_K / Q5_K  super-block 256 = 8 x 32:  w = (d * sc) * q - (dmin * mn)   (6-bit sc, mn)   G = 32
    Q6_K  super-block 256 = 16 x 16:        w = (d * sc) * (q - 32)          (int8 sc)        G = 16

The products ``d * sc`` and ``dmin * mn`` are rounded to float32 exactly as the ``gguf`` package (and ggml) do,
so ``codes * scale + offset`` in float32 reproduces its dequantization bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

SYMMETRIC_GROUP = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantWeight:
    """A weight ``[N, K]`` as int8 codes ``[N, K]``, float32 scales ``[N, K/G]`` and optional offsets."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to(self, device: torch.device | str) -> QuantWeight:
        off = None if self.offsets is None else self.offsets.to(device)
        return QuantWeight(codes=self.codes.to(device), scales=self.scales.to(device), offsets=off, group=self.group)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``."""
        return dequantize_rows(self, slice(None))


def dequantize_rows(w: QuantWeight, rows: torch.Tensor | slice) -> torch.Tensor:
    """float32 rows of W (an embedding lookup reads a few rows this way)."""
    codes = w.codes[rows]
    n, k = codes.shape
    out = codes.view(n, k // w.group, w.group).float() * w.scales[rows][:, :, None]
    if w.offsets is not None:
        out += w.offsets[rows][:, :, None]
    return out.view(n, k)


def regroup(w: QuantWeight, group: int) -> QuantWeight:
    """The same weight with a smaller group size (a divisor of ``w.group``); exact (scales are repeated)."""
    if group == w.group:
        return w
    r = w.group // group
    off = None if w.offsets is None else w.offsets.repeat_interleave(r, dim=1)
    return QuantWeight(codes=w.codes, scales=w.scales.repeat_interleave(r, dim=1), offsets=off, group=group)


def cat_rows(ws: list[QuantWeight]) -> QuantWeight:
    """Stack weights along N (fused q/k/v, gate/up); exact: the smallest group wins, missing offsets are zeros."""
    group = min(w.group for w in ws)
    if any(w.group % group for w in ws):
        raise ValueError(f"group sizes {[w.group for w in ws]} do not nest")
    ws = [regroup(w, group) for w in ws]
    offsets = None
    if any(w.offsets is not None for w in ws):
        offsets = torch.cat([torch.zeros_like(w.scales) if w.offsets is None else w.offsets for w in ws])
    return QuantWeight(codes=torch.cat([w.codes for w in ws]), scales=torch.cat([w.scales for w in ws]),
                       offsets=offsets, group=group)


def quantize_symmetric(w: torch.Tensor, group: int = SYMMETRIC_GROUP) -> QuantWeight:
    """Lossy symmetric int8 per group: ``scale = max|w| / 127`` (for float weights and unsupported GGUF types).
    Falls back to one group per row when ``group`` does not divide K."""
    w = w.float()
    n, k = w.shape
    g = group if k % group == 0 else k
    blocks = w.reshape(n, k // g, g)
    scales = blocks.abs().amax(dim=2).clamp(min=1e-30) / 127.0
    codes = torch.round(blocks / scales[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight(codes=codes.reshape(n, k).contiguous(), scales=scales.contiguous(), offsets=None, group=g)


# ------------------------------------------------------------------------------------------------ GGUF blocks


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 (the block's float16 field)."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Packed 4-bit values: byte j of a run of ``width`` holds element j (low nibble) and j + width (high)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0/Q5_1: bit i of the block's little-endian uint32 is element i's fifth bit."""
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(count, dtype=np.uint32)
    return (bits & np.uint32(1)).astype(np.uint8)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None, 32


def _q4_0(b):
    return _nibbles(b[:, 2:], 16).astype(np.int8) - np.int8(8), _f16(b[:, :2]), None, 32


def _q4_1(b):
    return _nibbles(b[:, 4:], 16).astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _q5_0(b):
    q = _nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6], 32) << np.uint8(4))
    return q.astype(np.int8) - np.int8(16), _f16(b[:, :2]), None, 32


def _q5_1(b):
    q = _nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8], 32) << np.uint8(4))
    return q.astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _k_scales(b):
    """Q4_K/Q5_K: (d * sc [n, 8], dmin * mn [n, 8]) from the 12 packed 6-bit scale/min bytes at b[:, 4:16]."""
    from gguf.quants import Q4_K

    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return _f16(b[:, :2]) * sc.astype(np.float32), _f16(b[:, 2:4]) * mn.astype(np.float32)


def _q4_k(b):
    scale, dm = _k_scales(b)
    return _nibbles(b[:, 16:], 32).astype(np.int8), scale, -dm, 32


def _q5_k(b):
    scale, dm = _k_scales(b)
    n = b.shape[0]
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _nibbles(b[:, 48:], 32) | ((qh & np.uint8(1)).reshape(n, -1) << np.uint8(4))
    return q.astype(np.int8), scale, -dm, 32


def _q6_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(n, -1, 32)
    qh = b[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(3)).reshape(n, -1, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return q.reshape(n, -1), scale, None, 16


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
             "Q5_K": _q5_k, "Q6_K": _q6_k}


def supported(qtype: Any) -> bool:
    return getattr(qtype, "name", str(qtype)) in _DECODERS


def from_gguf(raw: np.ndarray, qtype: Any, shape: tuple[int, int]) -> QuantWeight | None:
    """A GGUF tensor's raw bytes (uint8) in PyTorch shape ``[N, K]`` -> an exact QuantWeight; None if the type has
    no exact grouped form here."""
    decode = _DECODERS.get(getattr(qtype, "name", str(qtype)))
    if decode is None:
        return None
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    if k % block:
        return None
    codes, scales, offsets, group = decode(np.asarray(raw, dtype=np.uint8).reshape(-1, type_size))
    # scales / offsets come out one row per block: [n_blocks, block // G] -> [N, K / G]
    as_t = (lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, k // group)))
    return QuantWeight(codes=torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8).reshape(n, k)),
                       scales=as_t(scales), offsets=None if offsets is None else as_t(offsets), group=group)
