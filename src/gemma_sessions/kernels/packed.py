"""Packed codes: a weight's int8 codes kept at the width the GGUF file stores them (4, 5 or 6 bits), exactly.

Contract: :func:`pack_codes` turns int8 codes ``[N, K]`` whose values span fewer than 64 consecutive integers (every
GGUF type narrower than 8 bits: Q4_0/Q4_1/Q4_K in 4 bits, Q5_0/Q5_1/Q5_K in 5, Q6_K in 6) into :class:`PackedCodes`;
:func:`unpack_codes` gives the same int8 codes back, bit for bit. The compiled products read the packed bytes and
unpack them in registers (``csrc/codes.h``, which documents the same layout), so a decode step reads ~0.6-0.75 bytes
per weight instead of ~1.1 and computes the same bits. Torch only: no compiled kernel needed to pack or unpack.

Per weight row, per chunk of 32 inputs, ``16 + 4 (bits - 4)`` bytes, where ``u = code + bias`` (mod 256)::

    bytes  0..15   u[j] & 15 | (u[j + 16] & 15) << 4      (j = 0..15: the GGUF nibble order)
    bytes 16..19   bit i = bit 4 of u[i]                   (bits >= 5; a little-endian uint32, as Q5_0's qh)
    bytes 20..23   bit i = bit 5 of u[i]                   (bits == 6)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

CHUNK = 32  # inputs per chunk
BITS = (4, 5, 6)  # the widths packed; wider codes (Q8_0, symmetric int8) stay int8


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedCodes:
    """int8 codes ``[N, K]`` stored in ``bits`` bits each: ``data`` uint8 ``[N, K / 32 * chunk_bytes(bits)]``,
    the code of an element is ``u - bias`` (see the module's layout)."""

    data: torch.Tensor
    bits: int
    bias: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def chunk_bytes(bits: int) -> int:
    return 16 + 4 * (bits - 4)


def pack_width(codes: torch.Tensor, max_bits: int = BITS[-1]) -> tuple[int, int] | None:
    """(bits, bias): the fewest bits (4 up to ``max_bits``) that hold every code of ``codes`` plus ``bias = -min``;
    None when none do or K is not a multiple of 32."""
    if codes.dim() != 2 or codes.dtype != torch.int8 or codes.shape[1] % CHUNK or codes.numel() == 0:
        return None
    lo, hi = (int(v) for v in torch.aminmax(codes))
    bits = next((b for b in BITS if hi - lo < 1 << b and b <= max_bits), None)
    return None if bits is None else (bits, -lo)


def pack_codes(codes: torch.Tensor, packer: Callable | None = None, max_bits: int = BITS[-1]) -> PackedCodes | None:
    """``codes`` int8 ``[N, K]`` packed as :func:`pack_width` says, or None where it gives none. ``packer(codes,
    bits, bias)`` makes the bytes (the compiled ``pack_codes``: one pass, no temporaries); default: torch."""
    width = pack_width(codes, max_bits)
    if width is None:
        return None
    bits, bias = width
    if packer is not None:
        return PackedCodes(data=packer(codes, bits, bias), bits=bits, bias=bias, in_features=codes.shape[1])
    lo = -bias
    n, k = codes.shape
    u = (codes.to(torch.int16) - lo).to(torch.uint8).view(n, k // CHUNK, CHUNK)  # 0 .. 2^bits - 1
    parts = [(u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)]
    weights = torch.ones(CHUNK, dtype=torch.int64) << torch.arange(CHUNK)
    for b in range(4, bits):
        plane = (((u >> b) & 1).to(torch.int64) * weights).sum(-1, keepdim=True)  # [n, chunks, 1]: bit i = u[i]'s
        parts.append(((plane >> torch.arange(0, 32, 8)) & 255).to(torch.uint8))  # little-endian bytes
    data = torch.cat(parts, dim=-1).reshape(n, -1).contiguous()
    return PackedCodes(data=data, bits=bits, bias=-lo, in_features=k)


def unpack_codes(p: PackedCodes) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of ``p``, exactly as they were packed (torch; ``kernels.unpack_codes`` is the
    compiled one)."""
    n, k = p.shape
    raw = p.data.view(n, k // CHUNK, chunk_bytes(p.bits)).to(torch.int64)
    u = torch.cat([raw[..., :16] & 15, raw[..., :16] >> 4], dim=-1)  # [n, chunks, 32]
    for b in range(4, p.bits):
        plane = raw[..., 16 + 4 * (b - 4):20 + 4 * (b - 4)]
        word = (plane << torch.arange(0, 32, 8)).sum(-1, keepdim=True)
        u |= ((word >> torch.arange(CHUNK)) & 1) << b
    return (u - p.bias).to(torch.int8).view(n, k)
