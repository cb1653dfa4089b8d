"""The fused decode step's description of a model: what ``kernels.decode_stack`` runs, layer by layer.

Contract: a model describes its decoder once as a :class:`StackSpec` of :class:`LayerSpec` (products, norms, head
shapes, which layer's K/V each layer reads, RoPE table, activation, scalars: model math, no policy); the cache
describes a step's K/V as a :class:`StackKV` (where each layer's K/V live, which slots the rows write and read);
``kernels.decode_stack`` runs the two (``backend.DecodeStack`` adds the policy: which product kernel for how many
rows). No architecture is named here or in ``csrc/stack.h``: Gemma 1-3 use part of what a layer can say, Gemma 4 more
(per-layer head shapes, KV-shared layers, V from the k projection, a scale-free v norm, an output scalar). Not
described yet: Gemma 4's per-layer embeddings and MoE block (a model with them runs its layers one by one).

The C++ side reads a spec as tensor lists and two tables, one row per layer (the columns and flags below match
``csrc/stack.h``; the column counts are checked there)::

    spec   int64   flags | heads | kv_heads | head_dim | kv_layer | rope | activation | group x 4 (qkv o gate_up down)
                   | code bits x 4 (8: int8 codes; 4-6: packed, kernels/packed.py) | packed codes' bias x 4
    fspec  float64 attention scale | softcap (0: none) | output scalar
    weights        12 per layer: codes (int8 or packed), scales, offsets (empty: none) of qkv, o, gate_up, down
    norms          6 per layer: input, post-attention, pre-MLP, post-MLP, q, k scales (empty where the flag is off)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .backend import QuantLinear

# spec's columns and flags (csrc/stack.h: StackInt, StackFlag)
SPEC_COLS, FSPEC_COLS = 19, 3
(INPUT_NORM, POST_ATTN_NORM, PRE_MLP_NORM, POST_MLP_NORM, Q_NORM, K_NORM,  # flag 1 << i: the norm NORMS[i]
 V_NORM, SCALAR, V_IS_K) = (1 << i for i in range(9))
NORMS = ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm")  # flag 1 << index
GELU_TANH = "gelu_tanh"  # gelu_tanh(gate) * up over the gate_up product's [gate | up] (every Gemma's MLP)
ACTIVATIONS = (GELU_TANH,)  # csrc/stack.h: StackAct


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One decoder layer as ``decode_stack`` runs it (absent norms are skipped)::

        h = input_norm(x)
        q, k, v = split(qkv(h)); q, k = rope(q_norm(q)), rope(k_norm(k)); v = v_norm(v)   [N, heads | kv_heads, D]
                                        (v_is_k: qkv is [q | k], v the raw k, before k_norm and RoPE)
        this layer's K/V slots <- k, v          (kv_source set: qkv is q only; it reads that layer's K/V, writes none)
        x = x + post_attn_norm(o(attention(q, K, V, attn_scale, softcap)));  h = pre_mlp_norm(x)
        x = x + post_mlp_norm(down(gelu_tanh(gate) * up));  x = x * out_scalar

    Attributes:
        qkv, o, gate_up, down: the products (``backend.QuantLinear``: int8 or packed codes, scales, offsets, group;
            the wide layouts are made from them on need). qkv is ``[(heads + 2 kv_heads) head_dim, hidden]``: q, k, v heads
            (``v_is_k``: q, k; ``kv_source``: q only).
        heads, kv_heads, head_dim: this layer's shapes (kv_heads: those it reads, for a KV-shared layer its source's).
        rope: index of this layer's table among the step's cos/sin tables ``[N, head_dim]``.
        attn_scale, softcap: scores are ``q.k * attn_scale``, then ``softcap * tanh(s / softcap)`` unless None.
        *_norm: the norms' multipliers (Gemma's precomputed ``1 + w``), or None where the layer has none.
        v_norm: RMSNorm of v over head_dim without a multiplier.
        v_is_k: no v projection; V is the k projection before k_norm and RoPE (Gemma 4's attention_k_eq_v).
        kv_source: None (the layer writes and reads its own K/V), or an earlier layer whose K/V it reads.
        out_scalar: the residual stream's multiplier after the layer, or None.
    """

    qkv: QuantLinear
    o: QuantLinear
    gate_up: QuantLinear
    down: QuantLinear
    heads: int
    kv_heads: int
    head_dim: int
    rope: int
    attn_scale: float
    softcap: float | None = None
    input_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    pre_mlp_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    v_norm: bool = False
    v_is_k: bool = False
    kv_source: int | None = None
    activation: str = GELU_TANH
    out_scalar: float | None = None

    @property
    def products(self) -> tuple[QuantLinear, QuantLinear, QuantLinear, QuantLinear]:
        return self.qkv, self.o, self.gate_up, self.down

    def flags(self) -> int:
        f = sum(1 << i for i, name in enumerate(NORMS) if getattr(self, name) is not None)
        f |= (V_NORM if self.v_norm else 0) | (V_IS_K if self.v_is_k else 0)
        return f | (SCALAR if self.out_scalar is not None else 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackSpec:
    """A decoder as ``decode_stack`` runs it: its layers, the final norm and the norms' epsilon. The C++ arguments
    (``weights``, ``norms``, ``spec``, ``fspec``) are derived once, at construction.

    Example::

        spec = StackSpec(layers=(LayerSpec(qkv=..., o=..., gate_up=..., down=..., heads=4, kv_heads=1,
                                           head_dim=256, rope=0, attn_scale=256 ** -0.5, input_norm=s0, ...), ...),
                         final_norm=scale, eps=1e-6)
    """

    layers: tuple[LayerSpec, ...]
    final_norm: torch.Tensor
    eps: float
    weights: list[torch.Tensor] = dataclasses.field(init=False, repr=False)
    norms: list[torch.Tensor] = dataclasses.field(init=False, repr=False)
    spec: torch.Tensor = dataclasses.field(init=False, repr=False)
    fspec: torch.Tensor = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.layers)
        empty = torch.empty(0, device=self.final_norm.device)
        weights, norms, rows, frows = [], [], [], []
        for i, ly in enumerate(self.layers):
            for li in ly.products:
                codes = li.codes if li.packed is None else li.packed.data
                weights += [codes, li.scales, li.offsets if li.offsets is not None else empty]
            norms += [t if t is not None else empty for t in (getattr(ly, name) for name in NORMS)]
            rows.append([ly.flags(), ly.heads, ly.kv_heads, ly.head_dim, i if ly.kv_source is None else ly.kv_source,
                         ly.rope, ACTIVATIONS.index(ly.activation), *(li.group for li in ly.products),
                         *(8 if li.packed is None else li.packed.bits for li in ly.products),
                         *(0 if li.packed is None else li.packed.bias for li in ly.products)])
            frows.append([ly.attn_scale, ly.softcap or 0.0, 1.0 if ly.out_scalar is None else ly.out_scalar])
        # derived fields of a frozen instance, set once here and never after
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "norms", norms)
        object.__setattr__(self, "spec", torch.tensor(rows, dtype=torch.int64).view(len(rows), SPEC_COLS))
        object.__setattr__(self, "fspec", torch.tensor(frows, dtype=torch.float64).view(len(rows), FSPEC_COLS))

    def products(self) -> list[QuantLinear]:
        """Every layer's four products, in order (what the policy asks about, and the wide layouts' order)."""
        return [li for ly in self.layers for li in ly.products]

    def int8_args(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``weights`` and ``spec`` with every product's int8 codes (packed ones unpacked: ``QuantLinear.codes``,
        made on first need), for the kernels that read int8 only (``qmatmul_bf16``)."""
        weights = list(self.weights)
        for j, li in enumerate(self.products()):
            weights[3 * j] = li.codes
        table = self.spec.clone()
        table[:, 11:15], table[:, 15:19] = 8, 0
        return weights, table


def _check(layers: tuple[LayerSpec, ...]) -> None:
    """What the C++ side also refuses, said in Python terms."""
    if not layers:
        raise ValueError("a stack needs at least one layer")
    for i, ly in enumerate(layers):
        if ly.activation not in ACTIVATIONS:
            raise ValueError(f"layer {i}: unknown activation {ly.activation!r}")
        if ly.kv_source is None:
            if (ly.q_norm is None) != (ly.k_norm is None):
                raise ValueError(f"layer {i}: q and k norms come together")
            continue
        src = layers[ly.kv_source] if 0 <= ly.kv_source < i else None
        if src is None or src.kv_source is not None:
            raise ValueError(f"layer {i}: kv_source {ly.kv_source} is not an earlier layer with K/V of its own")
        if (src.kv_heads, src.head_dim) != (ly.kv_heads, ly.head_dim) or ly.k_norm is not None or ly.v_norm \
                or ly.v_is_k:
            raise ValueError(f"layer {i}: reads layer {ly.kv_source}'s K/V: the same kv heads and head_dim, and it "
                             "makes no K/V (no k norm, v norm or v_is_k)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackKV:
    """A decode step's K/V as ``decode_stack`` reads and writes it (the cache's part; one new token per row).

    ``flats[f]`` are ``[S, kv_heads, head_dim]`` slot tensors; layer l's K at slot s is
    ``flats[layer_flat[l]][s + off_k[l]]``, its V ``... [s + off_v[l]]``, and it uses the tables of KV group
    ``layer_group[l]``: ``write[g]`` the rows' new slots ``[B]``; ``table[g] [B, P]``, ``start[g]``, ``lengths[g]``
    what each row sees (``kernels.decode_attention``: slot = ``table[b, pos // block] * page_stride[f] +
    pos % block``). A KV-shared layer's entries are not read (it reads its source's).
    """

    flats: tuple[torch.Tensor, ...]
    layer_flat: tuple[int, ...]
    off_k: tuple[int, ...]
    off_v: tuple[int, ...]
    layer_group: tuple[int, ...]
    write: tuple[torch.Tensor, ...]
    table: tuple[torch.Tensor, ...]
    start: tuple[torch.Tensor, ...]
    lengths: tuple[torch.Tensor, ...]
    block: int
    page_stride: tuple[int, ...]

    @classmethod
    def from_stack_args(cls, args: dict) -> StackKV:
        """From the engine's ``PagedBatch.stack_args()`` dict (one ``flat``; its ``scale`` and ``softcap`` are the
        model's, which the spec carries).

        NOTE: an adapter while the cache hands out that dict; it goes once ``stack_args`` returns a StackKV."""
        n = len(args["off_k"])
        return cls(flats=(args["flat"],), layer_flat=(0,) * n, off_k=tuple(args["off_k"]), off_v=tuple(args["off_v"]),
                   layer_group=tuple(args["layer_group"]), write=tuple(args["write"]), table=tuple(args["table"]),
                   start=tuple(args["start"]), lengths=tuple(args["lengths"]), block=args["block"],
                   page_stride=(args["page_stride"],))

    def layout(self) -> list[int]:
        """``csrc/stack.h``'s kv list: (flat, off_k, off_v, group) per layer."""
        return [v for row in zip(self.layer_flat, self.off_k, self.off_v, self.layer_group) for v in row]
