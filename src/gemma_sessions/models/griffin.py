"""RecurrentGemma (Griffin) in plain PyTorch: the model and its fixed-size per-sequence state.

Contract: ``GriffinModel(config, tensors)`` runs one sequence through a :class:`GriffinState` that holds, per
recurrent layer, the last ``conv_width - 1`` conv inputs and the RG-LRU state, and per attention layer the K/V of
the last ``window`` tokens: the state stays the same size however long the sequence grows. Prefill at once, token by
token or in chunks gives the same logits (the conv and the scan carry across chunk boundaries).

The engine keeps many sequences' states in one :class:`GriffinSlots` pool (``cache/state.py``) and advances the
decoding ones together with ``forward_slots`` (one row per slot); a lone sequence is a pool of one. Parity with
transformers: ``tests/parity/test_griffin_parity.py``; engine, sessions and store: ``tests/unit/test_griffin_engine.py``.

Every quirk follows transformers' ``models/recurrent_gemma/modeling_recurrent_gemma.py`` and is commented where it
happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import RMSNorm, attention, rotate_half


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

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of this config (part of the model fingerprint session files carry)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight this config needs, by its HF name (without the ``model.`` prefix)."""
        c, w, bw = self, self.lru_width, self.lru_width // self.num_heads
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                              "final_norm.weight": (c.hidden_size,)}
        for i, kind in enumerate(c.block_types):
            p = f"layers.{i}."
            shapes[p + "temporal_pre_norm.weight"] = shapes[p + "channel_pre_norm.weight"] = (c.hidden_size,)
            t = p + "temporal_block."
            if kind == "recurrent":
                for name, shape in (("linear_y", (w, c.hidden_size)), ("linear_x", (w, c.hidden_size)),
                                    ("linear_out", (c.hidden_size, w))):
                    shapes[f"{t}{name}.weight"], shapes[f"{t}{name}.bias"] = shape, (shape[0],)
                shapes[t + "conv_1d.weight"], shapes[t + "conv_1d.bias"] = (w, 1, c.conv_width), (w,)
                shapes[t + "rg_lru.recurrent_param"] = (w,)
                for gate in ("input_gate", "recurrent_gate"):
                    shapes[f"{t}rg_lru.{gate}_weight"] = (c.num_heads, bw, bw)
                    shapes[f"{t}rg_lru.{gate}_bias"] = (c.num_heads, bw)
            else:
                shapes[t + "q_proj.weight"] = (c.num_heads * c.head_dim, c.hidden_size)
                shapes[t + "k_proj.weight"] = shapes[t + "v_proj.weight"] = (c.num_kv_heads * c.head_dim,
                                                                            c.hidden_size)
                shapes[t + "o_proj.weight"], shapes[t + "o_proj.bias"] = (c.hidden_size, c.num_heads * c.head_dim), \
                    (c.hidden_size,)
            m = p + "mlp_block."
            for name, shape in (("gate_proj", (c.intermediate_size // 2, c.hidden_size)),
                                ("up_proj", (c.intermediate_size // 2, c.hidden_size)),
                                ("down_proj", (c.hidden_size, c.intermediate_size // 2))):
                shapes[f"{m}{name}.weight"], shapes[f"{m}{name}.bias"] = shape, (shape[0],)
        return shapes


class GriffinSlots:
    """The fixed-size recurrent state of ``num_slots`` sequences, one row per slot (the engine's slot pool; a lone
    sequence is a pool of one).

    Per recurrent layer: ``conv[i]`` [S, conv_width - 1, lru_width] (the last conv inputs) and ``rnn[i]``
    [S, lru_width] (the RG-LRU state, float32). Per attention layer: ``k[i]``/``v[i]`` [S, kv_heads, R, head_dim], a
    ring of R = window - 1 cells (a query sees itself and the window - 1 tokens before it); ``kpos`` [S, R] holds
    each cell's position (-1: empty), shared by all attention layers. A slot's size never depends on its length.

    NOTE: allocated with torch.empty (memory becomes resident as slots are used, like the KV pages); a slot is
    emptied by ``reset`` (or overwritten by ``copy``/``write``) before a sequence uses it.
    """

    def __init__(self, model: GriffinModel, num_slots: int):
        c, dt, dev = model.config, model.dtype, model.device
        self.num_slots = num_slots
        self.ring = max(c.window - 1, 1)
        self.conv: dict[int, torch.Tensor] = {}
        self.rnn: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(c.block_types):
            if kind == "recurrent":
                self.conv[i] = torch.empty(num_slots, c.conv_width - 1, c.lru_width, dtype=dt, device=dev)
                self.rnn[i] = torch.empty(num_slots, c.lru_width, dtype=torch.float32, device=dev)
            else:
                shape = (num_slots, c.num_kv_heads, self.ring, c.head_dim)
                self.k[i] = torch.empty(shape, dtype=dt, device=dev)
                self.v[i] = torch.empty(shape, dtype=dt, device=dev)
        self.kpos = torch.empty(num_slots, self.ring, dtype=torch.long, device=dev)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every pool tensor by a stable name (``conv.3``, ``rnn.3``, ``k.2``, ``v.2``, ``kpos``)."""
        out = {f"{kind}.{i}": t for kind, d in (("conv", self.conv), ("rnn", self.rnn), ("k", self.k), ("v", self.v))
               for i, t in d.items()}
        out["kpos"] = self.kpos
        return out

    def slot_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors().values())

    def nbytes(self) -> int:
        return self.slot_bytes() * self.num_slots

    def reset(self, slot: int) -> None:
        """Empty a slot: the state of a sequence of length 0."""
        for name, t in self.tensors().items():
            t[slot] = -1 if name == "kpos" else 0

    def copy(self, src: int, dst: int) -> None:
        for t in self.tensors().values():
            t[dst] = t[src]

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """A CPU copy of one slot's state."""
        return {name: t[slot].cpu().clone() for name, t in self.tensors().items()}

    def write(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Load a state made by :meth:`read` (same model config); raises ValueError on a name or shape mismatch."""
        mine = self.tensors()
        if set(state) != set(mine):
            raise ValueError("recurrent state does not match this model's layers")
        for name, t in mine.items():
            if tuple(state[name].shape) != tuple(t.shape[1:]):
                raise ValueError(f"recurrent state {name}: shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(t.shape[1:])}")
        for name, t in mine.items():
            t[slot] = state[name].to(device=t.device, dtype=t.dtype)


class GriffinState:
    """One sequence's recurrent state (fixed size): a pool of one slot and the sequence's length."""

    def __init__(self, model: GriffinModel):
        self.slots = GriffinSlots(model, 1)
        self.slots.reset(0)
        self.length = 0

    def nbytes(self) -> int:
        return self.slots.nbytes()


def _lin(w: Mapping[str, torch.Tensor], name: str, bias: bool = True) -> nn.Linear:
    weight = w[f"{name}.weight"]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta")  # no init: the weights follow
    layer.weight = nn.Parameter(weight, requires_grad=False)  # the model's dtype (float32 or bfloat16), no copy
    if bias:
        layer.bias = nn.Parameter(w[f"{name}.bias"], requires_grad=False)
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

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pool: GriffinSlots, slots: torch.Tensor, i: int
                ) -> torch.Tensor:
        c, t = self.c, x.shape[1]  # x: [B, T, hidden], one row per slot
        y = F.gelu(self.linear_y(x), approximate="tanh")
        xb = self.linear_x(x)                                             # [B, T, W]
        seq = torch.cat([pool.conv[i][slots], xb], dim=1)                 # [B, K-1+T, W]
        # Causal depthwise Conv1D of width K over the previous K-1 inputs (zeros at the start, like the padding of
        # transformers' prefill) and the current one.
        conv = sum(seq[:, j:j + t] * self.conv_w[j] for j in range(c.conv_width)) + self.conv_b
        pool.conv[i][slots] = seq[:, -(c.conv_width - 1):]
        return self.linear_out(self._rg_lru(conv, pos, pool, slots, i) * y)

    def _rg_lru(self, x: torch.Tensor, pos: torch.Tensor, pool: GriffinSlots, slots: torch.Tensor, i: int
                ) -> torch.Tensor:
        c, (b, t) = self.c, x.shape[:2]
        heads = x.reshape(b, t, c.num_heads, -1)
        # Gates are block-diagonal (one [bw, bw] matrix per head), then sigmoid (RecurrentGemmaRglru.forward).
        gate_x = torch.sigmoid(torch.einsum("bthi,hij->bthj", heads, self.gx_w) + self.gx_b).reshape(b, t, -1)
        gate_a = torch.sigmoid(torch.einsum("bthi,hij->bthj", heads, self.ga_w) + self.ga_b).reshape(b, t, -1)
        log_a = -8.0 * gate_a * F.softplus(self.a_param)                  # a = sigmoid(param)^(8 * gate), in log
        a = torch.exp(log_a)
        reset = (pos == 0)[..., None]  # a document start: no memory, and the input is not rescaled
        multiplier = torch.where(reset, torch.ones_like(a), torch.sqrt(1 - torch.exp(2 * log_a)))
        normalized = x * gate_x * multiplier.to(x.dtype)
        a = a * ~reset
        h = pool.rnn[i][slots]
        out = torch.empty_like(normalized)
        for s in range(t):  # the linear recurrence h_t = a_t * h_{t-1} + x_t, accumulated in float32
            h = a[:, s].float() * h + normalized[:, s].float()
            out[:, s] = h.to(out.dtype)
        pool.rnn[i][slots] = h
        return out


class LocalAttention(nn.Module):
    """MQA over the last ``window`` tokens; RoPE on the first half of each head (partial_rotary_factor 0.5)."""

    def __init__(self, c: GriffinConfig, w: Mapping[str, torch.Tensor]):
        super().__init__()
        self.c = c
        self.q_proj, self.k_proj, self.v_proj = (_lin(w, n, bias=False) for n in ("q_proj", "k_proj", "v_proj"))
        self.o_proj = _lin(w, "o_proj")  # the output projection alone has a bias
        self.rot = int(c.head_dim * c.partial_rotary_factor)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, self.rot, 2, dtype=torch.int64).float() / self.rot))
        self.inv_freq = inv.to(self.q_proj.weight.device)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: [B, T, heads, D]; pos: [B, T]
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, :, None], emb.sin().to(x.dtype)[:, :, None]
        rot, rest = x[..., :self.rot], x[..., self.rot:]
        return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pool: GriffinSlots, slots: torch.Tensor, i: int,
                mask: torch.Tensor) -> torch.Tensor:
        c, (b, t) = self.c, x.shape[:2]
        q = self._rope(self.q_proj(x).view(b, t, c.num_heads, c.head_dim), pos)
        k = self._rope(self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim), pos)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim)
        # keys: the ring (earlier tokens, in cell order) then the new tokens; ``mask`` says which are visible
        keys = torch.cat([pool.k[i][slots], k.transpose(1, 2)], dim=2)
        vals = torch.cat([pool.v[i][slots], v.transpose(1, 2)], dim=2)
        out = attention(q.transpose(1, 2), keys, vals, mask, c.head_dim ** -0.5, None)
        n = min(t, pool.ring)  # a later query sees at most the window - 1 tokens before it: keep the last n
        cells = pos[:, -n:] % pool.ring
        pool.k[i][slots[:, None], :, cells] = k[:, -n:]
        pool.v[i][slots[:, None], :, cells] = v[:, -n:]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GriffinModel(nn.Module):
    """The decoder. ``logits(ids, state)`` runs new tokens through the state and returns float32 logits."""

    def __init__(self, config: GriffinConfig, tensors: Mapping[str, torch.Tensor], dtype=torch.float32,
                 device: str | torch.device | None = None):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.device = torch.device(device or "cpu")
        self.weight_format = "float32" if dtype == torch.float32 else "bfloat16"
        w = {k.removeprefix("model."): v.to(device=self.device, dtype=dtype) for k, v in tensors.items()}
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
        self.normalizer = torch.tensor(math.sqrt(config.hidden_size), dtype=torch.bfloat16).to(self.device, dtype)

    def new_sequence(self, max_len: int) -> GriffinState:
        return GriffinState(self)

    def new_slots(self, num_slots: int) -> GriffinSlots:
        return GriffinSlots(self, num_slots)

    def step(self, ids: torch.Tensor, state: GriffinState, last_only: bool = False) -> torch.Tensor:
        out = self.logits(ids, state)
        return out[-1:] if last_only else out

    def logits(self, ids: torch.Tensor, state: GriffinState) -> torch.Tensor:
        """ids: [T] new tokens -> float32 logits [T, vocab]; advances ``state``."""
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        out = self.forward_slots(ids.reshape(1, -1), zero, zero + state.length, state.slots)[0]
        state.length += ids.shape[0]
        return out

    @torch.inference_mode()
    def forward_slots(self, ids: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, pool: GriffinSlots,
                      last_only: bool = False) -> torch.Tensor:
        """Advance B sequences by T tokens each: ids [B, T]; ``slots`` [B] their pool rows; ``start`` [B] their
        lengths so far. Returns float32 logits [B, T, vocab] ([B, 1, vocab] with ``last_only``)."""
        c, t = self.config, ids.shape[1]
        pos = start[:, None] + torch.arange(t, device=ids.device)        # [B, T]
        x = self.embed[ids] * self.normalizer
        # Which keys each query sees (the same for every attention layer): filled ring cells and new tokens at
        # positions q - window < k <= q (transformers' sliding-window overlay).
        kpos = torch.cat([pool.kpos[slots], pos], dim=1)[:, None, :]      # [B, 1, R+T]
        q = pos[:, :, None]
        mask = (kpos >= 0) & (kpos <= q) & (kpos > q - c.window)         # [B, T, R+T]
        for i, block in enumerate(self.blocks):
            pre, post = self.norms[i]
            if isinstance(block, LocalAttention):
                h = block(pre(x), pos, pool, slots, i, mask) + x           # temporal block, residual
            else:
                h = block(pre(x), pos, pool, slots, i) + x
            gate, up, down = self.mlps[i]
            x = down(F.gelu(gate(post(h)), approximate="tanh") * up(post(h))) + h  # GeGLU MLP with biases
        n = min(t, pool.ring)
        pool.kpos[slots[:, None], pos[:, -n:] % pool.ring] = pos[:, -n:]
        if last_only:
            x = x[:, -1:]
        out = F.linear(self.final_norm(x), self.embed).float()
        cap = self.config.logits_soft_cap
        return torch.tanh(out / cap) * cap  # final logit soft-capping at 30
