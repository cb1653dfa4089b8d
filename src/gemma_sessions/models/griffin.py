"""RecurrentGemma (Griffin) in plain PyTorch: the model and its fixed-size per-sequence state.

Contract: ``GriffinModel(config, tensors)`` runs one sequence through a :class:`GriffinState` that holds, per
recurrent layer, the last ``conv_width - 1`` conv inputs and the RG-LRU state, and per attention layer the K/V of
the last ``window`` tokens: the state stays the same size however long the sequence grows. Prefill at once, token by
token or in chunks gives the same logits (the conv and the scan carry across chunk boundaries).

Status: model, parity with transformers (``tests/parity/test_griffin_parity.py``), loading from an HF directory and
``generate`` (CPU). Not yet wired into the engine, the sessions or the store (issue 6 continues).

Every quirk follows transformers' ``models/recurrent_gemma/modeling_recurrent_gemma.py`` and is commented where it
happens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import RMSNorm, attention, rotate_half, visibility_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class GriffinConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lru_width: int
    window: int
    conv_width: int
    logits_soft_cap: float
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    block_types: tuple[str, ...]  # per layer: "recurrent" or "attention"
    max_position_embeddings: int = 8192  # no hard limit (state is fixed-size); what generation allows
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    architecture: str = "recurrent_gemma"

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> GriffinConfig:
        n = int(cfg["num_hidden_layers"])
        pattern = tuple(cfg.get("block_types") or ("recurrent", "recurrent", "attention"))
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_parameters") or {}
        return cls(
            vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n, num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=hidden // heads, lru_width=int(cfg.get("lru_width") or hidden),
            window=int(cfg.get("attention_window_size", 2048)), conv_width=int(cfg.get("conv1d_width", 4)),
            logits_soft_cap=float(cfg.get("logits_soft_cap", 30.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))),
            # the pattern repeats over the depth (transformers: (block_types * 100)[:num_hidden_layers])
            block_types=tuple((pattern * (n // len(pattern) + 1))[:n]),
            bos_token_id=int(cfg.get("bos_token_id") or 2), eos_token_id=int(cfg.get("eos_token_id") or 1),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
        )


class GriffinState:
    """One sequence's recurrent state (fixed size): conv inputs, RG-LRU state, attention window."""

    def __init__(self, model: GriffinModel):
        c, dt = model.config, model.dtype
        self.length = 0
        self.conv: dict[int, torch.Tensor] = {}
        self.rnn: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(c.block_types):
            if kind == "recurrent":
                self.conv[i] = torch.zeros(c.conv_width - 1, c.lru_width, dtype=dt)
                self.rnn[i] = torch.zeros(c.lru_width, dtype=torch.float32)  # accumulated in float32
            else:
                self.k[i] = torch.zeros(c.num_kv_heads, 0, c.head_dim, dtype=dt)
                self.v[i] = torch.zeros(c.num_kv_heads, 0, c.head_dim, dtype=dt)

    def nbytes(self) -> int:
        tensors = [*self.conv.values(), *self.rnn.values(), *self.k.values(), *self.v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _lin(w: Mapping[str, torch.Tensor], name: str, bias: bool = True) -> nn.Linear:
    weight = w[f"{name}.weight"]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.copy_(w[f"{name}.bias"])
    return layer


class RecurrentBlock(nn.Module):
    """linear_y -> GeLU branch, times linear_x -> causal depthwise conv -> RG-LRU branch, then linear_out."""

    def __init__(self, c: GriffinConfig, w: Mapping[str, torch.Tensor]):
        super().__init__()
        self.c = c
        self.linear_y, self.linear_x, self.linear_out = _lin(w, "linear_y"), _lin(w, "linear_x"), _lin(w, "linear_out")
        self.conv_w = w["conv_1d.weight"][:, 0, :].t().contiguous()  # [K, W]: row j multiplies input t-K+1+j
        self.conv_b = w["conv_1d.bias"]
        self.a_param = w["rg_lru.recurrent_param"]
        self.gx_w, self.gx_b = w["rg_lru.input_gate_weight"], w["rg_lru.input_gate_bias"]
        self.ga_w, self.ga_b = w["rg_lru.recurrent_gate_weight"], w["rg_lru.recurrent_gate_bias"]

    def forward(self, x: torch.Tensor, pos: torch.Tensor, state: GriffinState, i: int) -> torch.Tensor:
        c, t = self.c, x.shape[0]  # x: [T, hidden]
        y = F.gelu(self.linear_y(x), approximate="tanh")
        xb = self.linear_x(x)                                             # [T, W]
        seq = torch.cat([state.conv[i], xb])                              # [K-1+T, W]
        # Causal depthwise Conv1D of width K over the previous K-1 inputs (zeros at the start, like the padding of
        # transformers' prefill) and the current one.
        conv = sum(seq[j:j + t] * self.conv_w[j] for j in range(c.conv_width)) + self.conv_b
        state.conv[i] = seq[-(c.conv_width - 1):].clone()
        return self.linear_out(self._rg_lru(conv, pos, state, i) * y)

    def _rg_lru(self, x: torch.Tensor, pos: torch.Tensor, state: GriffinState, i: int) -> torch.Tensor:
        c, t = self.c, x.shape[0]
        heads = x.reshape(t, c.num_heads, -1)
        # Gates are block-diagonal (one [bw, bw] matrix per head), then sigmoid (RecurrentGemmaRglru.forward).
        gate_x = torch.sigmoid(torch.einsum("thi,hij->thj", heads, self.gx_w) + self.gx_b).reshape(t, -1)
        gate_a = torch.sigmoid(torch.einsum("thi,hij->thj", heads, self.ga_w) + self.ga_b).reshape(t, -1)
        log_a = -8.0 * gate_a * F.softplus(self.a_param)                  # a = sigmoid(param)^(8 * gate), in log
        a = torch.exp(log_a)
        reset = (pos == 0)[:, None]  # a document start: no memory, and the input is not rescaled
        multiplier = torch.where(reset, torch.ones_like(a), torch.sqrt(1 - torch.exp(2 * log_a)))
        normalized = x * gate_x * multiplier.to(x.dtype)
        a = a * ~reset
        h = state.rnn[i]
        out = torch.empty_like(normalized)
        for s in range(t):  # the linear recurrence h_t = a_t * h_{t-1} + x_t, accumulated in float32
            h = a[s].float() * h + normalized[s].float()
            out[s] = h.to(out.dtype)
        state.rnn[i] = h
        return out


class LocalAttention(nn.Module):
    """MQA over the last ``window`` tokens; RoPE on the first half of each head (partial_rotary_factor 0.5)."""

    def __init__(self, c: GriffinConfig, w: Mapping[str, torch.Tensor]):
        super().__init__()
        self.c = c
        self.q_proj, self.k_proj, self.v_proj = (_lin(w, n, bias=False) for n in ("q_proj", "k_proj", "v_proj"))
        self.o_proj = _lin(w, "o_proj")  # the output projection alone has a bias
        self.rot = int(c.head_dim * c.partial_rotary_factor)
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.rot, 2, dtype=torch.int64).float() / self.rot))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        freqs = pos.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        rot, rest = x[..., :self.rot], x[..., self.rot:]
        return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, state: GriffinState, i: int) -> torch.Tensor:
        c, t = self.c, x.shape[0]
        q = self._rope(self.q_proj(x).view(t, c.num_heads, c.head_dim), pos)
        k = self._rope(self.k_proj(x).view(t, c.num_kv_heads, c.head_dim), pos)
        v = self.v_proj(x).view(t, c.num_kv_heads, c.head_dim)
        keys = torch.cat([state.k[i], k.transpose(0, 1)], dim=1)
        vals = torch.cat([state.v[i], v.transpose(0, 1)], dim=1)
        k_pos = torch.arange(int(pos[-1]) + 1 - keys.shape[1], int(pos[-1]) + 1)
        mask = visibility_mask(pos, k_pos, c.window)  # keys k > q - window (transformers' sliding overlay)
        out = attention(q.transpose(0, 1)[None], keys[None], vals[None], mask[None], c.head_dim ** -0.5, None)
        keep = c.window - 1  # a later query sees at most the window - 1 tokens before it
        state.k[i], state.v[i] = keys[:, -keep:].clone(), vals[:, -keep:].clone()
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))


class GriffinModel(nn.Module):
    """The decoder. ``logits(ids, state)`` runs new tokens through the state and returns float32 logits."""

    def __init__(self, config: GriffinConfig, tensors: Mapping[str, torch.Tensor], dtype=torch.float32):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.device = torch.device("cpu")
        self.weight_format = "float32" if dtype == torch.float32 else "bfloat16"
        w = {k.removeprefix("model."): v.to(dtype) for k, v in tensors.items()}
        self.embed = w["embed_tokens.weight"]  # tied LM head
        self.blocks, self.mlps, self.norms = nn.ModuleList(), nn.ModuleList(), []
        for i, kind in enumerate(config.block_types):
            p = f"layers.{i}."
            sub = {k[len(p):]: v for k, v in w.items() if k.startswith(p)}
            tb = {k[len("temporal_block."):]: v for k, v in sub.items() if k.startswith("temporal_block.")}
            self.blocks.append(RecurrentBlock(config, tb) if kind == "recurrent" else LocalAttention(config, tb))
            mlp = {k[len("mlp_block."):]: v for k, v in sub.items() if k.startswith("mlp_block.")}
            self.mlps.append(nn.ModuleList([_lin(mlp, "gate_proj"), _lin(mlp, "up_proj"), _lin(mlp, "down_proj")]))
            self.norms.append((RMSNorm(sub["temporal_pre_norm.weight"], config.rms_norm_eps),
                               RMSNorm(sub["channel_pre_norm.weight"], config.rms_norm_eps)))
        self.final_norm = RMSNorm(w["final_norm.weight"], config.rms_norm_eps)
        # The embedding normalizer is sqrt(hidden) stored in bfloat16 (RecurrentGemmaModel.normalizer), so it is
        # rounded to bf16 precision even in a float32 model: 25.298 -> 25.25 for hidden 640.
        self.normalizer = torch.tensor(math.sqrt(config.hidden_size), dtype=torch.bfloat16).to(dtype)

    def new_sequence(self, max_len: int) -> GriffinState:
        return GriffinState(self)

    def step(self, ids: torch.Tensor, state: GriffinState, last_only: bool = False) -> torch.Tensor:
        out = self.logits(ids, state)
        return out[-1:] if last_only else out

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, state: GriffinState) -> torch.Tensor:
        """ids: [T] new tokens -> float32 logits [T, vocab]; advances ``state``."""
        pos = torch.arange(state.length, state.length + ids.shape[0])
        x = self.embed[ids] * self.normalizer
        for i, block in enumerate(self.blocks):
            pre, post = self.norms[i]
            h = block(pre(x), pos, state, i) + x           # temporal block, residual
            gate, up, down = self.mlps[i]
            x = down(F.gelu(gate(post(h)), approximate="tanh") * up(post(h))) + h  # GeGLU MLP with biases
        state.length += ids.shape[0]
        out = F.linear(self.final_norm(x), self.embed).float()
        cap = self.config.logits_soft_cap
        return torch.tanh(out / cap) * cap  # final logit soft-capping at 30
