"""Session files: one self-describing safetensors file holding a session's KV and its metadata.

Contract: ``write_session_file`` writes atomically (temporary file, fsync, rename); ``read_session_file`` checks
everything and raises ``SessionFileError`` with the reason: not a session file (foreign or truncated), a newer
format, a checksum mismatch (corruption), another model, another tokenizer. Nothing is ever unpickled: tensors are
safetensors, metadata is JSON in the safetensors header.

    tensors   tokens int32 [T]; kv.g{g} [n, layers_per_group, 2, block_size, kv_heads, head_dim] per KV group
              (float32 / bfloat16, or int8 with kv.g{g}.scale float32 [n, layers_per_group, 2, block_size]);
              kv.g{g}.index int64 [n] block positions
    (a RecurrentGemma session instead holds its fixed-size state: state.{name} per state tensor, in the model's
    dtypes (conv.i, rnn.i float32, k.i / v.i attention ring, kpos), and layout {"kind": "recurrent"}; int8
    quantization does not apply to it)
    metadata  format, format_version, model_fingerprint, tokenizer_fingerprint, kv_dtype, kv_quant, layout,
              session (JSON: messages, settings, stats), checksum (sha256 over tensors and metadata)

Optionally the whole file is zstd-compressed (detected by the zstd frame magic).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..cache.kv import KVSnapshot
from ..cache.state import StateSnapshot
from ..errors import SessionFileError

FORMAT = "gemma-sessions/session"
FORMAT_VERSION = 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def _quantize(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per (block, layer, K|V, token) row over kv_heads x head_dim: scale = max|x| / 127."""
    x = pages.float()
    scale = x.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / 127.0
    q = torch.round(x / scale[..., None, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def encode_session(snapshot: KVSnapshot | StateSnapshot | None, *, model_fingerprint: str, tokenizer_fingerprint: str,
                   session: dict[str, Any], kv_dtype: str | None = None, quantize: bool = False) -> bytes:
    """Serialise to safetensors bytes (see the module docstring)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    dtype_name = "none"
    if isinstance(snapshot, StateSnapshot):
        tensors["tokens"] = torch.tensor(snapshot.tokens, dtype=torch.int32)
        layout = {"kind": "recurrent"}
        dtype_name, quantize = "native", False
        for name, t in snapshot.state.items():
            tensors[f"state.{name}"] = t.contiguous()
    elif snapshot is not None:
        tensors["tokens"] = torch.tensor(snapshot.tokens, dtype=torch.int32)
        layout = {"block_size": snapshot.block_size, "group_kinds": list(snapshot.group_kinds)}
        for g, (pages, index) in enumerate(zip(snapshot.pages, snapshot.index)):
            dtype_name = kv_dtype or str(pages.dtype).removeprefix("torch.")
            if quantize:
                tensors[f"kv.g{g}"], tensors[f"kv.g{g}.scale"] = _quantize(pages)
            else:
                tensors[f"kv.g{g}"] = pages.to(_DTYPES[dtype_name]).contiguous()
            tensors[f"kv.g{g}.index"] = torch.tensor(index, dtype=torch.int64)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model_fingerprint": model_fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint, "kv_dtype": dtype_name,
            "kv_quant": "int8" if quantize and snapshot is not None else "none",
            "layout": json.dumps(layout), "session": json.dumps(session)}
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def write_session_file(path: str | Path, data: bytes, compress: bool = False) -> int:
    """Write ``data`` atomically (tmp + fsync + rename); returns the bytes written."""
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return len(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_session_file(path: str | Path, *, model_fingerprint: str | None, tokenizer_fingerprint: str | None,
                      history_only: bool = False) -> tuple[dict[str, Any], KVSnapshot | StateSnapshot | None]:
    """Load and verify a session file: (session metadata dict, KV snapshot or None).

    Args:
        model_fingerprint / tokenizer_fingerprint: what this process runs; a mismatch is refused, except that
            with ``history_only`` a model mismatch returns the history without KV (it will be recomputed).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SessionFileError(f"{path}: cannot read ({exc.strerror})") from exc
    return decode_session(data, model_fingerprint=model_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
                          history_only=history_only, name=str(path))


def decode_session(data: bytes, *, model_fingerprint: str | None, tokenizer_fingerprint: str | None,
                   history_only: bool = False, name: str = "session file"
                   ) -> tuple[dict, KVSnapshot | StateSnapshot | None]:
    from safetensors.torch import load

    if data[:4] == _ZSTD_MAGIC:
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 34)
        except zstandard.ZstdError as exc:
            raise SessionFileError(f"{name}: corrupt or truncated zstd data ({exc})") from exc
    meta = _header_metadata(data, name)
    if meta.get("format") != FORMAT:
        raise SessionFileError(f"{name}: not a gemma-sessions session file (a foreign safetensors file)")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise SessionFileError(f"{name}: format version {version} is newer than this gemma-sessions "
                               f"({FORMAT_VERSION}); upgrade to read it")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed data
        raise SessionFileError(f"{name}: truncated or malformed tensor data ({exc})") from exc
    if _checksum(tensors, meta) != meta.get("checksum"):
        raise SessionFileError(f"{name}: checksum mismatch: the file is corrupted")
    if tokenizer_fingerprint is not None and meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise SessionFileError(f"{name}: made with another tokenizer; its token ids mean other text here")
    session = json.loads(meta["session"])
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        if history_only:
            return session, None
        raise SessionFileError(f"{name}: made by another model (or weight format); its KV is not valid here. "
                               "Import the history only to recompute it")
    return session, _snapshot(tensors, meta)


def _header_metadata(data: bytes, name: str) -> dict[str, str]:
    if len(data) < 8:
        raise SessionFileError(f"{name}: truncated (no safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise SessionFileError(f"{name}: truncated or not a safetensors file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionFileError(f"{name}: corrupt header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise SessionFileError(f"{name}: not a gemma-sessions session file (no metadata)")
    return meta


def _snapshot(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> KVSnapshot | StateSnapshot | None:
    if "tokens" not in tensors:
        return None
    layout = json.loads(meta["layout"])
    tokens = tuple(int(t) for t in tensors["tokens"].tolist())
    if layout.get("kind") == "recurrent":
        state = {name[len("state."):]: t for name, t in tensors.items() if name.startswith("state.")}
        return StateSnapshot(tokens=tokens, state=state)
    pages, index = [], []
    for g in range(len(layout["group_kinds"])):
        p = tensors[f"kv.g{g}"]
        if meta["kv_quant"] == "int8":
            p = p.float() * tensors[f"kv.g{g}.scale"][..., None, None]
        pages.append(p)
        index.append(tuple(int(i) for i in tensors[f"kv.g{g}.index"].tolist()))
    return KVSnapshot(tokens=tokens, block_size=layout["block_size"],
                      group_kinds=tuple(layout["group_kinds"]), pages=tuple(pages), index=tuple(index))
