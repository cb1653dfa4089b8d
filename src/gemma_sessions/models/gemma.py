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
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, ModelConfig

# ------------------------------------------------------------------------------------------------ linear layers


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[:, None]. Returns (q [out, in] int8, scale [out] float32)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


# Rows (tokens) up to which the int8 LM head uses the weight-only int8 kernel; larger batches use a GEMM on a
# bf16 copy made on first need (measured on the 2-core CPU: int8 wins at a few rows, bf16 GEMM beyond).
INT8_MAX_ROWS = 8
# The int8 LM head is split along its input dimension into this many column groups, each with its own per-row
# scales: finer scales (teacher-forced top-1 agreement with float32 rises) and, measured, a faster kernel
# (262144 x 320 twice: 6.9 ms; 262144 x 640 once: 17 ms).
INT8_K_GROUPS = 2


class Linear(nn.Module):
    """A bias-free projection whose weight is kept float32, bfloat16, or int8 in ``INT8_K_GROUPS`` column groups
    with per-row scales (``aten._weight_int8pack_mm``: weight-only int8, bf16 activations).

    NOTE: the fast default keeps only the tied LM head int8 (63% of Gemma 3 270M's parameters and of the bytes read
    per decoded token); the layers stay bf16 because per-row int8 layers cost ~4 points of top-1 agreement with
    float32 on the 270M model (measured: 95.8% vs 99.3%), below the 98% the fast mode owes.
    """

    def __init__(self, weight: torch.Tensor, weight_format: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.int8 = weight_format == "int8"
        self.register_buffer("weight", None)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        if self.int8:
            k = self.in_features // INT8_K_GROUPS if self.in_features % INT8_K_GROUPS == 0 else self.in_features
            for start in range(0, self.in_features, k):
                q, scale = quantize_rows_int8(weight[:, start:start + k])
                self.groups.append((q, scale.to(torch.bfloat16), start, k))
        else:
            self.register_buffer("weight", weight.to(torch.bfloat16 if weight_format == "bfloat16" else torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, in] -> [N, out], same dtype as x
        if not self.int8:
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        if x.shape[0] > INT8_MAX_ROWS:
            if self.weight is None:
                self.weight = self.dequantized().to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        xb, out = x.to(torch.bfloat16), None
        for q, scale, start, k in self.groups:
            part = torch.ops.aten._weight_int8pack_mm(xb[:, start:start + k], q, scale)
            out = part if out is None else out.add_(part)
        return out.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        if self.int8:
            return torch.cat([q.float() * s.float()[:, None] for q, s, _, _ in self.groups], dim=1)
        return self.weight.float()


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in float32, cast back.

    Gemma stores ``w`` as an offset from 1 (``Gemma3RMSNorm.forward``: ``output * (1.0 + self.weight.float())``;
    google/gemma_pytorch model.py RMSNorm). GGUF files hold ``1 + w`` (llama.cpp's converter adds the 1);
    weights.py subtracts it on load so this module always sees the Hugging Face convention.
    """

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("scale", 1.0 + weight.float())  # (1 + w), precomputed once
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


# ------------------------------------------------------------------------------------------------ attention


class KVBatch(Protocol):
    """What a layer needs from a KV cache for one forward step over N flattened tokens."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v ([N, Hkv, D]) for these tokens, attend q ([N, Hq, D]) over each token's visible keys."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float | None) -> torch.Tensor:
    """Masked multi-query / grouped-query attention, eager (the transformers ``eager_attention_forward`` math).

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, L, D]; mask: bool [B, T, L], True where a query may see a key.
    Returns:
        [B, Hq, T, D]
    """
    b, hq, t, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g = hq // hkv
    # GQA/MQA: query head h uses kv head h // g (transformers' repeat_kv repeats each kv head g times in a row),
    # so folding the g query heads of one kv head into the row axis needs no copy of K or V.
    q = q.reshape(b, hkv, g * t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, g*T, L]
    if softcap is not None:  # Gemma 2 attention logit soft-capping: cap * tanh(s / cap) (modeling_gemma2.py)
        scores = torch.tanh(scores / softcap) * softcap
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

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{key: (cos, sin)} with cos, sin: [N, 1, D], computed in float32 then cast (as transformers does)."""
        out = {}
        for key, inv in self.inv_freq.items():
            freqs = positions.float()[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            out[key] = (emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :])
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x: [N, H, D]; cos, sin: [N, 1, D]


# ------------------------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v share one fused matrix product: one weight read, one kernel launch per layer.
        self.qkv = Linear(torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), fmt)
        self.o_proj = Linear(w["o_proj"], fmt)
        self.q_norm = RMSNorm(w["q_norm"], config.rms_norm_eps) if config.has_qk_norm else None
        self.k_norm = RMSNorm(w["k_norm"], config.rms_norm_eps) if config.has_qk_norm else None
        # Scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (Gemma 2/3 config); Gemma 1
        # uses head_dim ** -0.5 (config.py sets query_pre_attn_scalar = head_dim for it).
        self.scale = config.query_pre_attn_scalar ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: KVBatch) -> torch.Tensor:
        n = x.shape[0]  # x: [N, hidden]
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
        self.gate_up = Linear(torch.cat([w["gate_proj"], w["up_proj"]]), fmt)  # fused, like qkv
        self.down_proj = Linear(w["down_proj"], fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        # GeGLU with the tanh approximation of GELU (hidden_activation="gelu_pytorch_tanh" in every Gemma).
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        eps = config.rms_norm_eps
        self.attn = Attention(config, layer, w, fmt)
        self.mlp = MLP(w, fmt)
        self.input_norm = RMSNorm(w["input_layernorm"], eps)
        if config.has_post_norms:
            # Gemma 2/3: four norms per layer, "sandwiching" both attention and MLP (Gemma2DecoderLayer).
            self.post_attn_norm = RMSNorm(w["post_attention_layernorm"], eps)
            self.pre_mlp_norm = RMSNorm(w["pre_feedforward_layernorm"], eps)
            self.post_mlp_norm = RMSNorm(w["post_feedforward_layernorm"], eps)
        else:
            # Gemma 1: two norms; its pre-MLP norm is named post_attention_layernorm in transformers.
            self.post_attn_norm = None
            self.pre_mlp_norm = RMSNorm(w["post_attention_layernorm"], eps)
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
        # float32 and casts to bf16 only at the matrix products).
        self.dtype = torch.bfloat16 if weight_format == "bfloat16" else torch.float32
        layer_format = "bfloat16" if weight_format == "int8" else weight_format  # see Linear's NOTE
        self.device = device
        self.embed = Linear(tensors["embed_tokens"], weight_format)  # tied: also the LM head
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, _layer_tensors(tensors, i), layer_format) for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["norm"], config.rms_norm_eps)
        self.rope = Rope(config, device)
        # Embeddings are scaled by sqrt(hidden_size), the scale cast to the compute dtype first
        # (Gemma3TextScaledWordEmbedding: ``embed_scale.to(self.weight.dtype)``; gemma_pytorch "normalizer").
        self.embed_scale = torch.tensor(math.sqrt(config.hidden_size), dtype=self.dtype, device=device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [N] -> [N, hidden]
        e = self.embed
        if e.int8:
            rows = torch.cat([q[ids].to(self.dtype) * s[ids, None].to(self.dtype) for q, s, _, _ in e.groups], dim=1)
        else:
            rows = e.weight[ids]
        return rows.to(self.dtype) * self.embed_scale

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVBatch) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] for N flattened tokens at the given absolute positions."""
        x = self.embed_tokens(ids)
        tables = self.rope.tables(positions, self.dtype)
        for layer in self.layers:
            x = layer(x, tables[self.rope.layer_key[layer.attn.layer]], kv)
        return self.norm(x)

    def new_sequence(self, max_len: int) -> DenseKV:
        """The state one sequence needs for :meth:`step` (a dense KV cache of ``max_len`` tokens)."""
        return DenseKV(self, max_len)

    def step(self, ids: torch.Tensor, kv: DenseKV, last_only: bool = False) -> torch.Tensor:
        """Run new tokens of one sequence; float32 logits for each (or only the last) of them."""
        h = self.hidden(ids, torch.arange(kv.length, kv.length + ids.numel(), device=ids.device), kv)
        kv.advance(ids.numel())
        return self.logits(h[-1:] if last_only else h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], through the tied embedding."""
        out = self.embed(h).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2: final logits soft-capped at 30 (Gemma2ForCausalLM.forward)
            out = torch.tanh(out / cap) * cap
        return out


def _layer_tensors(t: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{i}."
    out = {}
    for name, value in t.items():
        if name.startswith(prefix):
            key = name[len(prefix):].split(".")[-1]  # e.g. "self_attn.q_proj" -> "q_proj"
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ dense KV


class DenseKV:
    """A contiguous KV cache for ONE sequence (every layer keeps every token; masks apply the windows).

    Used by ``Model.forward`` and ``generate``; the engine uses the paged cache instead. ``attend`` writes the
    new tokens at ``[length, length + T)``; call :meth:`advance` after each forward.
    """

    def __init__(self, model: GemmaModel, max_len: int, kv_dtype: torch.dtype | None = None):
        c = model.config
        # The engine's rule: KV in bf16 unless the model runs in exact float32.
        dt = kv_dtype or (torch.float32 if model.weight_format == "float32" else torch.bfloat16)
        self.k = [torch.zeros(c.num_kv_heads, max_len, c.head_dim, dtype=dt, device=model.device)
                  for _ in range(c.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.windows = [c.sliding_window if t == SLIDING else None for t in c.layer_types]
        self.scale_softcap = (model.layers[0].attn.scale, c.attn_logit_softcapping)
        self.length = 0
        self.max_len = max_len
        self._masks: dict[tuple, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"DenseKV holds {self.max_len} tokens; {end} requested")
        self.k[layer][:, start:end] = k.transpose(0, 1)
        self.v[layer][:, start:end] = v.transpose(0, 1)
        window = self.windows[layer]
        lo = 0 if window is None else max(0, start - window + 1)  # keys no query of this step can see are skipped
        mask = self._mask(start, end, lo, window)
        keys, vals = self.k[layer][None, :, lo:end], self.v[layer][None, :, lo:end]
        out = attention(q.transpose(0, 1)[None].to(keys.dtype), keys, vals, mask[None], *self.scale_softcap)
        return out[0].transpose(0, 1).to(q.dtype)  # [T, Hq, D]

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
