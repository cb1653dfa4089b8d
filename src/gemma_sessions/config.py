"""ModelConfig: the architecture of a Gemma model, from GGUF metadata or a Hugging Face ``config.json``.

Contract: a frozen, keyword-only dataclass that says everything the model code needs and nothing about weights.
``layer_types`` is resolved per layer ("full" or "sliding") so nothing downstream re-derives the pattern, and
``fingerprint()`` is a stable hash of the architecture (part of the session-file model fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .errors import ModelError, UnsupportedModelError

ARCHITECTURES = ("gemma", "gemma2", "gemma3")
FULL, SLIDING = "full", "sliding"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture hyper-parameters of a Gemma 1/2/3 text decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float = 256.0
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    rope_theta_global: float = 10_000.0
    rope_theta_local: float = 10_000.0
    rope_scaling_global: float = 1.0  # linear RoPE scaling factor on full-attention layers (Gemma 3 4B and up)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {self.architecture!r}; known: {ARCHITECTURES}")
        if len(self.layer_types) != self.num_layers:
            raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if any(t not in (FULL, SLIDING) for t in self.layer_types):
            raise ModelError(f"layer_types must be 'full' or 'sliding', got {set(self.layer_types)}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ModelError("sliding layers need a sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def has_post_norms(self) -> bool:
        """Gemma 2 and 3 have four norms per layer (pre/post attention, pre/post MLP); Gemma 1 has two."""
        return self.architecture != "gemma"

    @property
    def has_qk_norm(self) -> bool:
        """Gemma 3 replaced attention soft-capping with an RMSNorm on q and k per head."""
        return self.architecture == "gemma3"

    def rope_theta(self, layer: int) -> float:
        return self.rope_theta_local if self.layer_types[layer] == SLIDING else self.rope_theta_global

    def rope_scaling(self, layer: int) -> float:
        return 1.0 if self.layer_types[layer] == SLIDING else self.rope_scaling_global

    # The KV layout's view of the layers (``cache.layout.LayerShapes``): Gemma 1/2/3 give every layer the same K/V
    # shape and every layer its own K/V (Gemma 4's config differs per layer kind and shares KV across its last layers).
    def layer_kv_heads(self, layer: int) -> int:
        return self.num_kv_heads

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim

    def kv_source(self, layer: int) -> int:
        return layer

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Theoretical KV bytes for one token over all layers (K and V)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of this config: changes whenever the architecture does."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> ModelConfig:
        """Build from GGUF key/values (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"GGUF architecture {arch!r} is not a Gemma text model we support")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_layers = int(get("block_count"))
        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        n_kv = get("attention.head_count_kv", n_heads)
        vocab = meta.get("tokenizer.ggml.tokens")
        vocab_size = len(vocab) if vocab is not None else int(get("vocab_size"))
        window = get("attention.sliding_window")
        # NOTE: GGUF has no query_pre_attn_scalar. llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2/3) scales by
        # 1/sqrt(hidden/heads) for the 27B models and 1/sqrt(head_dim) otherwise; we mirror it.
        qpas = hidden / n_heads if n_layers in (46, 62) else head_dim
        if arch == "gemma":
            types, window = (FULL,) * n_layers, None
        elif arch == "gemma2":
            types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n_layers))  # even layers slide
        else:
            types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(n_layers))  # 5 sliding, then 1 global
        scaling = 1.0
        if get("rope.scaling.type") == "linear":
            scaling = float(get("rope.scaling.factor", 1.0))
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 8192)),
            query_pre_attn_scalar=float(qpas),
            layer_types=types,
            sliding_window=int(window) if window else None,
            # Gemma 3: GGUF's rope.freq_base is the global base; the local base (10k) is not in the file.
            rope_theta_global=float(get("rope.freq_base", 10_000.0)),
            rope_theta_local=10_000.0,
            rope_scaling_global=scaling,
            attn_logit_softcapping=_opt_float(get("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(get("final_logit_softcapping")),
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
            eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (Gemma, Gemma2, Gemma3 text, Gemma3 multimodal)."""
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and "text_config" in cfg:  # Gemma3ForConditionalGeneration: take the text part
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(model_type)
        if arch is None:
            raise UnsupportedModelError(f"config.json model_type {model_type!r} is not a Gemma text model")
        n_layers = int(cfg["num_hidden_layers"])
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        types = _hf_layer_types(arch, cfg, n_layers)
        theta_global, theta_local, scaling = _hf_rope(arch, cfg)
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            layer_types=types,
            sliding_window=int(cfg["sliding_window"]) if SLIDING in types else None,
            rope_theta_global=theta_global,
            rope_theta_local=theta_local,
            rope_scaling_global=scaling,
            attn_logit_softcapping=_opt_float(cfg.get("attn_logit_softcapping")) if arch != "gemma" else None,
            final_logit_softcapping=_opt_float(cfg.get("final_logit_softcapping")) if arch != "gemma" else None,
            bos_token_id=_first_int(cfg.get("bos_token_id"), 2),
            eos_token_id=_first_int(cfg.get("eos_token_id"), 1),
            pad_token_id=_first_int(cfg.get("pad_token_id"), 0),
        )


def _hf_layer_types(arch: str, cfg: Mapping[str, Any], n_layers: int) -> tuple[str, ...]:
    if arch == "gemma":
        return (FULL,) * n_layers
    if cfg.get("layer_types"):
        names = {"full_attention": FULL, "sliding_attention": SLIDING}
        return tuple(names[t] for t in cfg["layer_types"])
    pattern = 2 if arch == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))


def _hf_rope(arch: str, cfg: Mapping[str, Any]) -> tuple[float, float, float]:
    """(global theta, local theta, global linear scaling) from either the old or the new (v5) config keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
        scaling = float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
        return float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4)), scaling
    if isinstance(params, Mapping) and "rope_theta" in params:  # one set for every layer (Gemma 1/2 in v5)
        theta = float(params["rope_theta"])
        return theta, theta, 1.0
    theta = float(cfg.get("rope_theta", 1e6 if arch == "gemma3" else 1e4))
    local = float(cfg.get("rope_local_base_freq", 1e4 if arch == "gemma3" else theta))
    rs = cfg.get("rope_scaling") or {}
    scaling = float(rs.get("factor", 1.0)) if rs.get("rope_type", rs.get("type")) == "linear" else 1.0
    return theta, local, scaling


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _first_int(v: Any, default: int) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)
