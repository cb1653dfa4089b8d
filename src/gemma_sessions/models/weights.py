"""GGUF and safetensors files -> float32 tensors under one canonical naming, strictly checked.

Contract: ``read_gguf(path)`` and ``read_safetensors(dir_or_file)`` return ``(metadata, tensors)`` where tensors
use the canonical names below (Hugging Face names without ``model.`` and ``.weight``), in PyTorch ``[out, in]``
order and the Hugging Face norm convention. ``check_tensors(config, tensors)`` raises ``WeightsError`` naming
every missing, unexpected or misshapen tensor. Nothing here knows about the layers' code.

Canonical names: ``embed_tokens``, ``norm``, ``layers.{i}.self_attn.{q,k,v,o}_proj``,
``layers.{i}.self_attn.{q,k}_norm`` (Gemma 3), ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.{input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelError, UnsupportedModelError, WeightsError
from . import quant
from .gguf_file import GGUFFile
from .quant import QuantWeight

_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, with its shape."""
    c = config
    h, d = c.hidden_size, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (c.vocab_size, h), "norm": (h,)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj": (c.num_heads * d, h), p + "self_attn.k_proj": (c.num_kv_heads * d, h),
            p + "self_attn.v_proj": (c.num_kv_heads * d, h), p + "self_attn.o_proj": (h, c.num_heads * d),
            p + "mlp.gate_proj": (c.intermediate_size, h), p + "mlp.up_proj": (c.intermediate_size, h),
            p + "mlp.down_proj": (h, c.intermediate_size),
            p + "input_layernorm": (h,), p + "post_attention_layernorm": (h,),
        }
        if c.has_post_norms:
            shapes |= {p + "pre_feedforward_layernorm": (h,), p + "post_feedforward_layernorm": (h,)}
        if c.has_qk_norm:
            shapes |= {p + "self_attn.q_norm": (d,), p + "self_attn.k_norm": (d,)}
    return shapes


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Raise WeightsError listing missing, unexpected and misshapen tensors (strict loading)."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    misshapen = [f"{n}: {tuple(tensors[n].shape)} != {want[n]}" for n in want
                 if n in tensors and tuple(tensors[n].shape) != want[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if misshapen:
        problems.append(f"misshapen tensors: {_short(misshapen)}")
    if problems:
        raise WeightsError("; ".join(problems))


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------------------------ GGUF


def gguf_tensor_name(name: str, architecture: str) -> str:
    """Map a GGUF tensor name to the canonical name (raises WeightsError for unknown names)."""
    if name == "token_embd.weight":
        return "embed_tokens"
    if name == "output_norm.weight":
        return "norm"
    if name == "output.weight":
        return "lm_head"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or m.group(2) not in _GGUF_LAYER:
        raise WeightsError(f"unexpected tensor in GGUF: {name}")
    part = _GGUF_LAYER[m.group(2)]
    if architecture == "gemma" and part == "pre_feedforward_layernorm":
        part = "post_attention_layernorm"  # Gemma 1's only pre-MLP norm (transformers' name for it)
    return f"layers.{m.group(1)}.{part}"


def read_gguf(path: str | Path, progress: Callable[[Iterable], Iterable] | None = None, quantized: bool = False,
              reader: GGUFFile | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor | QuantWeight], GGUFFile]:
    """Read a GGUF file: (metadata, canonical tensors, the parsed file).

    Every tensor type the ``gguf`` package can dequantize is accepted (F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K...).
    Tensors are float32, except with ``quantized=True``: 2-D weights whose block type has an exact grouped int8 form
    (models/quant.py: Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K) come as :class:`QuantWeight` straight from their
    blocks, never expanded to float32. ``reader``: the file already parsed (loading peeks at its architecture).
    """
    reader = reader or GGUFFile(path)
    meta = reader.metadata
    arch = meta.get("general.architecture", "?")
    tensors: dict[str, torch.Tensor] = {}
    items = progress(reader.tensors) if progress else reader.tensors
    for t in items:
        name = gguf_tensor_name(t.name, arch)
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml order [in, out] -> PyTorch [out, in]
        if quantized and len(shape) == 2 and quant.supported(t.tensor_type):
            qw = quant.from_gguf(t.data, t.tensor_type, shape)
            if qw is not None:
                tensors[name] = qw
                continue
        tensor = dequantize_tensor(t.data, t.tensor_type, t.name).reshape(shape)
        if name.endswith("norm"):
            # llama.cpp's converter stores Gemma norm weights as (1 + w) ("norm_shift"); transformers' GGUF
            # loader subtracts the 1 again. RMSNorm here uses the (1 + w) form, so undo the shift.
            tensor = tensor - 1.0
        tensors[name] = tensor
    if "lm_head" in tensors:  # Gemma ties the LM head to the embedding; a separate one must be the same
        lm = _float(tensors.pop("lm_head"))
        if not torch.equal(lm, _float(tensors.get("embed_tokens", lm))):
            raise WeightsError("output.weight differs from token_embd.weight; Gemma's LM head is tied")
    return meta, tensors, reader


def _float(t: torch.Tensor | QuantWeight) -> torch.Tensor:
    return t.dequantize() if isinstance(t, QuantWeight) else t


def dequantize_tensor(data: np.ndarray, qtype: Any, name: str = "?") -> torch.Tensor:
    """A GGUF tensor's raw data -> a flat float32 tensor.

    F32/F16/BF16 and Q8_0 (the embedding of most GGUFs) take a vectorised torch path; every other type goes
    through the ``gguf`` package's block dequantizer over the whole tensor at once (its row-group helper is ~50x
    slower on a 262k-row embedding).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import _type_traits

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # one copy out of the read-only memmap
    if qtype == Q.F32:
        return raw.view(torch.float32).clone()
    if qtype == Q.F16:
        return raw.view(torch.float16).float()
    if qtype == Q.BF16:
        return raw.view(torch.bfloat16).float()
    if qtype == Q.Q8_0:  # block: float16 scale d, then 32 int8 values; x = d * q
        blocks = raw.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(-1)
    quant = _type_traits.get(qtype)
    if quant is None:
        raise UnsupportedModelError(f"{name}: GGUF tensor type {getattr(qtype, 'name', qtype)} cannot be dequantized")
    quant.init_grid()
    _, type_size = GGML_QUANT_SIZES[qtype]
    out = quant.dequantize_blocks(raw.numpy().reshape(-1, type_size))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1)


# ------------------------------------------------------------------------------------------------ safetensors


_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "language_model.")


def hf_tensor_name(name: str) -> str | None:
    """Canonical name of an HF tensor; None for tensors we knowingly ignore (vision tower, tied lm_head)."""
    if name.startswith(("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                        "model.multi_modal_projector.")):
        return None
    for prefix in _HF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return None  # tied to the embedding in every Gemma
    return name.removesuffix(".weight")


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model: one file, or a directory (single or sharded with an index)."""
    p = Path(path)
    if p.is_file():
        return [p]
    index = p / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [p / s for s in shards]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise WeightsError(f"sharded checkpoint is missing shards: {absent}")
        return files
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{p}: no .safetensors files")
    return files


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Canonical float32 tensors from a single or sharded HF safetensors checkpoint."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        for raw, value in load_file(str(f)).items():
            name = hf_tensor_name(raw)
            if name is None:
                continue
            if name in tensors:
                raise WeightsError(f"tensor {raw} appears in more than one shard")
            tensors[name] = value.float()
    return tensors
