"""kernels.decode_stack from a model-agnostic description (kernels/stack.py): a tiny stack that uses what Gemma 1-3
do not (per-layer head_dim and kv heads, two K/V page shapes, KV-shared layers, V from the k projection, a scale-free
v norm, an output scalar, layers without post-norms or without input / pre-MLP norms, per-layer attention scale and
soft-cap) against a plain torch reference written here; and the description's checks. (Gemma 1-3 through
GemmaModel.stack_spec: tests/unit/test_engine.py, the stack against the layer loop, bit for bit.)"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gemma_sessions import kernels
from gemma_sessions.kernels import backend
from gemma_sessions.kernels.stack import LayerSpec, StackKV, StackSpec

HIDDEN, INTER, GROUP, EPS, BLOCK = 64, 64, 32, 1e-6, 4
PAST = (5, 9, 2)  # tokens each row has before the step's one


def product(g: torch.Generator, n: int, k: int, offsets: bool = False) -> backend.QuantLinear:
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.005
    off = torch.randn(n, k // GROUP, generator=g) * 0.02 if offsets else None
    return backend.QuantLinear(codes, scales, off, GROUP)


def norm(g: torch.Generator, n: int) -> torch.Tensor:
    return 1 + torch.randn(n, generator=g) * 0.2


def tiny_stack(seed: int = 0) -> StackSpec:
    """Four layers over two K/V shapes: 0 (head_dim 16, 2 kv heads) and 1 (head_dim 32, 1 kv head; V is its k
    projection) write their own K/V with q/k norms and a v norm; 2 reads layer 0's K/V, 3 layer 1's (q only)."""
    g = torch.Generator().manual_seed(seed)

    def layer(heads, kv_heads, d, **kw) -> LayerSpec:
        made = 0 if kw.get("kv_source") is not None else kv_heads if kw.get("v_is_k") else 2 * kv_heads
        return LayerSpec(qkv=product(g, (heads + made) * d, HIDDEN, offsets=made > 0),
                         o=product(g, HIDDEN, heads * d), gate_up=product(g, 2 * INTER, HIDDEN, offsets=True),
                         down=product(g, HIDDEN, INTER), heads=heads, kv_heads=kv_heads, head_dim=d, **kw)

    full = dict(input_norm=norm(g, HIDDEN), post_attn_norm=norm(g, HIDDEN), pre_mlp_norm=norm(g, HIDDEN),
                post_mlp_norm=norm(g, HIDDEN))
    layers = (
        layer(4, 2, 16, rope=0, attn_scale=1.0, q_norm=norm(g, 16), k_norm=norm(g, 16), v_norm=True, **full),
        layer(2, 1, 32, rope=1, attn_scale=0.3, softcap=2.0, q_norm=norm(g, 32), k_norm=norm(g, 32), v_norm=True,
              v_is_k=True, input_norm=norm(g, HIDDEN), pre_mlp_norm=norm(g, HIDDEN), out_scalar=0.7),  # no post-norms
        layer(4, 2, 16, rope=0, attn_scale=0.5, kv_source=0, q_norm=norm(g, 16), out_scalar=1.3, **full),
        layer(2, 1, 32, rope=1, attn_scale=0.2, softcap=3.0, kv_source=1),  # no norm at all
    )
    return StackSpec(layers=layers, final_norm=norm(g, HIDDEN), eps=EPS)


def rope_tables(positions: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and rotate_half's signed sin, [T, d] (the model's Rope layout)."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = positions.float()[:, None] * inv[None]
    return torch.cat((f.cos(), f.cos()), -1), torch.cat((-f.sin(), f.sin()), -1)


TABLES = ((16, 10_000.0), (32, 1_000_000.0))  # LayerSpec.rope -> (head_dim, theta)


def rms(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), scale, EPS)


def reference(spec: StackSpec, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One sequence [T, hidden] through the stack in plain torch, causal: (final-normed hidden [T, hidden],
    {layer: (K, V)} of the layers that write K/V, [T, kv_heads, d] each)."""
    t = x.shape[0]
    tables = [rope_tables(torch.arange(t), d, theta) for d, theta in TABLES]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, ly in enumerate(spec.layers):
        d, hq, hkv = ly.head_dim, ly.heads, ly.kv_heads
        cos, sin = (tab[:, None] for tab in tables[ly.rope])
        rope = lambda z: z * cos + z.roll(d // 2, dims=-1) * sin  # noqa: E731 - rotate_half with signed sin
        h = rms(x, ly.input_norm) if ly.input_norm is not None else x
        p = kernels.qmatmul_reference(h, ly.qkv.codes, ly.qkv.scales, ly.qkv.offsets, GROUP)
        q = p[:, :hq * d].view(t, hq, d)
        q = rope(rms(q, ly.q_norm) if ly.q_norm is not None else q)
        if ly.kv_source is None:
            k = p[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
            v = k if ly.v_is_k else p[:, (hq + hkv) * d:].view(t, hkv, d)  # the raw k: before its norm and RoPE
            k = rope(rms(k, ly.k_norm) if ly.k_norm is not None else k)
            kv[i] = k, (rms(v, None) if ly.v_norm else v)
        k, v = kv[i if ly.kv_source is None else ly.kv_source]
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # query head h: kv head h // g
        s = torch.einsum("qhd,khd->hqk", q, k) * ly.attn_scale
        if ly.softcap is not None:
            s = torch.tanh(s / ly.softcap) * ly.softcap
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, hq * d)
        a = kernels.qmatmul_reference(att, ly.o.codes, ly.o.scales, ly.o.offsets, GROUP)
        x = x + (rms(a, ly.post_attn_norm) if ly.post_attn_norm is not None else a)
        h = rms(x, ly.pre_mlp_norm) if ly.pre_mlp_norm is not None else x
        gu = kernels.qmatmul_reference(h, ly.gate_up.codes, ly.gate_up.scales, ly.gate_up.offsets, GROUP)
        act = F.gelu(gu[:, :INTER], approximate="tanh") * gu[:, INTER:]
        m = kernels.qmatmul_reference(act, ly.down.codes, ly.down.scales, ly.down.offsets, GROUP)
        x = x + (rms(m, ly.post_mlp_norm) if ly.post_mlp_norm is not None else m)
        if ly.out_scalar is not None:
            x = x * ly.out_scalar
    return rms(x, spec.final_norm), kv


def paged(spec: StackSpec, refs: list, pages: int = 16) -> tuple[StackKV, list[torch.Tensor]]:
    """A step's K/V: flat 0 holds layer 0 (group 0), flat 1 layer 1 (group 1), one layer per page (K then V: page
    stride 2 * BLOCK), rows' pages scattered. Every position but each row's last filled from the reference; returns
    the StackKV and the flats as they must be after the step (the last positions written too)."""
    flats = [torch.zeros(pages * 2 * BLOCK, ly.kv_heads, ly.head_dim) for ly in spec.layers[:2]]
    after = [f.clone() for f in flats]
    write, table, start, lengths = [], [], [], []
    for g in range(2):
        rows_pages = [[(7 * b + 3 * j + 5 * g) % pages for j in range(math.ceil((n + 1) / BLOCK))]
                      for b, n in enumerate(PAST)]
        width = max(map(len, rows_pages))
        table.append(torch.tensor([p + [0] * (width - len(p)) for p in rows_pages]))
        start.append(torch.zeros(len(PAST), dtype=torch.long))
        lengths.append(torch.tensor([n + 1 for n in PAST]))
        write.append(torch.tensor([p[n // BLOCK] * 2 * BLOCK + n % BLOCK for p, n in zip(rows_pages, PAST)]))
        for b, (p, n) in enumerate(zip(rows_pages, PAST)):
            k, v = refs[b][1][g]
            for pos in range(n + 1):
                slot = p[pos // BLOCK] * 2 * BLOCK + pos % BLOCK
                for dst in (flats[g], after[g]) if pos < n else (after[g],):
                    dst[slot], dst[slot + BLOCK] = k[pos], v[pos]
    n = len(spec.layers)
    kv = StackKV(flats=tuple(flats), layer_flat=(0, 1, 0, 1), off_k=(0,) * n, off_v=(BLOCK,) * n,
                 layer_group=(0, 1, 0, 1), write=tuple(write), table=tuple(table), start=tuple(start),
                 lengths=tuple(lengths), block=BLOCK, page_stride=(2 * BLOCK, 2 * BLOCK))
    return kv, after


def step(spec: StackSpec, seed: int = 1):
    """The rows' inputs, the reference per row, and decode_stack's arguments for the rows' last tokens."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n + 1, HIDDEN, generator=g) for n in PAST]
    refs = [reference(spec, x) for x in xs]
    kv, after = paged(spec, refs)
    pos = torch.tensor(PAST)
    cos, sin = zip(*(rope_tables(pos, d, theta) for d, theta in TABLES))
    x = torch.stack([x[-1] for x in xs])
    want = torch.stack([h[-1] for h, _ in refs])
    return x, list(cos), list(sin), kv, after, want


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_a_described_stack_computes_the_torch_reference(op):
    """Per-layer shapes over two flats, KV-shared layers, V as k, the v norm, the output scalar, absent norms: the
    hidden states and the K/V the step writes (only the layers with K/V of their own write) agree with plain torch to
    float32 rounding."""
    spec = tiny_stack()
    x, cos, sin, kv, after, want = step(spec)
    h = kernels.decode_stack(x, spec, kv, cos, sin, [], exact_rows=64)
    assert h.shape == want.shape and rel_err(h, want) <= 1e-5
    for got, ref in zip(kv.flats, after):
        assert rel_err(got, ref) <= 1e-5
        assert torch.equal(got == 0, ref == 0)  # no slot written that the reference leaves alone


MUTANTS = {
    "without the v norm": lambda ly, i: dataclasses.replace(ly, v_norm=False) if i == 0 else ly,
    "without the scalar": lambda ly, i: dataclasses.replace(ly, out_scalar=None) if i == 1 else ly,
    "with another scale": lambda ly, i: dataclasses.replace(ly, attn_scale=0.1) if i == 2 else ly,
    "without the softcap": lambda ly, i: dataclasses.replace(ly, softcap=None) if i == 3 else ly,
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_each_feature_changes_the_result(op, mutant):
    """The comparison above can fail: the reference without one of the features is far from the kernel's result
    (at least 1e-3 where the kernel and the reference agree to ~1e-6)."""
    spec = tiny_stack()
    x, cos, sin, kv, _, want = step(spec)
    h = kernels.decode_stack(x, spec, kv, cos, sin, [], exact_rows=64)
    other = dataclasses.replace(spec, layers=tuple(MUTANTS[mutant](ly, i) for i, ly in enumerate(spec.layers)))
    assert rel_err(h, step(other)[-1]) > 1e-3


def test_the_description_is_checked_in_python_and_in_the_kernel(op):
    spec = tiny_stack()
    layers = list(spec.layers)
    with pytest.raises(ValueError, match="kv_source 3"):
        StackSpec(layers=(*layers[:2], dataclasses.replace(layers[2], kv_source=3), layers[3]),
                  final_norm=spec.final_norm, eps=EPS)
    with pytest.raises(ValueError, match="same kv heads"):
        StackSpec(layers=(*layers[:3], dataclasses.replace(layers[3], kv_source=0)), final_norm=spec.final_norm,
                  eps=EPS)
    with pytest.raises(ValueError, match="q and k norms"):
        StackSpec(layers=(dataclasses.replace(layers[0], k_norm=None), *layers[1:]), final_norm=spec.final_norm,
                  eps=EPS)
    x, cos, sin, kv, _, _ = step(spec)
    bad = spec.spec.clone()
    bad[2, 4] = 3  # layer 2 reads a later layer's K/V
    with pytest.raises(RuntimeError, match="not an earlier one"):
        kernels._ops().decode_stack.default(x, spec.weights, [], spec.norms, spec.final_norm, bad, spec.fspec, EPS,
                                            cos, sin, kv.flats, kv.layout(), kv.write, kv.table, kv.start,
                                            kv.lengths, BLOCK, kv.page_stride, 64)
    bad = spec.spec.clone()
    bad[1, 0] |= 2  # a post-attention norm flagged where the list has none
    with pytest.raises(RuntimeError, match="flagged but absent"):
        kernels._ops().decode_stack.default(x, spec.weights, [], spec.norms, spec.final_norm, bad, spec.fspec, EPS,
                                            cos, sin, kv.flats, kv.layout(), kv.write, kv.table, kv.start,
                                            kv.lengths, BLOCK, kv.page_stride, 64)
    wrong = dataclasses.replace(kv, layer_flat=(1, 1, 0, 1))  # layer 0's K/V in the other shape's flat
    with pytest.raises(RuntimeError, match="its flat is not"):
        kernels.decode_stack(x, spec, wrong, cos, sin, [], exact_rows=64)


def test_q_norm_rope_is_qk_norm_ropes_q(op):
    """The q-only pass of a KV-shared layer gives qk_norm_rope's q bits (the same arithmetic per head)."""
    g = torch.Generator().manual_seed(5)
    n, hq, hkv, d = 3, 4, 2, 32
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g)
    qs, ks = norm(g, d), norm(g, d)
    cos, sin = rope_tables(torch.tensor([0, 7, 100]), d, 10_000.0)
    for scales in ((qs, ks), (None, None)):
        q, _, _ = kernels.qk_norm_rope(qkv, *scales, cos, sin, hq, hkv, EPS)
        assert torch.equal(kernels.q_norm_rope(qkv[:, :hq * d], scales[0], cos, sin, hq, EPS), q)
