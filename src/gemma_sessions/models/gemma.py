"""Gemma 1, 2 and 3 text decoders in plain PyTorch, in one readable file.

Contract: token ids and positions in, hidden states / logits out. The model never sees a session or a cache
layout: attention reads and writes KV through a ``KVBatch`` object (``attend(layer, q, k, v) -> out``), so the
same layers run a single dense sequence (``DenseKV``, used by ``forward`` and ``generate``) and the engine's
paged, continuously batched steps. Tokens of every sequence in a step are flattened into one ``[N, hidden]``
matrix, so every projection is one matrix product whatever the batch.

Every numerical quirk is commented where it happens, with the transformers module that does the same
(``transformers/models/gemma3/modeling_gemma3.py`` unless named otherwise).
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import SLIDING, ModelConfig
from ..kernels import backend
from . import quant

# ------------------------------------------------------------------------------------------------ linear layers


class FloatLinear(nn.Module):
    """A bias-free projection with a float32 or bfloat16 weight ``[out, in]``."""

    int8 = False

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, in] -> [N, out], same dtype as x
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def greedy_ready(self) -> bool:
        return False

    def weight_bytes(self) -> int:
        """Bytes of weight read per product."""
        return self.weight.numel() * self.weight.element_size()


def Linear(weight: torch.Tensor | quant.QuantWeight, weight_format: str, *,  # noqa: N802 - builds a layer
           head: bool = False) -> FloatLinear | backend.QuantLinear:
    """A bias-free projection ``y = x @ W^T`` in the model's weight format.

    ``float32`` and ``bfloat16`` hold W as such (a ``QuantWeight`` is dequantized). ``int8`` holds grouped int8
    ``W[n, k] = scales[n, k // G] * codes[n, k] + offsets[n, k // G]`` (models/quant.py): GGUF block types are
    converted EXACTLY (the weight equals the float32 mode's dequantization); float weights are quantized symmetric
    int8 per 32 (lossy). The kernel backend's ``QuantLinear`` computes it, choosing its kernel per row count;
    ``head=True`` marks the tied LM head (its own row policy and the engine's greedy head).

    Example::

        lin = Linear(quant.quantize_symmetric(w), "int8")   # or a QuantWeight from quant.from_gguf
        y = lin(x)                                           # x: [N, in] float32 -> [N, out] float32
    """
    if weight_format == "int8":
        qw = weight if isinstance(weight, quant.QuantWeight) else quant.quantize_symmetric(weight)
        return backend.QuantLinear(qw.codes, qw.scales, qw.offsets, qw.group, head=head)
    if isinstance(weight, quant.QuantWeight):
        weight = weight.dequantize()
    return FloatLinear(weight, torch.bfloat16 if weight_format == "bfloat16" else torch.float32)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in float32, cast back.

    Gemma stores ``w`` as an offset from 1 (``Gemma3RMSNorm.forward``: ``output * (1.0 + self.weight.float())``;
    google/gemma_pytorch model.py RMSNorm). GGUF files hold ``1 + w`` (llama.cpp's converter adds the 1);
    weights.py subtracts it on load so this module always sees the Hugging Face convention.
    """

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("scale", 1.0 + weight.float())  # (1 + w), precomputed once
        self.eps = eps
        # fused (the int8 mode): one compiled pass instead of ~6 torch ops, faster at every size (rounding may
        # differ in the last bit, so the exact float32 and bfloat16 modes keep F.rms_norm)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":
            return kernels.rms_norm(x, self.scale, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


# ------------------------------------------------------------------------------------------------ attention


class KVBatch(Protocol):
    """What a layer needs from a KV cache for one forward step over N flattened tokens."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v ([N, Hkv, D]) for these tokens, attend q ([N, Hq, D]) over each token's visible keys."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              softcap: float | None) -> torch.Tensor:
    """Masked multi-query / grouped-query attention, eager (the transformers ``eager_attention_forward`` math).

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, L, D]; mask: bool [B, T, L], True where a query may see a key (None:
        all may).
    Returns:
        [B, Hq, T, D]
    """
    dt = backend.matmul_dtype(q.dtype, q.device)
    if dt != q.dtype:  # bf16 matmuls this CPU would run in software: the same math in float32, rounded back
        return attention(q.to(dt), k.to(dt), v.to(dt), mask, scale, softcap).to(q.dtype)
    b, hq, t, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g = hq // hkv
    # GQA/MQA: query head h uses kv head h // g (transformers' repeat_kv repeats each kv head g times in a row),
    # so folding the g query heads of one kv head into the row axis needs no copy of K or V.
    q = q.reshape(b, hkv, g * t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, g*T, L]
    if softcap is not None:  # Gemma 2 attention logit soft-capping: cap * tanh(s / cap) (modeling_gemma2.py)
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # None: every key is visible to every query (a decode step of a dense cache)
        m = mask[:, None, None].expand(b, 1, g, t, kv_len).reshape(b, 1, g * t, kv_len)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # softmax upcast to float32, as transformers does
    return torch.matmul(probs, v).reshape(b, hq, t, d)


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [Tq, Tk]: causal, and for sliding layers only keys with ``k > q - window``.

    transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window`` (the query sees itself and the
    window - 1 tokens before it).
    """
    m = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        m &= k_pos[None, :] > q_pos[:, None] - window
    return m


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Gemma uses the "rotate half" (GPT-NeoX) RoPE layout; GGUF Gemma weights are not permuted (unlike Llama).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ROPE_BLOCK = 256  # positions per computed block of the RoPE tables (Rope._half_tables)


class Rope:
    """Cos/sin tables per layer kind. Gemma 3: base 10k on sliding layers, 1M on global ones, and linear scaling
    (x8) on global layers of 4B and up (``Gemma3RotaryEmbedding`` with per-layer-type ``rope_parameters``)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        d = config.head_dim
        self.inv_freq: dict[tuple[float, float], torch.Tensor] = {}
        self.layer_key = []
        for i in range(config.num_layers):
            key = (config.rope_theta(i), config.rope_scaling(i))
            if key not in self.inv_freq:
                theta, factor = key
                inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
                self.inv_freq[key] = (inv / factor).to(device)  # linear scaling divides the frequencies
            self.layer_key.append(key)
        self._tables: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}
        self._grow = threading.Lock()

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{key: (cos, signed sin)}, each [N, 1, D], computed in float32 then cast (as transformers does).

        The sin table carries rotate_half's sign: ``rotate_half(x) * sin == roll(x, D/2) * cat(-sin1, sin2)`` bit
        for bit (negation is exact), so :func:`apply_rope` needs one roll instead of chunk, neg and cat.
        """
        top = int(positions.max()) + 1 if positions.numel() else 0
        out = {}
        for key in self.inv_freq:
            cos_half, sin_half = self._half_tables(key, top)
            cos, sin = cos_half[positions], sin_half[positions]
            out[key] = (torch.cat((cos, cos), dim=-1).to(dtype)[:, None, :],
                        torch.cat((-sin, sin), dim=-1).to(dtype)[:, None, :])
        return out

    def _half_tables(self, key, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``position * inv_freq`` ([P, D/2] float32) for positions [0, P), P >= top.

        Kept and grown ROPE_BLOCK positions at a time, each block by one call: a position's value never depends on
        which step asked for it, and a decode step does no trig. (torch's float32 sin/cos go to MKL's vector math,
        which starts an OpenMP region even for one position; its worker then spins into the step's kernels.)
        Memory: D x 4 bytes per position per key (64 MB for the 270M's 32k context with both kinds).
        """
        tabs = self._tables.get(key)
        if tabs is not None and tabs[0].shape[0] >= top:
            return tabs
        with self._grow:
            tabs = self._tables.get(key)
            have = 0 if tabs is None else tabs[0].shape[0]
            if have >= top:
                return tabs
            want = max(top, 2 * have)
            blocks = []
            for start in range(have, want, ROPE_BLOCK):
                freqs = torch.arange(start, start + ROPE_BLOCK, device=self.inv_freq[key].device).float()[:, None] \
                    * self.inv_freq[key][None, :]
                blocks.append((freqs.cos(), freqs.sin()))
            new = (torch.cat(([tabs[0]] if tabs else []) + [c for c, _ in blocks]),
                   torch.cat(([tabs[1]] if tabs else []) + [s for _, s in blocks]))
            self._tables[key] = new
            return new


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * (-1 | +1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin  # x: [N, H, D]; tables: [N, 1, D]


# ------------------------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v share one fused matrix product: one weight read, one kernel launch per layer.
        self.qkv = Linear(cat_rows([w["q_proj"], w["k_proj"], w["v_proj"]]), fmt)
        self.o_proj = Linear(w["o_proj"], fmt)
        fused = fmt == "int8"
        self.q_norm = RMSNorm(w["q_norm"], config.rms_norm_eps, fused) if config.has_qk_norm else None
        self.k_norm = RMSNorm(w["k_norm"], config.rms_norm_eps, fused) if config.has_qk_norm else None
        # Scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (Gemma 2/3 config); Gemma 1
        # uses head_dim ** -0.5 (config.py sets query_pre_attn_scalar = head_dim for it).
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.fused, self.eps = fused, config.rms_norm_eps

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: KVBatch) -> torch.Tensor:
        n = x.shape[0]  # x: [N, hidden]
        if self.fused and x.device.type == "cpu" and kernels.available():  # split, q/k norms, RoPE in one pass
            qs, ks = (self.q_norm.scale, self.k_norm.scale) if self.q_norm is not None else (None, None)
            q, k, v = kernels.qk_norm_rope(self.qkv(x), qs, ks, rope[0].view(n, self.d), rope[1].view(n, self.d),
                                           self.hq, self.hkv, self.eps)
            return self.o_proj(kv.attend(self.layer, q, k, v).reshape(n, self.hq * self.d))
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(n, self.hq, self.d), k.view(n, self.hkv, self.d), v.view(n, self.hkv, self.d)
        if self.q_norm is not None:  # Gemma 3: RMSNorm over head_dim on q and k, before RoPE (Gemma3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = kv.attend(self.layer, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.inter = w["gate_proj"].shape[0]
        self.gate_up = Linear(cat_rows([w["gate_proj"], w["up_proj"]]), fmt)  # fused, like qkv
        self.down_proj = Linear(w["down_proj"], fmt)
        self.fused = fmt == "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeGLU with the tanh approximation of GELU (hidden_activation="gelu_pytorch_tanh" in every Gemma).
        if self.fused:  # the int8 mode: the activation as one compiled pass between the products (same math)
            out = backend.geglu_mlp(self.gate_up, self.down_proj, x)
            if out is not None:
                return out
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        eps, fused = config.rms_norm_eps, fmt == "int8"
        self.attn = Attention(config, layer, w, fmt)
        self.mlp = MLP(w, fmt)
        self.input_norm = RMSNorm(w["input_layernorm"], eps, fused)
        if config.has_post_norms:
            # Gemma 2/3: four norms per layer, "sandwiching" both attention and MLP (Gemma2DecoderLayer).
            self.post_attn_norm = RMSNorm(w["post_attention_layernorm"], eps, fused)
            self.pre_mlp_norm = RMSNorm(w["pre_feedforward_layernorm"], eps, fused)
            self.post_mlp_norm = RMSNorm(w["post_feedforward_layernorm"], eps, fused)
        else:
            # Gemma 1: two norms; its pre-MLP norm is named post_attention_layernorm in transformers.
            self.post_attn_norm = None
            self.pre_mlp_norm = RMSNorm(w["post_attention_layernorm"], eps, fused)
            self.post_mlp_norm = None

    def forward(self, x: torch.Tensor, rope: tuple, kv: KVBatch) -> torch.Tensor:
        h = self.attn(self.input_norm(x), rope, kv)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class GemmaModel(nn.Module):
    """The decoder stack. Build with :func:`GemmaModel.from_tensors`; run with :meth:`hidden` and :meth:`logits`.

    Example::

        kv = DenseKV(model, max_len=64)
        h = model.hidden(ids, torch.arange(len(ids)), kv)    # [T, hidden]
        logits = model.logits(h[-1:])                         # [1, vocab]
    """

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], weight_format: str,
                 device: torch.device):
        super().__init__()
        self.config = config
        self.weight_format = weight_format
        # Compute dtype: bfloat16 in the bf16 mode; float32 otherwise (the int8 mode keeps the residual stream in
        # float32; its decode products take float32 input, its prefill GEMMs bf16, see kernels/backend.py).
        self.dtype = torch.bfloat16 if weight_format == "bfloat16" else torch.float32
        self.device = device
        self.embed = Linear(tensors["embed_tokens"], weight_format, head=True)  # tied: also the LM head
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, _layer_tensors(tensors, i), weight_format) for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["norm"], config.rms_norm_eps, weight_format == "int8")
        self.rope = Rope(config, device)
        # Embeddings are scaled by sqrt(hidden_size), the scale cast to the compute dtype first
        # (Gemma3TextScaledWordEmbedding: ``embed_scale.to(self.weight.dtype)``; gemma_pytorch "normalizer").
        self.embed_scale = torch.tensor(math.sqrt(config.hidden_size), dtype=self.dtype, device=device)
        self._stack: backend.DecodeStack | None = None  # hidden_decode_stack's, made on first use
        self._product_list: list | None = None  # every layer's four products, in order (a plain list, not modules)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [N] -> [N, hidden]
        e = self.embed
        if e.int8:
            rows = quant.dequantize_rows(quant.QuantWeight(codes=e.codes, scales=e.scales, offsets=e.offsets,
                                                           group=e.group), ids)
        else:
            rows = e.weight[ids]
        return rows.to(self.dtype) * self.embed_scale

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVBatch) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] for N flattened tokens at the given absolute positions."""
        x = self.embed_tokens(ids)
        tables = self.rope.tables(positions, self.dtype)
        if self.weight_format == "int8" and x.device.type == "cpu" and kernels.available():
            return self._hidden_fused(x, tables, kv)
        for layer in self.layers:
            x = layer(x, tables[self.rope.layer_key[layer.attn.layer]], kv)
        return self.norm(x)

    def _hidden_fused(self, x: torch.Tensor, tables: dict, kv: KVBatch) -> torch.Tensor:
        """The fast mode's layer loop: each residual step (add the normed branch, then the next norm, which is the
        next layer's input norm or the final norm) is one compiled pass (``kernels.add_rms_norm``). The same math as
        ``DecoderLayer.forward``, in ~8 ops per layer instead of ~35 (fewer dispatches and temporaries per step)."""
        eps, layers = self.config.rms_norm_eps, self.layers
        h = layers[0].input_norm(x)
        for i, layer in enumerate(layers):
            a = layer.attn(h, tables[self.rope.layer_key[i]], kv)
            post = layer.post_attn_norm.scale if layer.post_attn_norm is not None else None
            x, h = kernels.add_rms_norm(x, a, post, layer.pre_mlp_norm.scale, eps)
            m = layer.mlp(h)
            post = layer.post_mlp_norm.scale if layer.post_mlp_norm is not None else None
            nxt = layers[i + 1].input_norm.scale if i + 1 < len(layers) else self.norm.scale
            x, h = kernels.add_rms_norm(x, m, post, nxt, eps)
        return h

    def can_decode_stack(self, rows: int) -> bool:
        """Whether :meth:`hidden_decode_stack` applies to a decode step of this many rows: the fast mode on the CPU,
        and the kernel backend runs every product of the step with one of the stack's kernels
        (``backend.DecodeStack.plan``)."""
        if not (self.weight_format == "int8" and self.device.type == "cpu" and kernels.available()):
            return False
        return self._decode_stack().plan(rows) is not None

    def _decode_stack(self) -> backend.DecodeStack:
        if self._stack is None:
            self._stack = backend.DecodeStack(self.stack_spec())
        return self._stack

    def _products(self) -> list:
        if self._product_list is None:
            self._product_list = [li for layer in self.layers for li in (
                layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]
        return self._product_list

    def prepare_i16(self) -> None:
        """Make every layer product's int16 layout now where the backend runs it (the engine calls it at start, so
        the first batched step does not pay for it)."""
        for li in self._products():
            if li.int8 and li.plan(backend.QMATMUL_MAX_ROWS + 1) == backend.I16:
                li.prepare_i16()

    def stack_spec(self) -> kernels.StackSpec:
        """This decoder as ``kernels.decode_stack`` runs it (the fast mode's layers; see ``kernels/stack.py``): per
        layer its four products, its norms' ``1 + w`` (Gemma 1 has no post-norms; Gemma 3 adds q/k norms), head
        shapes, RoPE table (one per kind of layer, in ``Rope.inv_freq``'s order), attention scale and soft-cap."""
        keys = list(self.rope.inv_freq)
        layers = []
        for i, layer in enumerate(self.layers):
            a, m = layer.attn, layer.mlp
            layers.append(kernels.LayerSpec(
                qkv=a.qkv, o=a.o_proj, gate_up=m.gate_up, down=m.down_proj, heads=a.hq, kv_heads=a.hkv,
                head_dim=a.d, rope=keys.index(self.rope.layer_key[i]), attn_scale=a.scale,
                softcap=self.config.attn_logit_softcapping, input_norm=_scale(layer.input_norm),
                post_attn_norm=_scale(layer.post_attn_norm), pre_mlp_norm=_scale(layer.pre_mlp_norm),
                post_mlp_norm=_scale(layer.post_mlp_norm), q_norm=_scale(a.q_norm), k_norm=_scale(a.k_norm)))
        return kernels.StackSpec(layers=tuple(layers), final_norm=self.norm.scale, eps=self.config.rms_norm_eps)

    def hidden_decode_stack(self, ids: torch.Tensor, positions: torch.Tensor, kv: kernels.StackKV) -> torch.Tensor:
        """:meth:`hidden` for a decode step (see :meth:`can_decode_stack`) over the paged cache, every layer in
        one compiled call (``kernels.decode_stack`` on :meth:`stack_spec`; the engine's ``PagedBatch.stack_args``
        gives the cache's part). The same kernels in the same order as :meth:`_hidden_fused`, so the same bits,
        without ~200 Python-level calls per step (a sizeable part of a single-stream step on a small model)."""
        x = self.embed_tokens(ids)
        tables = self.rope.tables(positions, self.dtype)
        n, d = x.shape[0], self.config.head_dim
        cos = [tables[k][0].view(n, d) for k in self.rope.inv_freq]  # LayerSpec.rope indexes these
        sin = [tables[k][1].view(n, d) for k in self.rope.inv_freq]
        return self._decode_stack()(x, cos, sin, kv)

    def attention_params(self) -> tuple[float, float | None]:
        """The score scale and soft-cap of every layer's attention (the engine's paged attention applies them)."""
        return self.layers[0].attn.scale, self.config.attn_logit_softcapping

    def prepare_greedy(self) -> None:
        """Make the greedy head's re-laid weights now where :meth:`greedy_head` runs (the engine calls it at start,
        so a first request does not pay for it)."""
        if self.can_greedy_head():
            self.embed.prepare_greedy()

    def new_sequence(self, max_len: int) -> DenseKV:
        """The state one sequence needs for :meth:`step` (a dense KV cache of ``max_len`` tokens)."""
        return DenseKV(self, max_len)

    def step(self, ids: torch.Tensor, kv: DenseKV, last_only: bool = False) -> torch.Tensor:
        """Run new tokens of one sequence; float32 logits for each (or only the last) of them."""
        h = self._advance(ids, kv)
        return self.logits(h[-1:] if last_only else h)

    def _advance(self, ids: torch.Tensor, kv: DenseKV) -> torch.Tensor:
        """The final hidden states of new tokens of one sequence, their K/V written and the sequence advanced. A
        decode step runs every layer in one compiled call where the engine's would (:meth:`can_decode_stack`): the
        same kernels in the same order as the layer loop, so the same bits."""
        positions = torch.arange(kv.length, kv.length + ids.numel(), device=ids.device)
        if ids.numel() == 1 and self.can_decode_stack(1):
            h = self.hidden_decode_stack(ids, positions, kv.stack_kv())
        else:
            h = self.hidden(ids, positions, kv)
        kv.advance(ids.numel())
        return h

    def step_greedy(self, ids: torch.Tensor, kv: DenseKV) -> int:
        """:meth:`step` then the greedy token of the last position: ``argmax(step(ids, kv, last_only=True)[0])``,
        found by :meth:`greedy_head` where the kernel backend takes a single row's token from it
        (``backend.plan(1).greedy_head``), which gives that very token without the full logits; else from the
        logits."""
        h = self._advance(ids, kv)
        if backend.plan(1).greedy_head and self.can_greedy_head():
            token = int(self.greedy_head(h[-1:], want_logits=False)[0][0])
            if token >= 0:  # else non-finite values: torch's argmax decides, as before
                return token
        return int(kernels.argmax(self.logits(h[-1:])[0]))

    def can_greedy_head(self) -> bool:
        """Whether :meth:`greedy_head` runs (an int8 head the kernel backend can run it for; not under a final
        soft-cap, whose float32 tanh can tie logits that differ before it)."""
        return self.config.final_logit_softcapping is None and self.embed.greedy_ready()

    def greedy_head(self, h: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, hidden] -> (the exact greedy token per row, as ``logits(h[i:i+1]).argmax()`` gives it; -1 where h is
        not finite; approximate logits [N, vocab] when ``want_logits``). See kernels/backend.py ``QuantLinear.greedy``.
        """
        return self.embed.greedy(h.float(), want_logits)

    def logits(self, h: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], through the tied embedding. ``batch``: the engine's decode rows
        (see ``QuantLinear.forward_batch``); otherwise scoring keeps the exact paths."""
        out = (self.embed.forward_batch(h) if batch else self.embed(h)).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2: final logits soft-capped at 30 (Gemma2ForCausalLM.forward)
            out = torch.tanh(out / cap) * cap
        return out


def _scale(norm: RMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.scale


def cat_rows(ws: list) -> torch.Tensor | quant.QuantWeight:
    """Stack projection weights along their output dimension (float tensors or grouped int8 alike)."""
    if all(isinstance(w, quant.QuantWeight) for w in ws):
        return quant.cat_rows(ws)
    return torch.cat([w.dequantize() if isinstance(w, quant.QuantWeight) else w for w in ws])


def _layer_tensors(t: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{i}."
    out = {}
    for name, value in t.items():
        if name.startswith(prefix):
            key = name[len(prefix):].split(".")[-1]  # e.g. "self_attn.q_proj" -> "q_proj"
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ dense KV


# Queries per attention block of a prompt (DenseKV here, the engine's prefill chunks in engine/runner.py): each
# block's keys end at its last query, so a causal prompt computes ~(1 + 1 / n) / 2 of the full square of scores
# over n blocks (a 512-token prompt: 62.5% at 128; the measurement is in bench/RESULTS.md).
PREFILL_BLOCK = 128


class DenseKV:
    """A contiguous KV cache for ONE sequence (every layer keeps every token; masks apply the windows).

    Used by ``Model.forward`` and ``generate``; the engine uses the paged cache instead. ``attend`` writes the
    new tokens at ``[length, length + T)``; call :meth:`advance` after each forward.
    """

    def __init__(self, model: GemmaModel, max_len: int, kv_dtype: torch.dtype | None = None):
        c = model.config
        # The engine's rule: KV in bf16 unless the model runs in exact float32.
        dt = kv_dtype or (torch.float32 if model.weight_format == "float32" else torch.bfloat16)
        # One slot tensor [2 * layers * max_len, kv_heads, head_dim] (layer l's K at slots [2l * max_len, ...), its
        # V right after), as a paged cache's flat with one page: a decode step runs kernels.decode_stack on it
        # (:meth:`stack_kv`). ``k[l]`` / ``v[l]`` are [kv_heads, max_len, head_dim] views of it.
        self.flat = torch.zeros(2 * c.num_layers * max_len, c.num_kv_heads, c.head_dim, dtype=dt,
                                device=model.device)
        self.k = [self.flat[2 * i * max_len:(2 * i + 1) * max_len].transpose(0, 1) for i in range(c.num_layers)]
        self.v = [self.flat[(2 * i + 1) * max_len:(2 * i + 2) * max_len].transpose(0, 1)
                  for i in range(c.num_layers)]
        self.windows = [c.sliding_window if t == SLIDING else None for t in c.layer_types]
        self.scale_softcap = (model.layers[0].attn.scale, c.attn_logit_softcapping)
        self.length = 0
        self.max_len = max_len
        self._masks: dict[tuple, torch.Tensor] = {}
        self._arange: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"DenseKV holds {self.max_len} tokens; {end} requested")
        self.k[layer][:, start:end] = k.transpose(0, 1)
        self.v[layer][:, start:end] = v.transpose(0, 1)
        window = self.windows[layer]
        lo = 0 if window is None else max(0, start - window + 1)  # keys no query of this step can see are skipped
        if t == 1:  # a decode step: the same kernel as the engine's decode rows (keys read in place, float32)
            start_len = torch.tensor([lo, end - lo])
            out = kernels.decode_attention(q.float(), self.k[layer].transpose(0, 1), self.v[layer].transpose(0, 1),
                                           self._positions(), start_len[:1], start_len[1:], 1, 1, *self.scale_softcap)
            if out is not None:
                return out.to(q.dtype)
        # One query (a decode step) sees every key in [lo, end): causal, and lo is where its window starts.
        dt = q.dtype if t == 1 else self.k[layer].dtype  # a decode step in the query's dtype, as the engine's rows
        outs = []
        # A prompt in blocks of PREFILL_BLOCK queries, as the engine's chunks: each block's keys end at its last query
        # and start at its own window (causal: keys after the block are neither computed nor masked).
        for b0 in range(0, t, PREFILL_BLOCK):
            b1 = min(t, b0 + PREFILL_BLOCK)
            blo = 0 if window is None else max(0, start + b0 - window + 1)  # lo for the first block
            mask = None if t == 1 else self._mask(start + b0, start + b1, blo, window)[None]
            keys, vals = self.k[layer][None, :, blo:start + b1], self.v[layer][None, :, blo:start + b1]
            out = attention(q[b0:b1].transpose(0, 1)[None].to(dt), keys.to(dt), vals.to(dt), mask,
                            *self.scale_softcap)
            outs.append(out[0].transpose(0, 1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.dtype)  # [T, Hq, D]

    def _positions(self) -> torch.Tensor:  # [1, max_len]: the slot of each position (a one-row "block table")
        if self._arange is None:
            self._arange = torch.arange(self.max_len)[None]
        return self._arange

    def _mask(self, start: int, end: int, lo: int, window: int | None) -> torch.Tensor:
        key = (start, end, lo, window)
        m = self._masks.get(key)
        if m is None:
            dev = self.k[0].device
            m = visibility_mask(torch.arange(start, end, device=dev), torch.arange(lo, end, device=dev), window)
            self._masks = {key: m} if len(self._masks) > 64 else {**self._masks, key: m}
        return m

    def advance(self, t: int) -> None:
        self.length += t

    def stack_kv(self) -> kernels.StackKV:
        """The next decode step's K/V as ``kernels.decode_stack`` reads and writes it: the flat with one page of
        ``max_len`` slots (block = page stride = 1 and a table of slots, as :meth:`attend`'s decode kernel reads
        it), a group per window (global, sliding) with the keys the step's query sees, as :meth:`attend` picks them."""
        if self.length + 1 > self.max_len:
            raise ValueError(f"DenseKV holds {self.max_len} tokens; {self.length + 1} requested")
        groups = sorted(set(self.windows), key=lambda w: (w is not None, w or 0))
        end, n = self.length + 1, self.max_len
        starts = [0 if w is None else max(0, self.length - w + 1) for w in groups]
        write = torch.tensor([self.length])
        return kernels.StackKV(
            flats=(self.flat,), layer_flat=(0,) * len(self.windows),
            off_k=tuple(2 * i * n for i in range(len(self.windows))),
            off_v=tuple((2 * i + 1) * n for i in range(len(self.windows))),
            layer_group=tuple(groups.index(w) for w in self.windows), write=(write,) * len(groups),
            table=(self._positions(),) * len(groups), start=tuple(torch.tensor([lo]) for lo in starts),
            lengths=tuple(torch.tensor([end - lo]) for lo in starts), block=1, page_stride=(1,))
