"""Packed codes (kernels/packed.py, csrc/codes.h): a layer's codes kept at the GGUF type's width give the same bits as
its int8 codes, through every product that reads them (qmatmul, qmatmul_wide, the decode stack, QuantLinear), under
every instruction-set variant this CPU executes; the kernels that read int8 only get unpacked copies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_decode_stack import step, tiny_stack  # the tiny described stack and its step's arguments
from test_quant import random_blocks  # GGUF blocks of any type

from gemma_sessions import kernels
from gemma_sessions.kernels import backend
from gemma_sessions.kernels import packed as P
from gemma_sessions.models import quant

# every GGUF type narrower than 8 bits, and the width its codes pack in
WIDTHS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5, Q.Q6_K: 6}
ROWS = [*range(1, 18), 24, 33, 48, 64]


def gguf_weight(qtype, n: int, k: int, seed: int = 0) -> quant.QuantWeight:
    return quant.from_gguf(random_blocks(qtype, n, k, seed), qtype, (n, k))


def ranged_codes(lo: int, hi: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Codes spanning exactly [lo, hi] (both ends present)."""
    c = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    c[0, 0], c[-1, -1] = lo, hi
    return c


@pytest.mark.parametrize("qtype", WIDTHS, ids=lambda t: t.name)
def test_gguf_codes_pack_at_their_width_and_unpack_exactly(qtype):
    w = gguf_weight(qtype, 9, 512)
    p = P.pack_codes(w.codes)
    assert p is not None and p.bits == WIDTHS[qtype]
    assert p.data.dtype == torch.uint8 and p.data.shape == (9, 512 // 32 * P.chunk_bytes(p.bits))
    assert torch.equal(P.unpack_codes(p), w.codes)
    assert torch.equal(kernels.unpack_codes(p), w.codes)


@pytest.mark.parametrize("lo, hi, bits", [(-16, 15, 5), (0, 15, 4), (-32, 31, 6), (-8, 7, 4), (-128, -65, 6),
                                          (64, 127, 6), (-3, 40, 6), (-7, 7, 4)])
def test_any_span_under_64_packs_with_its_bias(lo, hi, bits):
    c = ranged_codes(lo, hi, 5, 96)
    p = P.pack_codes(c)
    assert (p.bits, p.bias) == (bits, -lo)
    assert torch.equal(P.unpack_codes(p), c) and torch.equal(kernels.unpack_codes(p), c)


def test_what_does_not_pack():
    assert P.pack_codes(ranged_codes(-64, 0, 4, 64)) is None  # a span of 65 values: int8 stays
    assert P.pack_codes(gguf_weight(Q.Q8_0, 4, 64).codes) is None
    assert P.pack_codes(ranged_codes(-8, 7, 4, 48)) is None  # K not a multiple of 32


def test_the_layout_is_the_documented_one():
    """Byte j of a chunk holds codes j and j + 16 in its nibbles; bytes 16..19 are bit 4 of each code, LSB first."""
    c = torch.zeros(1, 32, dtype=torch.int8)
    c[0, 1], c[0, 17], c[0, 31] = 3, 10, 16  # bias 0: u = code
    p = P.pack_codes(c)
    assert p.bits == 5 and p.bias == 0
    assert p.data[0, 1].item() == 3 | 10 << 4 and p.data[0, 15].item() == 0
    assert int.from_bytes(bytes(p.data[0, 16:20].tolist()), "little") == 1 << 31


@pytest.mark.parametrize("qtype", WIDTHS, ids=lambda t: t.name)
def test_qmatmul_packed_is_qmatmul_bit_for_bit(op, qtype):
    w = gguf_weight(qtype, 37, 768, seed=3)  # odd N; offsets for Q4_1, Q5_1, Q4_K, Q5_K
    p = P.pack_codes(w.codes)
    g = torch.Generator().manual_seed(4)
    for m in ROWS:
        x = torch.randn(m, 768, generator=g)
        want = kernels.qmatmul(x, w.codes, w.scales, w.offsets, w.group)
        assert torch.equal(kernels.qmatmul_packed(x, p, w.scales, w.offsets, w.group), want), m


@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("lo, hi", [(-16, 15), (0, 15), (-32, 31), (-128, -65), (64, 127)])
def test_packed_products_on_every_code_range(op, group, lo, hi):
    """Ranges that reach the int8 ends (bias 128 and -64), offsets, K of 224 (7 chunks), both group sizes."""
    c = ranged_codes(lo, hi, 19, 224, seed=lo + 300)
    g = torch.Generator().manual_seed(5)
    s, o = torch.rand(19, 224 // group, generator=g) * 0.01, torch.randn(19, 224 // group, generator=g) * 0.01
    p = P.pack_codes(c)
    for m in (1, 3, 8, 9, 16, 17, 40):
        x = torch.randn(m, 224, generator=g)
        assert torch.equal(kernels.qmatmul_packed(x, p, s, o, group), kernels.qmatmul(x, c, s, o, group))
        if kernels.wide_available():
            assert torch.equal(kernels.qmatmul_wide_packed(x, p, s, o, group), kernels.qmatmul_wide(x, c, s, o, group))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_qmatmul_wide_packed_is_qmatmul_wide_bit_for_bit(op, qtype):
    if not kernels.wide_available():
        pytest.skip("qmatmul_wide is the AVX2-only build's")
    w = gguf_weight(qtype, 53, 1024, seed=6)
    p = P.pack_codes(w.codes)
    g = torch.Generator().manual_seed(7)
    for m in ROWS:
        x = torch.randn(m, 1024, generator=g)
        want = kernels.qmatmul_wide(x, w.codes, w.scales, w.offsets, w.group)
        assert torch.equal(kernels.qmatmul_wide_packed(x, p, w.scales, w.offsets, w.group), want), m


def test_packed_ops_check_their_arguments(op):
    p = P.pack_codes(ranged_codes(-16, 15, 4, 64))
    s = torch.rand(4, 2)
    with pytest.raises(RuntimeError, match="group of 16 or 32"):
        kernels.qmatmul_packed(torch.randn(1, 64), p, torch.rand(4, 8), None, 8)
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.qmatmul_packed(torch.randn(1, 96), p, torch.rand(4, 3), None, 32)  # K disagrees with the bytes
    bad = P.PackedCodes(data=p.data, bits=6, bias=p.bias, in_features=64)
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.qmatmul_packed(torch.randn(1, 64), bad, s, None, 32)


@pytest.fixture
def every_width(monkeypatch):
    """Layers keep codes of any width up to 6 bits packed (the policy's default is narrower on some builds)."""
    monkeypatch.setenv("GEMMA_SESSIONS_PACKED_BITS", "6")


def test_the_policy_packs_up_to_its_width(op, monkeypatch):
    q4, q5 = gguf_weight(Q.Q4_K, 8, 256), gguf_weight(Q.Q5_0, 8, 256)
    for env, want in (("4", (4, None)), ("5", (4, 5)), ("6", (4, 5)), ("8", (None, None))):
        monkeypatch.setenv("GEMMA_SESSIONS_PACKED_BITS", env)
        got = tuple(None if (li := backend.QuantLinear(w.codes, w.scales, w.offsets, w.group)).packed is None
                    else li.packed.bits for w in (q4, q5))
        assert got == want, env
    monkeypatch.delenv("GEMMA_SESSIONS_PACKED_BITS")
    assert backend.QuantLinear(q4.codes, q4.scales, q4.offsets, q4.group).packed.bits == 4  # 4 bits at least


@pytest.mark.parametrize("qtype", WIDTHS, ids=lambda t: t.name)
def test_the_compiled_packer_writes_the_torch_bytes(op, qtype):
    c = gguf_weight(qtype, 11, 256, seed=12).codes
    want = P.pack_codes(c)
    got = kernels.pack_codes_fast(c)
    assert (got.bits, got.bias) == (want.bits, want.bias) and torch.equal(got.data, want.data)


def test_quant_linear_packs_layers_not_the_head(op):
    w = gguf_weight(Q.Q4_K, 40, 256, seed=8)
    lin = backend.QuantLinear(w.codes, w.scales, w.offsets, w.group)
    head = backend.QuantLinear(w.codes, w.scales, w.offsets, w.group, head=True)
    assert lin.packed is not None and lin.packed.bits == 4 and lin.int8_codes is None
    assert head.packed is None and head.codes is w.codes
    assert lin.weight_bytes() == 40 * 256 // 2 + 2 * 40 * 8 * 4  # 4 bits a weight + scales and offsets
    g = torch.Generator().manual_seed(9)
    for m in ROWS:
        x = torch.randn(m, 256, generator=g)
        path = lin.plan(m)
        want = (kernels.qmatmul_wide if path == backend.WIDE else kernels.qmatmul)(x, w.codes, w.scales, w.offsets,
                                                                                  w.group)
        if path in (backend.EXACT, backend.WIDE):
            assert torch.equal(lin(x), want), (m, path)
    assert lin.int8_codes is None  # the packed paths made no int8 copy


def test_int8_only_kernels_get_a_counted_unpacked_copy(op, every_width):
    w = gguf_weight(Q.Q5_0, 16, 128, seed=10)
    lin = backend.QuantLinear(w.codes, w.scales, w.offsets, w.group)
    before = (backend.UNPACKED.count, backend.UNPACKED.bytes)
    assert torch.equal(lin.codes, w.codes) and lin.codes is lin.codes  # made once, kept
    assert (backend.UNPACKED.count, backend.UNPACKED.bytes) == (before[0] + 1, before[1] + 16 * 128)
    x = torch.randn(100, 128)
    ref = x @ w.dequantize().T
    assert ((lin._float32_tiles(x, 7) - ref).abs().max() / ref.abs().max()).item() < 1e-5  # reads lin.codes
    assert ((lin.bf16_gemm(x).float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_without_the_kernel_codes_stay_int8(monkeypatch, every_width):
    monkeypatch.setattr(kernels, "_state", {"error": "no compiler"})
    w = gguf_weight(Q.Q5_0, 8, 64, seed=11)
    lin = backend.QuantLinear(w.codes, w.scales, w.offsets, w.group)
    assert lin.packed is None and lin.codes is w.codes
    p = P.pack_codes(w.codes)
    x = torch.randn(2, 64)
    assert torch.equal(kernels.qmatmul_packed(x, p, w.scales, None, 32), kernels.qmatmul(x, w.codes, w.scales, None, 32))


def test_decode_stack_with_packed_products_is_bit_for_bit_the_int8_stack(op, every_width):
    """The tiny stack with packed codes (5 bits; offsets on some products) against the same stack run on its int8
    codes: the same hidden states and K/V, at the exact kernel's rows and (AVX2) at qmatmul_wide's."""
    spec = packed_stack()
    assert all(li.packed is not None for li in spec.products())
    for rows_exact in (64, 1):  # every product exact; or the many-row kernel (WIDE on AVX2, else BF16_DOT/I16)
        if rows_exact == 1 and not kernels.wide_available():
            continue
        x, cos, sin, kv, _, _ = step(spec)
        got = kernels.decode_stack(x, spec, kv, cos, sin, [], rows_exact)
        x, cos, sin, kv2, _, _ = step(spec)
        want = kernels.decode_stack(x, spec, kv2, cos, sin, [], rows_exact, spec.int8_args())
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(kv.flats, kv2.flats))


def packed_stack() -> kernels.StackSpec:
    """tiny_stack with every product's codes narrowed to [-16, 15] (so they pack in 5 bits)."""
    def narrow(li: backend.QuantLinear) -> backend.QuantLinear:
        return backend.QuantLinear((li.codes.to(torch.int16) % 32 - 16).to(torch.int8), li.scales, li.offsets,
                                   li.group)

    base = tiny_stack()
    layers = tuple(dataclasses.replace(ly, qkv=narrow(ly.qkv), o=narrow(ly.o), gate_up=narrow(ly.gate_up),
                                       down=narrow(ly.down)) for ly in base.layers)
    return kernels.StackSpec(layers=layers, final_norm=base.final_norm, eps=base.eps)
