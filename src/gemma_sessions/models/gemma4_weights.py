"""Gemma 4 weights: HF safetensors and llama.cpp GGUF files -> canonical tensors, strictly checked.

Contract: ``read_safetensors(dir_or_file)`` and ``read_gguf(reader)`` return tensors under the canonical names of
``Gemma4Config.tensor_shapes()`` (Hugging Face names without ``model.`` / ``model.language_model.`` and ``.weight``),
in PyTorch order and float32, with two exceptions:

- the per-layer embedding table (``embed_tokens_per_layer``, 262k x layers x 256 on E2B) is only ever gathered by
  rows, so it stays as stored: a bf16/f16 table from safetensors or GGUF keeps its dtype, a block-quantized GGUF
  table stays its block bytes (:class:`GGUFRows`, dequantized a gathered row at a time);
- ``read_gguf(..., quantized=True)`` (the int8 fast mode) returns 2-D weights whose block type has an exact grouped
  int8 form as ``quant.QuantWeight`` (the GGUF's own codes, models/quant.py), as Gemma 1-3's reader does.

``check_tensors(config, tensors)`` raises ``WeightsError`` naming every missing, unexpected or misshapen tensor.
Nothing here knows about the layers' code.

Layouts read:
- ``Gemma4ForCausalLM`` (``gemma4_text``): ``model.*`` (+ a tied ``lm_head.weight``, ignored);
- ``Gemma4ForConditionalGeneration`` (``gemma4``): ``model.language_model.*``; the vision and audio towers and
  their embedders (``model.vision_tower.*``, ``model.audio_tower.*``, ``model.embed_vision.*``,
  ``model.embed_audio.*``) are skipped unread;
- GGUF ``gemma4`` with llama.cpp's tensor names (gguf-py ``constants.py`` MODEL_ARCH.GEMMA4, ``tensor_mapping.py``,
  ``convert_hf_to_gguf.py`` ``Gemma4Model``): norms are stored unshifted (its ``norm_shift`` is 0), the router
  scale as ``ffn_gate_inp.scale``, the per-expert scale as ``ffn_down_exps.scale``, ``layer_scalar`` as
  ``layer_output_scale``, experts fused (``ffn_gate_up_exps``) or split (``ffn_gate_exps`` + ``ffn_up_exps``), and
  proportional RoPE as the ``rope_freqs`` tensor, returned apart for the config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from typing import Any

import numpy as np
import torch

from ..config_gemma4 import Gemma4Config
from ..errors import WeightsError
from . import quant
from .gguf_file import GGUFFile
from .weights import dequantize_tensor, safetensors_files

_TOWERS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
_TEXT_PREFIXES = ("model.language_model.", "model.")
_PLE_TABLE = "embed_tokens_per_layer"
_KEEP_DTYPE = {_PLE_TABLE}  # gathered by rows only: a bf16 table stays bf16 (exact, half the memory)

_GGUF_GLOBAL = {
    "token_embd.weight": "embed_tokens", "output_norm.weight": "norm", "output.weight": "lm_head",
    "per_layer_token_embd.weight": "embed_tokens_per_layer",
    "per_layer_model_proj.weight": "per_layer_model_projection",
    "per_layer_proj_norm.weight": "per_layer_projection_norm", "rope_freqs.weight": "rope_freqs",
}
_GGUF_LAYER = {
    "attn_q.weight": "self_attn.q_proj", "attn_k.weight": "self_attn.k_proj", "attn_v.weight": "self_attn.v_proj",
    "attn_output.weight": "self_attn.o_proj", "attn_q_norm.weight": "self_attn.q_norm",
    "attn_k_norm.weight": "self_attn.k_norm",
    "attn_norm.weight": "input_layernorm", "post_attention_norm.weight": "post_attention_layernorm",
    "ffn_norm.weight": "pre_feedforward_layernorm", "post_ffw_norm.weight": "post_feedforward_layernorm",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2", "post_ffw_norm_1.weight": "post_feedforward_layernorm_1",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2",
    "ffn_gate.weight": "mlp.gate_proj", "ffn_up.weight": "mlp.up_proj", "ffn_down.weight": "mlp.down_proj",
    "ffn_gate_inp.weight": "router.proj", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj", "ffn_down_exps.weight": "experts.down_proj",
    "ffn_gate_exps.weight": "experts.gate_proj", "ffn_up_exps.weight": "experts.up_proj",  # split: joined on read
    "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate", "proj.weight": "per_layer_projection",
    "post_norm.weight": "post_per_layer_input_norm",
}


# ------------------------------------------------------------------------------------------------ checks


def check_tensors(config: Gemma4Config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the model uses, after raising WeightsError for any missing, unexpected or misshapen one.

    NOTE: K/V weights of KV-shared layers (``k_proj``, ``v_proj``, ``k_norm``, ``v_norm``) are dropped, not refused:
    checkpoints may carry them and transformers ignores them too (``Gemma4TextModel._keys_to_ignore_on_load_
    unexpected``); llama.cpp loads them as optional.
    """
    ignored = {f"layers.{i}.self_attn.{n}" for i in range(config.num_layers) if config.is_kv_shared(i)
               for n in ("k_proj", "v_proj", "k_norm", "v_norm")}
    tensors = {k: v for k, v in tensors.items() if k not in ignored}
    want = config.tensor_shapes()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    misshapen = [f"{n}: {tuple(tensors[n].shape)} != {want[n]}" for n in want
                 if n in tensors and tuple(tensors[n].shape) != want[n]]
    problems = [f"{what} tensors: {_short(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if names]
    if problems:
        raise WeightsError("; ".join(problems))
    return tensors


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ------------------------------------------------------------------------------------------------ safetensors


def hf_tensor_name(name: str) -> str | None:
    """Canonical name of an HF tensor; None for tensors knowingly skipped (towers, the tied lm_head). A name of
    neither layout is kept as it is, so the strict check reports it as unexpected."""
    if name.startswith(_TOWERS) or name == "lm_head.weight":
        return None
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):].removesuffix(".weight")
    return name


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Canonical tensors from a single or sharded HF checkpoint; skipped tensors are never read."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for raw in st.keys():
                name = hf_tensor_name(raw)
                if name is None:
                    continue
                if name in tensors:
                    raise WeightsError(f"tensor {raw} appears more than once")
                value = st.get_tensor(raw)
                keep = name in _KEEP_DTYPE and value.dtype in (torch.bfloat16, torch.float16)
                tensors[name] = value if keep else value.float()
    return tensors


# ------------------------------------------------------------------------------------------------ GGUF


def gguf_tensor_name(name: str) -> str:
    """Map a llama.cpp ``gemma4`` tensor name to the canonical name (WeightsError for names it does not write)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+\.(?:weight|scale))", name)
    if not m or m.group(2) not in _GGUF_LAYER:
        raise WeightsError(f"unexpected tensor in GGUF: {name}")
    return f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"


class GGUFRows:
    """A GGUF table ``[rows, K]`` kept in its stored block bytes; :meth:`rows` dequantizes only the rows gathered.

    Each row is a whole number of blocks (K is a multiple of the type's block size), so row r's bytes are
    ``raw[r]`` and its dequantization is the ``gguf`` package's, bit for bit the full table's row r.

    Example::

        table = GGUFRows(raw, qtype, (262144, 35 * 256))   # raw: uint8 [262144, row bytes]
        e = table.rows(torch.tensor([2, 818]))               # float32 [2, 8960]
    """

    def __init__(self, raw: torch.Tensor, qtype: Any, shape: tuple[int, int], device: torch.device | None = None):
        self.raw, self.qtype, self.shape = raw, qtype, tuple(shape)
        self.device = device or torch.device("cpu")  # where rows() puts its result (the bytes stay on the CPU)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        """The table's bytes as held (the file's)."""
        return self.raw.numel()

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to(self, device: torch.device | str) -> GGUFRows:
        return GGUFRows(self.raw, self.qtype, self.shape, torch.device(device))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(ids), K]``: the gathered rows, dequantized."""
        picked = self.raw[ids.cpu()].numpy()
        return dequantize_tensor(picked, self.qtype).view(-1, self.shape[1]).to(self.device)

    def dequantize(self) -> torch.Tensor:
        """The whole table in float32 (tests; the model never asks)."""
        return self.rows(torch.arange(self.shape[0]))


def _stored_table(data: np.ndarray, qtype: Any, shape: tuple[int, int]) -> torch.Tensor | GGUFRows:
    """The per-layer embedding table as stored: F32/F16/BF16 as a tensor of that dtype, a block type as GGUFRows."""
    from gguf import GGMLQuantizationType as Q

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # one copy out of the read-only memmap
    dtypes = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    if qtype in dtypes:
        return raw.view(dtypes[qtype]).view(shape)
    return GGUFRows(raw.view(shape[0], -1), qtype, shape)


def read_gguf(reader: GGUFFile, progress: Callable[[Iterable], Iterable] | None = None, quantized: bool = False
              ) -> tuple[dict[str, torch.Tensor | quant.QuantWeight | GGUFRows], list[float] | None]:
    """(canonical tensors, the ``rope_freqs`` values or None) of a ``gemma4`` GGUF.

    Every tensor type the ``gguf`` package can dequantize is accepted. Tensors are float32, except the per-layer
    embedding table (as stored, see the module docstring) and, with ``quantized`` (the int8 fast mode), 2-D weights
    whose block type has an exact grouped int8 form (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K): ``quant.QuantWeight``
    straight from their blocks, never expanded to float32. Expert tensors (3-D) are float32 either way.
    """
    tensors: dict[str, Any] = {}
    for t in progress(reader.tensors) if progress else reader.tensors:
        name = gguf_tensor_name(t.name)
        if name in tensors:
            raise WeightsError(f"tensor {t.name} appears more than once")
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml order -> PyTorch [out, in] ([E, out, in] experts)
        if name == _PLE_TABLE and len(shape) == 2:
            tensors[name] = _stored_table(t.data, t.tensor_type, shape)
            continue
        if quantized and len(shape) == 2 and quant.supported(t.tensor_type):
            qw = quant.from_gguf(t.data, t.tensor_type, shape)
            if qw is not None:
                tensors[name] = qw
                continue
        tensors[name] = dequantize_tensor(t.data, t.tensor_type, t.name).reshape(shape)
    rope_freqs = tensors.pop("rope_freqs", None)
    if "lm_head" in tensors:  # Gemma ties the LM head to the embedding; a separate one must be the same
        lm = _float(tensors.pop("lm_head"))
        if not torch.equal(lm, _float(tensors.get("embed_tokens", lm))):
            raise WeightsError("output.weight differs from token_embd.weight; Gemma's LM head is tied")
    for gate in [k for k in tensors if k.endswith(".experts.gate_proj")]:  # split experts: [E, I, H] twice
        up = gate.removesuffix("gate_proj") + "up_proj"
        if up in tensors:  # gate rows first, as Gemma4TextExperts chunks gate_up_proj
            tensors[gate.removesuffix("gate_proj") + "gate_up_proj"] = torch.cat((tensors.pop(gate),
                                                                                  tensors.pop(up)), dim=1)
    return tensors, None if rope_freqs is None else rope_freqs.reshape(-1).tolist()


def _float(t: torch.Tensor | quant.QuantWeight) -> torch.Tensor:
    return t.dequantize() if isinstance(t, quant.QuantWeight) else t
