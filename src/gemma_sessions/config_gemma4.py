"""Gemma4Config: the architecture of a Gemma 4 text decoder, from a Hugging Face ``config.json`` or GGUF metadata.

Contract: a frozen, keyword-only dataclass that says everything the model code and a KV cache need, and nothing
about weights. Every per-layer fact is resolved here once, so nothing downstream re-derives a pattern:

- ``layer_types[i]``: ``"full"`` or ``"sliding"`` (FULL / SLIDING from config.py); the last layer is always full;
- ``layer_head_dim(i)`` / ``layer_kv_heads(i)``: sliding layers use ``head_dim`` / ``num_kv_heads``, full layers
  ``global_head_dim`` / ``num_global_kv_heads`` (Gemma 4 gives them their own sizes: 256 vs 512 wide);
- ``kv_source(i)``: the layer whose K/V layer i attends over; i itself unless i is one of the last
  ``num_kv_shared_layers`` layers, which own no K/V and read the last non-shared layer of their own type;
- ``tensor_shapes()``: every weight the architecture has, by canonical name, with its shape (strict loading).

``fingerprint()`` is a stable hash of the architecture (part of the session-file model fingerprint).

Example::

    cfg = Gemma4Config.from_hf_config(json.loads(Path("config.json").read_text()))
    [cfg.kv_source(i) for i in range(cfg.num_layers)]   # e.g. [0, 1, 2, 3, 4, 5, 5, 4, 5, 4]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import FULL, SLIDING
from .errors import ModelError, UnsupportedModelError

ARCHITECTURE = "gemma4"
_HF_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Config:
    """Architecture hyper-parameters of a Gemma 4 text decoder (``Gemma4TextConfig`` in transformers)."""

    architecture: str = ARCHITECTURE
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLP; KV-shared layers use twice this with use_double_wide_mlp
    num_layers: int
    num_heads: int
    num_kv_heads: int  # sliding layers
    head_dim: int  # sliding layers
    num_global_kv_heads: int  # full layers
    global_head_dim: int  # full layers
    layer_types: tuple[str, ...]
    sliding_window: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    # RoPE per layer type: base, the share of the frequency pairs that rotate ("proportional" RoPE; 1.0 is the
    # default RoPE) and the factor every frequency is divided by.
    rope_theta_local: float = 10_000.0
    rope_partial_local: float = 1.0
    rope_factor_local: float = 1.0
    rope_theta_global: float = 1_000_000.0
    rope_partial_global: float = 0.25
    rope_factor_global: float = 1.0
    final_logit_softcapping: float | None = None
    attention_k_eq_v: bool = False  # full layers have no v_proj: V is the (v-normed, un-roped) k projection
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0  # per-layer embeddings (PLE) width; 0: no PLE
    vocab_size_per_layer_input: int = 0
    num_experts: int = 0  # 0: no MoE block
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = ()  # every id config.json lists as an end of sequence
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.architecture != ARCHITECTURE:
            raise UnsupportedModelError(f"Gemma4Config is for {ARCHITECTURE!r}, got {self.architecture!r}")
        if len(self.layer_types) != self.num_layers:
            raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if any(t not in (FULL, SLIDING) for t in self.layer_types):
            raise ModelError(f"layer_types must be 'full' or 'sliding', got {set(self.layer_types)}")
        if self.layer_types[-1] != FULL:
            raise ModelError("the last Gemma 4 layer must be a full-attention layer")
        if SLIDING in self.layer_types and self.sliding_window < 1:
            raise ModelError("sliding layers need a sliding_window")
        for kv, what in ((self.num_kv_heads, "num_kv_heads"), (self.num_global_kv_heads, "num_global_kv_heads")):
            if kv < 1 or self.num_heads % kv:
                raise ModelError(f"num_heads {self.num_heads} is not a multiple of {what} {kv}")
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ModelError("head dims must be even (RoPE rotates pairs)")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ModelError(f"num_kv_shared_layers {self.num_kv_shared_layers} must be in [0, {self.num_layers})")
        first = self.first_kv_shared_layer
        if not set(self.layer_types[first:]) <= set(self.layer_types[:first]):
            # Gemma4TextConfig.kv_sharing_modes raises the same: a shared layer needs a producer of its type.
            raise ModelError("every KV-shared layer needs a non-shared layer of its type to read from")
        if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
            raise ModelError(f"top_k_experts {self.top_k_experts} must be in [1, {self.num_experts}]")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ModelError("the MoE block needs moe_intermediate_size")
        if self.hidden_size_per_layer_input and self.vocab_size_per_layer_input < 1:
            raise ModelError("per-layer embeddings need vocab_size_per_layer_input")

    # ---------------------------------------------------------------------------------------------- per layer
    @property
    def first_kv_shared_layer(self) -> int:
        """Layers from here on own no K/V (``Gemma4TextModel.first_kv_shared_layer_idx``)."""
        return self.num_layers - self.num_kv_shared_layers

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def has_moe(self) -> bool:
        return self.num_experts > 0

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V ``layer`` attends over: itself, or for a KV-shared layer the last non-shared layer
        of its type (``Gemma4TextConfig.kv_sharing_modes``: those layers "store", the shared ones "reuse")."""
        first = self.first_kv_shared_layer
        if layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def is_kv_shared(self, layer: int) -> bool:
        return self.kv_source(layer) != layer

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.layer_types[layer] == FULL else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_global_kv_heads if self.layer_types[layer] == FULL else self.num_kv_heads

    def layer_intermediate_size(self, layer: int) -> int:
        """The dense MLP's width: doubled on KV-shared layers when use_double_wide_mlp (``Gemma4TextMLP``)."""
        return self.intermediate_size * (2 if self.use_double_wide_mlp and self.is_kv_shared(layer) else 1)

    def v_is_k(self, layer: int) -> bool:
        """attention_k_eq_v applies to full layers only (``Gemma4TextAttention.use_alternative_attention``)."""
        return self.attention_k_eq_v and self.layer_types[layer] == FULL

    def rope(self, layer: int) -> tuple[float, float, float]:
        """(theta, partial rotary share, frequency divisor) of this layer's RoPE."""
        if self.layer_types[layer] == FULL:
            return self.rope_theta_global, self.rope_partial_global, self.rope_factor_global
        return self.rope_theta_local, self.rope_partial_local, self.rope_factor_local

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Theoretical KV bytes for one token over the layers that own K/V (K and V)."""
        return sum(2 * self.layer_kv_heads(i) * self.layer_head_dim(i) * dtype_bytes
                   for i in range(self.num_layers) if not self.is_kv_shared(i))

    # ---------------------------------------------------------------------------------------------- tensors
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight, by canonical name (HF names without ``model.`` and ``.weight``), with its shape."""
        h, hq = self.hidden_size, self.num_heads
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (self.vocab_size, h), "norm": (h,)}
        p_dim, n = self.hidden_size_per_layer_input, self.num_layers
        if self.has_ple:
            shapes |= {"embed_tokens_per_layer": (self.vocab_size_per_layer_input, n * p_dim),
                       "per_layer_model_projection": (n * p_dim, h), "per_layer_projection_norm": (p_dim,)}
        for i in range(n):
            p, d, kv, inter = f"layers.{i}.", self.layer_head_dim(i), self.layer_kv_heads(i), \
                self.layer_intermediate_size(i)
            shapes |= {p + "self_attn.q_proj": (hq * d, h), p + "self_attn.o_proj": (h, hq * d),
                       p + "self_attn.q_norm": (d,)}
            if not self.is_kv_shared(i):
                shapes |= {p + "self_attn.k_proj": (kv * d, h), p + "self_attn.k_norm": (d,)}
                if not self.v_is_k(i):
                    shapes[p + "self_attn.v_proj"] = (kv * d, h)
            shapes |= {p + name: (h,) for name in ("input_layernorm", "post_attention_layernorm",
                                                   "pre_feedforward_layernorm", "post_feedforward_layernorm")}
            shapes |= {p + "layer_scalar": (1,), p + "mlp.gate_proj": (inter, h), p + "mlp.up_proj": (inter, h),
                       p + "mlp.down_proj": (h, inter)}
            if self.has_ple:
                shapes |= {p + "per_layer_input_gate": (p_dim, h), p + "per_layer_projection": (h, p_dim),
                           p + "post_per_layer_input_norm": (h,)}
            if self.has_moe:
                e, m = self.num_experts, self.moe_intermediate_size
                shapes |= {p + "router.proj": (e, h), p + "router.scale": (h,), p + "router.per_expert_scale": (e,),
                           p + "experts.gate_up_proj": (e, 2 * m, h), p + "experts.down_proj": (e, h, m)}
                shapes |= {p + name: (h,) for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                                                       "post_feedforward_layernorm_2")}
        return shapes

    # ---------------------------------------------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gemma4Config:
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of this config: changes whenever the architecture does."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> Gemma4Config:
        """Build from a ``config.json`` dict: ``gemma4_text`` (Gemma4ForCausalLM) or ``gemma4``
        (Gemma4ForConditionalGeneration, whose ``text_config`` is the decoder). Both forms of the per-layer sizes
        are read: the flat ``global_head_dim`` / ``num_global_key_value_heads`` keys and the newer
        ``per_layer_config`` overrides. Missing keys take ``Gemma4TextConfig``'s defaults."""
        cfg = _text_part(cfg)
        _refuse_unsupported(cfg)
        n = int(cfg.get("num_hidden_layers", 30))
        types = _hf_layer_types(cfg, n)
        head_dim, n_kv = int(cfg.get("head_dim", 256)), int(cfg.get("num_key_value_heads", 4))
        per_layer = [(head_dim, n_kv)] * n
        for i, over in _hf_overrides(cfg, types).items():
            per_layer[i] = (int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", n_kv)))
        (sliding_dim, sliding_kv), (full_dim, full_kv) = (_uniform(per_layer, types, t, (head_dim, n_kv))
                                                          for t in (SLIDING, FULL))
        local, full = _hf_rope(cfg.get("rope_parameters"))
        moe = bool(cfg.get("enable_moe_block", False))
        ple = int(cfg.get("hidden_size_per_layer_input", 256) or 0)
        eos = cfg.get("eos_token_id", 1)
        eos_ids = tuple(int(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None)
        return cls(
            vocab_size=int(cfg.get("vocab_size", 262_144)),
            hidden_size=int(cfg.get("hidden_size", 2304)),
            intermediate_size=int(cfg.get("intermediate_size", 9216)),
            num_layers=n,
            num_heads=int(cfg.get("num_attention_heads", 8)),
            num_kv_heads=sliding_kv, head_dim=sliding_dim, num_global_kv_heads=full_kv, global_head_dim=full_dim,
            layer_types=types,
            sliding_window=int(cfg.get("sliding_window", 512)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131_072)),
            rope_theta_local=local[0], rope_partial_local=local[1], rope_factor_local=local[2],
            rope_theta_global=full[0], rope_partial_global=full[1], rope_factor_global=full[2],
            final_logit_softcapping=_opt_float(cfg.get("final_logit_softcapping")),
            attention_k_eq_v=bool(cfg.get("attention_k_eq_v", False)),
            num_kv_shared_layers=int(cfg.get("num_kv_shared_layers", 0) or 0),
            use_double_wide_mlp=bool(cfg.get("use_double_wide_mlp", False)),
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=int(cfg.get("vocab_size_per_layer_input", 262_144)) if ple else 0,
            num_experts=_required_int(cfg, "num_experts") if moe else 0,
            top_k_experts=_required_int(cfg, "top_k_experts") if moe else 0,
            moe_intermediate_size=_required_int(cfg, "moe_intermediate_size") if moe else 0,
            bos_token_id=_first_int(cfg.get("bos_token_id"), 2),
            eos_token_id=eos_ids[0] if eos_ids else 1,
            eos_token_ids=eos_ids,
            pad_token_id=_first_int(cfg.get("pad_token_id"), 0),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                           rope_freqs: list[float] | None = None) -> Gemma4Config:
        """Build from the key/values llama.cpp's converter writes for ``gemma4`` (convert_hf_to_gguf.py
        ``Gemma4Model.set_gguf_parameters``), the tensors' canonical shapes (what the file does not say in keys:
        the vocabularies, attention_k_eq_v) and the ``rope_freqs`` tensor (proportional RoPE as frequency divisors:
        1 on rotated pairs, 1e30 on the rest)."""
        arch = meta.get("general.architecture")
        if arch != ARCHITECTURE:
            raise UnsupportedModelError(f"GGUF architecture {arch!r} is not {ARCHITECTURE!r}")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n = int(get("block_count"))
        pattern = get("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # one bool per layer: True = sliding
            types = tuple(SLIDING if s else FULL for s in pattern)
        else:  # a period (llama.cpp set_swa_pattern): every period-th layer is full
            period = int(pattern or 1)
            types = tuple(SLIDING if period and (i + 1) % period else FULL for i in range(n))
        if len(types) != n:
            raise ModelError(f"sliding_window_pattern has {len(types)} entries for {n} layers")
        shared = int(get("attention.shared_kv_layers", 0))
        full_dim, swa_dim = int(get("attention.key_length")), int(get("attention.key_length_swa"))
        for key, want in (("attention.value_length", full_dim), ("attention.value_length_swa", swa_dim),
                          ("rope.dimension_count", full_dim), ("rope.dimension_count_swa", swa_dim)):
            if int(get(key, want)) != want:  # V as wide as K; RoPE over the whole head (see rope_freqs)
                raise UnsupportedModelError(f"GGUF {arch}.{key} = {get(key)} != {want}")
        heads = _per_type(get("attention.head_count"), types, "attention.head_count")
        kv_heads = _per_type(get("attention.head_count_kv", heads[FULL]), types, "attention.head_count_kv")
        if heads[FULL] != heads[SLIDING]:
            raise UnsupportedModelError("GGUF head_count differs between layer types")
        ff = get("feed_forward_length")
        inter = int(ff[0] if isinstance(ff, list) else ff)
        double = isinstance(ff, list) and any(int(x) == 2 * inter for x in ff)
        n_experts = int(get("expert_count", 0) or 0)
        ple = int(get("embedding_length_per_layer_input", 0) or 0)
        v_on_full = {f"layers.{i}.self_attn.v_proj" in shapes for i in range(n - shared) if types[i] == FULL}
        if len(v_on_full) > 1:
            raise UnsupportedModelError("some full layers have attn_v and some do not")
        theta_global = _f32(get("rope.freq_base", 1_000_000.0))
        eos = meta.get("tokenizer.ggml.eos_token_id", 1)
        config = cls(
            vocab_size=int(shapes["embed_tokens"][0]) if "embed_tokens" in shapes else int(get("vocab_size")),
            hidden_size=int(get("embedding_length")),
            intermediate_size=inter,
            num_layers=n,
            num_heads=heads[FULL],
            num_kv_heads=kv_heads[SLIDING], head_dim=swa_dim, num_global_kv_heads=kv_heads[FULL],
            global_head_dim=full_dim,
            layer_types=types,
            sliding_window=int(get("attention.sliding_window", 0) or 0),
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 131_072)),
            # llama.cpp falls back to the full layers' base when freq_base_swa is absent; so do we.
            rope_theta_local=_f32(get("rope.freq_base_swa", theta_global)),
            rope_partial_local=1.0,
            rope_theta_global=theta_global,
            rope_partial_global=_partial_from_rope_freqs(rope_freqs, full_dim),
            final_logit_softcapping=None if get("final_logit_softcapping") is None
            else _f32(get("final_logit_softcapping")),
            attention_k_eq_v=v_on_full == {False},
            num_kv_shared_layers=shared,
            use_double_wide_mlp=double,
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=int(shapes["embed_tokens_per_layer"][0]) if ple else 0,
            num_experts=n_experts,
            top_k_experts=int(get("expert_used_count", 0) or 0) if n_experts else 0,
            moe_intermediate_size=int(get("expert_feed_forward_length", 0) or 0) if n_experts else 0,
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_id=int(eos),
            eos_token_ids=(int(eos),),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        )
        if isinstance(ff, list) and [int(x) for x in ff] != [config.layer_intermediate_size(i) for i in range(n)]:
            raise UnsupportedModelError(f"GGUF feed_forward_length {ff} is not Gemma 4's (double-wide) pattern")
        return config


# ------------------------------------------------------------------------------------------------ HF helpers


def _text_part(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    model_type = cfg.get("model_type")
    if model_type == "gemma4":  # Gemma4ForConditionalGeneration: the decoder is text_config
        text = cfg.get("text_config")
        if not isinstance(text, Mapping):
            raise ModelError("a gemma4 config.json needs a text_config")
        cfg, model_type = text, text.get("model_type", "gemma4_text")
    if model_type != "gemma4_text":
        raise UnsupportedModelError(f"config.json model_type {model_type!r} is not a Gemma 4 text model")
    return cfg


def _refuse_unsupported(cfg: Mapping[str, Any]) -> None:
    """Options transformers has that this decoder does not implement: refused by name, never silently wrong."""
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("use_bidirectional_attention='all' (an encoder) is not supported")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"hidden_activation {cfg.get('hidden_activation')!r} is not supported")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("attention_bias=True is not supported")
    if cfg.get("tie_word_embeddings", True) is False:
        raise UnsupportedModelError("an untied LM head is not supported (every Gemma ties it)")


def _hf_layer_types(cfg: Mapping[str, Any], n: int) -> tuple[str, ...]:
    names = cfg.get("layer_types")
    if names:
        unknown = set(names) - set(_HF_TYPES)
        if unknown:
            raise UnsupportedModelError(f"unknown layer types {sorted(unknown)}")
        if len(names) != n:
            raise ModelError(f"layer_types has {len(names)} entries for {n} layers")
        types = [_HF_TYPES[t] for t in names]
    else:  # Gemma4TextConfig's default: 5 sliding, then 1 full
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    types[-1] = FULL  # Gemma4TextConfig.__post_init__ forces the last layer to full attention (with a warning)
    return tuple(types)


def _hf_overrides(cfg: Mapping[str, Any], types: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """Per-layer {head_dim, num_key_value_heads} overrides, from either config form (Gemma4TextConfig.__post_init__).

    NOTE: in the flat form transformers applies ``num_global_key_value_heads`` only when ``attention_k_eq_v`` is set
    (``num_key_value_heads = num_global_key_value_heads if attention_k_eq_v else None``); without it full layers keep
    ``num_key_value_heads``. We do the same. The newer form states each override outright (keys "0".."N", maybe
    zero-padded).
    """
    plc = cfg.get("per_layer_config")
    if plc is None:
        over: dict[str, Any] = {"head_dim": cfg.get("global_head_dim", 512)}
        if cfg.get("attention_k_eq_v", False) and cfg.get("num_global_key_value_heads") is not None:
            over["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        return {i: over for i, t in enumerate(types) if t == FULL}
    out = {}
    for key, over in dict(plc).items():
        unknown = set(over) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise UnsupportedModelError(f"per_layer_config[{key}] overrides {sorted(unknown)}, which we do not support")
        i = int(key)
        if not 0 <= i < len(types):
            raise ModelError(f"per_layer_config names layer {key} of {len(types)}")
        out[i] = dict(over)
    return out


def _uniform(per_layer: list[tuple[int, int]], types: tuple[str, ...], kind: str,
             default: tuple[int, int]) -> tuple[int, int]:
    """The (head_dim, kv heads) every layer of a type shares (a cache page layout is per type)."""
    values = {v for v, t in zip(per_layer, types) if t == kind}
    if len(values) > 1:
        raise UnsupportedModelError(f"{kind} layers differ in (head_dim, kv heads): {sorted(values)}")
    return values.pop() if values else default


def _hf_rope(params: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((theta, partial, factor) of sliding layers, the same of full layers), from ``rope_parameters``.

    ``Gemma4TextRotaryEmbedding`` takes one parameter set per layer type; "default" RoPE ignores any
    partial_rotary_factor (``compute_default_rope_parameters``), "proportional" honours it and ``factor``
    (modeling_rope_utils ``_compute_proportional_rope_parameters``).
    """
    if params is None:  # Gemma4TextConfig's defaults
        params = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                     "rope_theta": 1_000_000.0}}
    out = []
    for kind in ("sliding_attention", "full_attention"):
        p = params.get(kind) if isinstance(params, Mapping) else None
        if not isinstance(p, Mapping):
            raise ModelError(f"rope_parameters needs a {kind!r} entry")
        rope_type = p.get("rope_type", "default")
        if rope_type == "default":
            out.append((float(p["rope_theta"]), 1.0, 1.0))
        elif rope_type == "proportional":
            out.append((float(p["rope_theta"]), float(p.get("partial_rotary_factor", 1.0)),
                        float(p.get("factor", 1.0))))
        else:
            raise UnsupportedModelError(f"{kind} rope_type {rope_type!r} is not supported")
    return out[0], out[1]


def _required_int(cfg: Mapping[str, Any], key: str) -> int:
    if cfg.get(key) is None:
        raise ModelError(f"enable_moe_block needs {key}")
    return int(cfg[key])


# ------------------------------------------------------------------------------------------------ GGUF helpers


def _per_type(value: Any, types: tuple[str, ...], key: str) -> dict[str, int]:
    """{type: value} from a scalar or a per-layer array that is uniform within each type."""
    if not isinstance(value, list):
        return {FULL: int(value), SLIDING: int(value)}
    out: dict[str, int] = {}
    for v, t in zip(value, types):
        if out.setdefault(t, int(v)) != int(v):
            raise UnsupportedModelError(f"GGUF {key} varies within {t} layers: {value}")
    out.setdefault(SLIDING, out.get(FULL, 0))
    return out


def _partial_from_rope_freqs(freqs: list[float] | None, head_dim: int) -> float:
    """The full layers' partial rotary share from llama.cpp's ``rope_freqs``: ``[1.0] * n_rot + [1e30] * rest``
    (convert_hf_to_gguf.py ``Gemma4Model.generate_extra_tensors``: a 1e30 divisor makes a frequency 0)."""
    if freqs is None:
        return 1.0
    n_rot = sum(1 for f in freqs if f == 1.0)
    if len(freqs) != head_dim // 2 or any(f < 1e29 for f in freqs[n_rot:]) or any(f != 1.0 for f in freqs[:n_rot]):
        raise UnsupportedModelError("rope_freqs is not proportional RoPE's [1, ..., 1, 1e30, ...] pattern")
    partial = 2 * n_rot / head_dim
    if int(partial * head_dim // 2) != n_rot:  # the model recomputes n_rot as transformers does; it must agree
        raise UnsupportedModelError(f"rope_freqs rotates {n_rot} pairs of {head_dim // 2}: not representable")
    return partial


def _f32(v: Any) -> float:
    """A GGUF float32 value as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07): a GGUF
    converted from a config.json then gives the very same config, and fingerprint."""
    return float(str(np.float32(v)))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _first_int(v: Any, default: int) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)
