"""The Gemma 4 text decoder in plain PyTorch, in one readable file (model math only).

Contract: the same as models/gemma.py. Token ids and positions in, hidden states / logits out; the N tokens of a
step are flattened into one ``[N, hidden]`` matrix, and attention reads and writes K/V only through a ``KVBatch``
(``attend(layer, q, k, v) -> out``), so one set of layers runs a dense single sequence (:class:`DenseKV`, used by
``step`` and ``generate``) and the engine's paged cache.

Weight formats: float32, bfloat16, and int8 (the CPU fast mode): every projection whose GGUF blocks have an exact
grouped int8 form keeps the GGUF's own codes and runs through the kernel backend's ``QuantLinear``, as Gemma 1-3's
(``models.gemma.Linear``); a projection stored as floats stays float32 (int8 here is the file's codes, never a
lossy re-quantization). The MoE experts and the router are float32 in every mode but bfloat16. Without per-layer
embeddings and the MoE block (the 31B shape) a decode step of the int8 mode runs every layer in one compiled call
(``kernels.decode_stack``, :meth:`Gemma4Model.stack_spec`); the others run layer by layer.

KV sharing: the last ``num_kv_shared_layers`` layers own no K/V. Such a layer calls ``kv.attend(layer, q, None,
None)`` and the cache attends q over the K/V it stored for ``config.kv_source(layer)`` (an earlier layer of the
same type, already run in this step), with the layer's own window (the same, as the type is the same).

What a layer does (``Gemma4TextDecoderLayer.forward``; every quirk is commented at its line)::

    x = x + post_attn_norm(attn(input_norm(x)))
    h = mlp(pre_mlp_norm(x))                                       # dense GeGLU; double wide on KV-shared layers
    h = post_mlp_norm_1(h) + post_moe_norm(moe(x, pre_moe_norm(x)))  # only with the MoE block
    x = x + post_mlp_norm(h)
    x = x + ple_post_norm(ple_proj(gelu(ple_gate(x)) * ple_i))     # only with per-layer embeddings
    x = x * layer_scalar

NOTE: where the issue's feature list and transformers' code differ, this file follows the code (transformers 5.25,
``transformers/models/gemma4/modeling_gemma4.py``, the module every comment below names unless another is named):
``layer_scalar`` scales the whole residual stream, not a branch; the router reads the post-attention residual, not
the MLP's normed input; the MoE block runs on every layer when enabled; "proportional" RoPE rotates the first
``partial * head_dim / 2`` frequency pairs with exponents over the whole head and leaves the other pairs still.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import SLIDING
from ..config_gemma4 import Gemma4Config
from ..errors import UnsupportedModelError
from ..kernels import backend
from . import quant
from .gemma import PREFILL_BLOCK, FloatLinear, Linear, attention, cat_rows, visibility_mask
from .gemma4_weights import GGUFRows

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
# Gemma4TextAttention.scaling = 1.0: scores are q.k, unscaled (the q/k RMSNorms fix their size instead).
ATTENTION_SCALE = 1.0


class KVBatch(Protocol):
    """What a layer needs from a KV cache for one forward step over N flattened tokens (gemma.py's, with sharing)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """Store k, v ([N, Hkv, D]) for these tokens and attend q ([N, Hq, D]) over each token's visible keys.
        k and v are None for a KV-shared layer: attend over the K/V stored for ``config.kv_source(layer)``."""
        ...


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: ``x * (mean(x^2) + eps) ** -0.5 * w`` in float32, cast back. ``weight=None``: no scale.

    Unlike Gemma 1-3 the weight is used as is, not as ``1 + w`` (``Gemma4RMSNorm.forward``:
    ``normed_output * self.weight.float()``), and llama.cpp stores it unshifted (its Gemma4 converter's
    ``norm_shift`` is 0). The scale-free form (``with_scale=False``) is the v norm and the router's norm.
    """

    def __init__(self, weight: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.float())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def linear(w: torch.Tensor | quant.QuantWeight, fmt: str, head: bool = False) -> FloatLinear | backend.QuantLinear:
    """A projection in the weight format: in int8 a GGUF weight's own codes through the kernel backend (exact: the
    float32 mode's dequantization); any float weight (a float GGUF tensor, safetensors) stays float32."""
    if fmt == "int8" and isinstance(w, quant.QuantWeight):
        return Linear(w, "int8", head=head)
    return FloatLinear(w.dequantize() if isinstance(w, quant.QuantWeight) else w,
                       torch.bfloat16 if fmt == "bfloat16" else torch.float32)


def _float(w: torch.Tensor | quant.QuantWeight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, quant.QuantWeight) else w


def rope_inv_freq(head_dim: int, theta: float, partial: float, factor: float) -> torch.Tensor:
    """[head_dim / 2] float32 frequencies; pairs past the rotated share get 0 (they do not turn).

    ``_compute_proportional_rope_parameters`` (modeling_rope_utils.py): ``int(partial * head_dim // 2)`` rotated
    pairs with exponents over the WHOLE head (``arange(0, 2 * n, 2) / head_dim``), zeros for the rest, all divided by
    ``factor``. With partial 1 and factor 1 it is the default RoPE (``compute_default_rope_parameters``).
    """
    n_rot = int(partial * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat((inv, torch.zeros(head_dim // 2 - n_rot))) / factor


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(cos, sin), each [N, 1, D], computed in float32 then cast (``Gemma4TextRotaryEmbedding.forward``)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "rotate half" pairs (j, j + D/2) across the whole head, also on full layers whose tail pairs have frequency 0
    # (cos 1, sin 0: unchanged); ``apply_rotary_pos_emb``. x: [N, H, D]; cos, sin: [N, 1, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ------------------------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    """``Gemma4TextAttention``: q/k norms over head_dim, a scale-free v norm, scale 1.0, per-type sizes."""

    def __init__(self, config: Gemma4Config, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = config.num_heads, config.layer_kv_heads(layer), config.layer_head_dim(layer)
        self.shared = config.is_kv_shared(layer)  # owns no K/V: reads kv_source(layer)'s
        self.v_is_k = config.v_is_k(layer)
        eps = config.rms_norm_eps
        # A KV-shared layer keeps its q_proj, q_norm and o_proj (Gemma4TextAttention builds k/v only if not shared).
        names = ["q_proj"]
        if not self.shared:
            names += ["k_proj"] if self.v_is_k else ["k_proj", "v_proj"]
        self.qkv = linear(cat_rows([w[n] for n in names]), fmt)  # one product for q, k, v
        self.o_proj = linear(w["o_proj"], fmt)
        self.q_norm = RMSNorm(w["q_norm"], eps)
        self.k_norm = None if self.shared else RMSNorm(w["k_norm"], eps)
        self.v_norm = None if self.shared else RMSNorm(None, eps)  # Gemma4RMSNorm(with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: KVBatch) -> torch.Tensor:
        n, hq, hkv, d = x.shape[0], self.hq, self.hkv, self.d  # x: [N, hidden]
        qkv = self.qkv(x)
        q = apply_rope(self.q_norm(qkv[:, :hq * d].view(n, hq, d)), *rope)  # norm, then RoPE
        if self.shared:
            # The source layer's K/V, normed and roped when it ran (``shared_kv_states[self.layer_type]``).
            out = kv.attend(self.layer, q, None, None)
        else:
            k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
            # attention_k_eq_v on full layers: no v_proj, V is the raw k projection, before k_norm and RoPE
            # (``value_states = ... if self.v_proj is not None else key_states``, taken before ``k_norm``).
            v = k if self.v_is_k else qkv[:, (hq + hkv) * d:].view(n, hkv, d)
            k = apply_rope(self.k_norm(k), *rope)
            v = self.v_norm(v)  # V is RMS-normed too, without a scale
            out = kv.attend(self.layer, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, hq * d))


class MLP(nn.Module):
    """``Gemma4TextMLP``: GeGLU with tanh GELU; width from the weights (double wide on KV-shared layers)."""

    def __init__(self, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.inter = w["gate_proj"].shape[0]
        self.gate_up = linear(cat_rows([w["gate_proj"], w["up_proj"]]), fmt)
        self.down_proj = linear(w["down_proj"], fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class MoE(nn.Module):
    """The expert block beside the dense MLP: ``Gemma4TextRouter`` then ``Gemma4TextExperts``."""

    def __init__(self, config: Gemma4Config, w: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.top_k = config.top_k_experts
        self.router_norm = RMSNorm(None, config.rms_norm_eps)  # Gemma4TextRouter.norm: with_scale=False
        self.register_buffer("router_scale", w["router.scale"].to(dtype))
        self.root = config.hidden_size ** -0.5  # Gemma4TextRouter.scalar_root_size
        self.router = FloatLinear(_float(w["router.proj"]), dtype)
        self.register_buffer("per_expert_scale", w["router.per_expert_scale"].to(dtype))
        self.register_buffer("gate_up", w["experts.gate_up_proj"].to(dtype))  # [E, 2I, hidden]
        self.register_buffer("down", w["experts.down_proj"].to(dtype))  # [E, hidden, I]

    def route(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities over all experts [N, E] float32, the top k's weights [N, K], their indices [N, K])."""
        r = self.router_norm(residual) * self.router_scale * self.root
        probs = torch.softmax(self.router(r), dim=-1, dtype=torch.float32)  # over ALL experts, in float32
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # the top k renormalised to sum to 1
        return probs, weights * self.per_expert_scale[index], index  # then each expert's learned scale

    def forward(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual: the router's input [N, hidden] (the stream after attention); x: the experts' input."""
        _, weights, index = self.route(residual)
        out = torch.zeros_like(x)
        for e in index.unique().tolist():  # the experts some token chose, ascending, as Gemma4TextExperts
            token, slot = (index == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))  # gathered rows only, scattered back
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma4Config, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        eps, dtype = config.rms_norm_eps, torch.bfloat16 if fmt == "bfloat16" else torch.float32
        self.attn = Attention(config, layer, {k.removeprefix("self_attn."): v for k, v in w.items()}, fmt)
        self.mlp = MLP({k.removeprefix("mlp."): v for k, v in w.items()}, fmt)
        # Four "sandwich" norms as in Gemma 2/3, each a plain-weight Gemma4RMSNorm.
        self.input_norm = RMSNorm(w["input_layernorm"], eps)
        self.post_attn_norm = RMSNorm(w["post_attention_layernorm"], eps)
        self.pre_mlp_norm = RMSNorm(w["pre_feedforward_layernorm"], eps)
        self.post_mlp_norm = RMSNorm(w["post_feedforward_layernorm"], eps)
        self.moe = MoE(config, w, dtype) if config.has_moe else None
        if self.moe is not None:  # the MoE block's own norms
            self.post_mlp_norm_1 = RMSNorm(w["post_feedforward_layernorm_1"], eps)  # dense MLP's output
            self.pre_moe_norm = RMSNorm(w["pre_feedforward_layernorm_2"], eps)  # experts' input
            self.post_moe_norm = RMSNorm(w["post_feedforward_layernorm_2"], eps)  # experts' output
        self.ple_gate = linear(w["per_layer_input_gate"], fmt) if config.has_ple else None
        if self.ple_gate is not None:
            self.ple_proj = linear(w["per_layer_projection"], fmt)
            self.ple_post_norm = RMSNorm(w["post_per_layer_input_norm"], eps)
        self.register_buffer("layer_scalar", w["layer_scalar"].to(dtype))  # [1]

    def forward(self, x: torch.Tensor, ple: torch.Tensor | None, rope: tuple, kv: KVBatch) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), rope, kv))
        h = self.mlp(self.pre_mlp_norm(x))
        if self.moe is not None:
            # Dense and expert outputs are normed apart, summed, then normed again by post_feedforward_layernorm;
            # the router and the experts read x, the stream BEFORE the MLP ("Take hidden states before MLP here").
            h = self.post_mlp_norm_1(h) + self.post_moe_norm(self.moe(x, self.pre_moe_norm(x)))
        x = x + self.post_mlp_norm(h)
        if self.ple_gate is not None:
            # Per-layer embedding, after the FFN: gate -> tanh GELU -> times this layer's PLE vector -> projection
            # -> norm, added to the stream (the ``hidden_size_per_layer_input`` block).
            g = F.gelu(self.ple_gate(x), approximate="tanh") * ple
            x = x + self.ple_post_norm(self.ple_proj(g))
        return x * self.layer_scalar  # ``hidden_states *= self.layer_scalar``: the whole stream, residual included


# ------------------------------------------------------------------------------------------------ the model


class Gemma4Model(nn.Module):
    """The Gemma 4 decoder stack, the same surface as ``GemmaModel`` (hidden, logits, step, new_sequence...).

    Example::

        model = Gemma4Model(config, tensors, "float32", torch.device("cpu"))
        kv = model.new_sequence(max_len=64)
        logits = model.step(ids, kv)                         # [T, vocab] float32; kv advanced by T
    """

    def __init__(self, config: Gemma4Config, tensors: dict[str, torch.Tensor], weight_format: str,
                 device: torch.device):
        super().__init__()
        if weight_format not in WEIGHT_FORMATS:
            raise UnsupportedModelError(f"Gemma 4 runs in {WEIGHT_FORMATS}, not {weight_format!r}")
        self.config, self.weight_format, self.device = config, weight_format, device
        self.dtype = torch.bfloat16 if weight_format == "bfloat16" else torch.float32
        self.embed = linear(tensors["embed_tokens"], weight_format, head=True)  # tied: also the LM head
        self.layers = nn.ModuleList(DecoderLayer(config, i, _layer_tensors(tensors, i), weight_format)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["norm"], config.rms_norm_eps)
        # Scaled by sqrt(hidden_size), the scale cast to the compute dtype first
        # (Gemma4TextScaledWordEmbedding: ``self.embed_scale.to(self.weight.dtype)``).
        self.embed_scale = torch.tensor(math.sqrt(config.hidden_size), dtype=self.dtype, device=device)
        self.inv_freq = {kind: rope_inv_freq(config.layer_head_dim(i), *config.rope(i)).to(device)
                         for i, kind in enumerate(config.layer_types)}  # one per layer type (its layers agree)
        if config.has_ple:
            table = tensors["embed_tokens_per_layer"]  # [vocab_ple, layers * P]: rows are gathered, never expanded
            # Kept as stored: a GGUF block table as its blocks (GGUFRows: only gathered rows are dequantized), a
            # float table in its dtype wherever the compute dtype is float32 (a bf16 checkpoint's table stays bf16).
            if isinstance(table, GGUFRows):
                self.ple_table = table
            else:
                keep = self.dtype == torch.float32 and table.dtype in (torch.float32, torch.bfloat16, torch.float16)
                self.register_buffer("ple_table", table if keep else table.to(self.dtype))
            # Gemma4TextScaledWordEmbedding with embed_scale = hidden_size_per_layer_input ** 0.5, cast the same way.
            self.ple_embed_scale = torch.tensor(math.sqrt(config.hidden_size_per_layer_input), dtype=self.dtype,
                                                device=device)
            self.ple_model_proj = linear(tensors["per_layer_model_projection"], weight_format)
            self.ple_proj_norm = RMSNorm(tensors["per_layer_projection_norm"], config.rms_norm_eps)
        self._stack: backend.DecodeStack | None = None  # hidden_decode_stack's, made on first use
        self._product_list: list | None = None  # the int8 layer products, in order

    # ---------------------------------------------------------------------------------------------- forward
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [N] -> [N, hidden]
        e = self.embed
        if e.int8:  # the int8 head's rows, dequantized (exact: the float32 mode's rows)
            rows = quant.dequantize_rows(quant.QuantWeight(codes=e.codes, scales=e.scales, offsets=e.offsets,
                                                           group=e.group), ids)
        else:
            rows = e.weight[ids]
        return rows.to(self.dtype) * self.embed_scale

    def ple_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, layers * P] float rows of the per-layer embedding table (only these rows are read or dequantized)."""
        t = self.ple_table
        return t.rows(ids) if isinstance(t, GGUFRows) else t[ids]

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[N, layers, P]: each token's per-layer embedding vectors (``get_per_layer_inputs`` then
        ``project_per_layer_inputs``)."""
        c, n = self.config, ids.shape[0]
        shape = (n, c.num_layers, c.hidden_size_per_layer_input)
        token = (self.ple_rows(ids).to(self.dtype) * self.ple_embed_scale).view(shape)  # token identity part
        # The context part: a projection of the scaled main embedding, times hidden_size ** -0.5, RMS-normed over P.
        proj = self.ple_proj_norm((self.ple_model_proj(x) * c.hidden_size ** -0.5).view(shape))
        return (proj + token) * 2.0 ** -0.5  # per_layer_input_scale

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVBatch) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] for N flattened tokens at the given absolute positions."""
        x = self.embed_tokens(ids)
        ple = self.per_layer_inputs(ids, x) if self.config.has_ple else None
        ropes = {kind: rope_tables(positions, inv, self.dtype) for kind, inv in self.inv_freq.items()}
        for i, layer in enumerate(self.layers):
            x = layer(x, ple[:, i] if ple is not None else None, ropes[self.config.layer_types[i]], kv)
        return self.norm(x)

    def logits(self, h: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab] through the tied embedding, soft-capped when the config says
        so. ``batch``: the engine's decode rows (``QuantLinear.forward_batch`` in the int8 mode)."""
        return self._softcap((self.embed.forward_batch(h) if batch else self.embed(h)).float())

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        if cap is not None:  # ``Gemma4ForCausalLM.forward``: ``tanh(logits / cap) * cap``
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---------------------------------------------------------------------------------------------- one sequence
    def new_sequence(self, max_len: int) -> DenseKV:
        """The state one sequence needs for :meth:`step` (a dense KV cache of ``max_len`` tokens)."""
        return DenseKV(self, max_len)

    def step(self, ids: torch.Tensor, kv: DenseKV, last_only: bool = False) -> torch.Tensor:
        """Run new tokens of one sequence; float32 logits for each (or only the last) of them."""
        h = self.hidden(ids, torch.arange(kv.length, kv.length + ids.numel(), device=ids.device), kv)
        kv.advance(ids.numel())
        return self.logits(h[-1:] if last_only else h)

    def step_greedy(self, ids: torch.Tensor, kv: DenseKV) -> int:
        return int(self.step(ids, kv, last_only=True)[0].argmax())

    # ---------------------------------------------------------------------------------------------- the engine's
    def attention_params(self) -> tuple[float, float | None]:
        """Score scale and soft-cap of the paged attention: q and k are RMS-normed, scale 1.0, no soft-cap
        (``Gemma4TextAttention``)."""
        return ATTENTION_SCALE, None

    def can_greedy_head(self) -> bool:
        """Whether :meth:`greedy_head` runs: an int8 head the kernel backend runs it for (``QuantLinear.greedy``)."""
        return self.embed.greedy_ready()

    def greedy_head(self, h: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, hidden] -> (the exact greedy token per row; -1 where h is not finite; approximate soft-capped logits
        [N, vocab] when ``want_logits``), as ``GemmaModel.greedy_head``.

        NOTE: the final soft-cap is monotone, so the greedy token of the capped logits is the head's own argmax,
        found before the cap; only the logits for sampling are capped (as :meth:`logits` caps them). Gemma 2 keeps
        its logits' argmax instead (its float32 tanh may tie two logits near the cap; then the lower index wins there
        and the truly larger one here)."""
        tokens, approx = self.embed.greedy(h.float(), want_logits)
        return tokens, None if approx is None else self._softcap(approx)

    def prepare_greedy(self) -> None:
        """Make the greedy head's layout now where it runs (the engine calls it at start)."""
        if self.can_greedy_head():
            self.embed.prepare_greedy()

    def _products(self) -> list:
        """The int8 layer products (the kernel backend's ``QuantLinear``s), in layer order."""
        if self._product_list is None:
            self._product_list = [m for layer in self.layers for m in (
                layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj) if m.int8]
        return self._product_list

    def prepare_i16(self) -> None:
        """Make every int8 layer product's int16 layout now where the backend runs it (as ``GemmaModel``)."""
        for li in self._products():
            if li.plan(backend.QMATMUL_MAX_ROWS + 1) == backend.I16:
                li.prepare_i16()

    def can_decode_stack(self, rows: int) -> bool:
        """Whether :meth:`hidden_decode_stack` runs a decode step of this many rows: the int8 mode on the CPU with
        every layer product int8, no per-layer embeddings and no MoE block (``kernels.stack`` does not describe
        them: E2B/E4B and 26B-A4B run layer by layer), and a product kernel for the row count."""
        c = self.config
        if not (self.weight_format == "int8" and self.device.type == "cpu" and kernels.available()) \
                or c.has_ple or c.has_moe or len(self._products()) != 4 * c.num_layers:
            return False
        return self._decode_stack().plan(rows) is not None

    def _decode_stack(self) -> backend.DecodeStack:
        if self._stack is None:
            self._stack = backend.DecodeStack(self.stack_spec())
        return self._stack

    def stack_spec(self) -> kernels.StackSpec:
        """This decoder as ``kernels.decode_stack`` runs it (see ``kernels/stack.py``): per layer its four products,
        its plain-weight norms (Gemma 4 multiplies by ``w``, not ``1 + w``), the scale-free v norm and ``v_is_k``
        of layers that make K/V, the source of a KV-shared layer, its type's head shape and RoPE table
        (``self.inv_freq``'s order), scale 1.0 and ``layer_scalar`` as the output scalar. Only for a model without
        per-layer embeddings or MoE block (ValueError otherwise)."""
        c = self.config
        if c.has_ple or c.has_moe:
            raise ValueError("kernels.stack describes neither per-layer embeddings nor the MoE block")
        kinds = list(self.inv_freq)
        layers = []
        for i, layer in enumerate(self.layers):
            a, m, src = layer.attn, layer.mlp, c.kv_source(i)
            layers.append(kernels.LayerSpec(
                qkv=a.qkv, o=a.o_proj, gate_up=m.gate_up, down=m.down_proj, heads=a.hq, kv_heads=a.hkv, head_dim=a.d,
                rope=kinds.index(c.layer_types[i]), attn_scale=ATTENTION_SCALE, softcap=None,
                input_norm=layer.input_norm.weight, post_attn_norm=layer.post_attn_norm.weight,
                pre_mlp_norm=layer.pre_mlp_norm.weight, post_mlp_norm=layer.post_mlp_norm.weight,
                q_norm=a.q_norm.weight, k_norm=None if a.shared else a.k_norm.weight, v_norm=not a.shared,
                v_is_k=a.v_is_k and not a.shared, kv_source=None if src == i else src,
                out_scalar=float(layer.layer_scalar)))
        return kernels.StackSpec(layers=tuple(layers), final_norm=self.norm.weight, eps=c.rms_norm_eps)

    def hidden_decode_stack(self, ids: torch.Tensor, positions: torch.Tensor, kv: kernels.StackKV) -> torch.Tensor:
        """:meth:`hidden` for a step of decode rows (see :meth:`can_decode_stack`), every layer in one compiled call
        over the paged cache (``kv``: ``PagedBatch.stack_args()``). The same math as the layer loop; the kernels'
        float32 rounding differs from torch's in the last bits."""
        x = self.embed_tokens(ids)
        cos, sin = [], []
        for inv in self.inv_freq.values():  # LayerSpec.rope indexes these; [N, D] each
            freqs = positions.float()[:, None] * inv[None, :]
            cos.append(torch.cat((freqs.cos(), freqs.cos()), dim=-1))
            sin.append(torch.cat((-freqs.sin(), freqs.sin()), dim=-1))  # rotate_half's signs (the kernel's roll)
        return self._decode_stack()(x, cos, sin, kv)


def _layer_tensors(t: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """``layers.{i}.self_attn.q_proj`` -> ``self_attn.q_proj`` for one layer."""
    prefix = f"layers.{i}."
    return {name[len(prefix):]: value for name, value in t.items() if name.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ dense KV


class DenseKV:
    """A contiguous KV cache for ONE sequence; the layers that own K/V keep every token (masks apply windows).

    Per-layer shapes follow the config (sliding and full layers differ in head_dim and KV heads); a KV-shared
    layer has no storage and attends over its ``kv_source``'s. ``attend`` writes the new tokens at
    ``[length, length + T)``; call :meth:`advance` after each forward (``Gemma4Model.step`` does).
    """

    def __init__(self, model: Gemma4Model, max_len: int, kv_dtype: torch.dtype | None = None):
        c = model.config
        dt = kv_dtype or (torch.float32 if model.weight_format == "float32" else torch.bfloat16)
        self.source = [c.kv_source(i) for i in range(c.num_layers)]
        self.k = {i: torch.zeros(c.layer_kv_heads(i), max_len, c.layer_head_dim(i), dtype=dt, device=model.device)
                  for i in range(c.num_layers) if self.source[i] == i}
        self.v = {i: torch.zeros_like(t) for i, t in self.k.items()}
        self.windows = [c.sliding_window if t == SLIDING else None for t in c.layer_types]
        self.length, self.max_len = 0, max_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        t, src = q.shape[0], self.source[layer]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"DenseKV holds {self.max_len} tokens; {end} requested")
        if (k is None) != (src != layer):
            raise ValueError(f"layer {layer} {'reads' if src != layer else 'owns'} K/V: k and v must "
                             f"{'be None' if src != layer else 'be given'}")
        if k is not None:
            self.k[layer][:, start:end] = k.transpose(0, 1)
            self.v[layer][:, start:end] = v.transpose(0, 1)
        keys, vals, window = self.k[src], self.v[src], self.windows[layer]
        dt = q.dtype if t == 1 else keys.dtype  # a decode step in the query's dtype, as the engine's rows
        outs = []
        for b0 in range(0, t, PREFILL_BLOCK):  # long prompts in blocks of queries, each block's keys from its window
            b1 = min(t, b0 + PREFILL_BLOCK)
            lo = 0 if window is None else max(0, start + b0 - window + 1)  # keys no query of the block can see: skipped
            mask = visibility_mask(torch.arange(start + b0, start + b1, device=q.device),
                                   torch.arange(lo, start + b1, device=q.device), window)
            out = attention(q[b0:b1].transpose(0, 1)[None].to(dt), keys[None, :, lo:start + b1].to(dt),
                            vals[None, :, lo:start + b1].to(dt), mask[None], ATTENTION_SCALE, None)
            outs.append(out[0].transpose(0, 1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.dtype)  # [T, Hq, D]

    def advance(self, t: int) -> None:
        self.length += t
