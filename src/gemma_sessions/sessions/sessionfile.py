"""Session files: one self-describing safetensors file holding a session's KV and its metadata.

Contract: ``write_session_file`` writes atomically (temporary file, fsync, rename); ``read_session_file`` and
``decode_session`` check everything and raise ``SessionFileError`` with the reason, and nothing else, whatever the
bytes: not a session file (foreign or truncated), a newer format, a checksum mismatch (corruption), another model,
another tokenizer, malformed metadata or tensors (see the layout below: every name, dtype, shape and index is
checked, every float must be finite and within ``MAX_ABS_VALUE``), or more than ``max_bytes`` once decompressed.
Nothing is ever unpickled: tensors are safetensors, metadata is JSON in the safetensors header. Messages name the
file ``name`` ("session file" unless the caller passes another), never a path of this machine.

    tensors   tokens int32 [T] (ids >= 0, T <= MAX_TOKENS); kv.g{g} [n, layers_per_group, 2, block_size, kv_heads,
              head_dim] per KV group, of that group's shape (groups may differ: Gemma 4) (float32 / bfloat16 /
              float16, or int8 with kv.g{g}.scale float32 [n, layers_per_group, 2, block_size]); kv.g{g}.index
              int64 [n] block positions (sorted, unique, < ceil(T / block_size))
    (a RecurrentGemma session instead holds its fixed-size state: state.{name} per state tensor, in the model's
    dtypes (conv.i, rnn.i float, k.i / v.i attention ring, kpos int64 in -1 .. T - 1), and layout
    {"kind": "recurrent"}; int8 quantization does not apply to it)
    metadata  format, format_version, model_fingerprint, tokenizer_fingerprint, kv_dtype, kv_quant, kv_private,
              layout (JSON: {} without KV, {"kind": "recurrent"}, or {"block_size": int, "group_kinds": ["full" |
              "sliding", ...], "group_shapes": [[layers_per_group, kv_heads, head_dim], ...] (one per group) and
              "fingerprint": the KV layout's sha256 (``KVLayout.fingerprint``; optional)}), session (a JSON object:
              messages, settings, stats), checksum

Format version 2 added ``group_shapes`` and ``fingerprint`` to the layout (Gemma 4's groups differ in shape); a
version 1 file's layout has neither, and all its groups have one page shape: it is read as before, and its snapshot
carries no layout fingerprint (it is checked against the engine's layout by shapes).

The checksum (sha256 over tensors and metadata) detects corruption; it is NOT authentication: anyone can write a
file with a valid checksum. So a file's KV is untrusted: ``decode_session`` returns it with ``shareable=False`` (the
engine keeps it private to the importing session, never in the shared prefix cache) unless the caller says the file
is its own (``trusted=True``, the durable store) and the file does not say it is private (``kv_private``: the KV of a
private sequence stays private through the store).

Optionally the whole file is zstd-compressed (detected by the zstd frame magic); it is decompressed as a stream that
stops as soon as the output passes ``max_bytes``, the frame's declared size or the safetensors header's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache.kv import KVSnapshot
from ..cache.state import StateSnapshot
from ..errors import SessionFileError

FORMAT = "gemma-sessions/session"
FORMAT_VERSION = 2
MAX_DECOMPRESSED_BYTES = 4 << 30
"""Default bound on a session file's size once decompressed: 4 GiB holds ~100k tokens of a Gemma 3 4B session in
bf16 (its 5 full-attention layers keep 40 KB per token; sliding layers only their window), far more than a Gemma 3
270M session of its whole context. Callers pass ``max_bytes`` for another bound (an HTTP import, a smaller one)."""
MAX_ABS_VALUE = 65504.0
"""Largest magnitude accepted in KV pages and recurrent state: float16's largest finite value. Files may store KV in
float16, so no honest file holds more; real K/V and recurrent states are O(1..100) (normalised activations through a
projection), so a larger value can only be crafted, and it would overflow half-precision attention scores into inf /
NaN. NaN and inf are refused everywhere."""
MAX_TOKENS = 1 << 20
"""Most token ids a file may hold: Gemma 3's context is 128k tokens, so a million leaves room for any model served here
while bounding the Python ints a file makes us allocate (~36 bytes each: 4 bytes in the file, 36 MB per million)."""
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_SLACK = 1 << 16    # zstd's worst-case expansion of incompressible data is ~1/256 plus a few bytes per frame
_CHUNK = 1 << 20         # decompression and value checks work in pieces of this many bytes / elements
_MAX_BLOCK_SIZE = 1 << 16
_MAX_GROUPS = 4096
_MAX_DIM = 1 << 16       # layers per group, kv heads, head dim: each at most this
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_META_KEYS = ("model_fingerprint", "tokenizer_fingerprint", "kv_dtype", "kv_quant", "layout", "session", "checksum")
_STATE_NAME = re.compile(r"state\.(?:(?:conv|rnn|k|v)\.[0-9]{1,4}|kpos)")
_VERSION = re.compile(r"[0-9]{1,6}")


def _checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)  # (reshape: a 0-d tensor cannot be viewed as bytes)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(tensors[name].shape)).encode())
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
    """Serialise to safetensors bytes (see the module docstring); a private snapshot is marked ``kv_private``."""
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
        layout = {"block_size": snapshot.block_size, "group_kinds": list(snapshot.group_kinds),
                  "group_shapes": [[p.shape[1], p.shape[4], p.shape[5]] for p in snapshot.pages]}
        if snapshot.layout_fingerprint is not None:
            layout["fingerprint"] = snapshot.layout_fingerprint
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
            "kv_private": "1" if snapshot is not None and not snapshot.shareable else "0",
            "layout": json.dumps(layout), "session": json.dumps(session)}
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def prefix_snapshot(snap: KVSnapshot | StateSnapshot, tokens: Sequence[int]) -> KVSnapshot | StateSnapshot | None:
    """``snap`` cut to the longest prefix of its tokens that ``tokens`` (a history) starts with; None when they share
    none, or when a recurrent state (which cannot be cut) is not such a prefix whole.

    KV is causal: a sequence's first n tokens have the same KV whatever followed them, so the blocks holding them are
    that prefix's KV (the last block partial: what lies past n in it is never read, and is overwritten). Gemma 4's
    history drops a turn's thoughts that its KV still holds (``chat_format``): this keeps the KV before them. A
    sliding group may lack blocks the shorter sequence needs (released behind the old end): ``check_snapshot``
    refuses that one, and the caller recomputes.
    """
    n, limit = 0, min(len(snap.tokens), len(tokens))
    while n < limit and snap.tokens[n] == tokens[n]:
        n += 1
    if n == len(snap.tokens):
        return snap
    if n == 0 or not isinstance(snap, KVSnapshot):
        return None
    keep = -(-n // snap.block_size)  # the blocks holding tokens 0..n-1
    index, pages = [], []
    for pos, group_pages in zip(snap.index, snap.pages):
        rows = [i for i, p in enumerate(pos) if p < keep]
        index.append(tuple(pos[i] for i in rows))
        pages.append(group_pages[rows])
    return dataclasses.replace(snap, tokens=tuple(snap.tokens[:n]), index=tuple(index), pages=tuple(pages))


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
                      history_only: bool = False, trusted: bool = False, max_bytes: int = MAX_DECOMPRESSED_BYTES,
                      name: str = "session file") -> tuple[dict[str, Any], KVSnapshot | StateSnapshot | None]:
    """Load and verify a session file: (session metadata dict, KV snapshot or None). See :func:`decode_session`;
    a file larger than ``max_bytes`` (plus zstd's framing slack) is refused before it is read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _compressed_bound(max_bytes):
                raise SessionFileError(f"{name}: {size} bytes, over the limit of {max_bytes}")
            data = f.read(_compressed_bound(max_bytes) + 1)
    except OSError as exc:
        raise SessionFileError(f"{name}: cannot read ({exc.strerror})") from exc
    return decode_session(data, model_fingerprint=model_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
                          history_only=history_only, name=name, trusted=trusted, max_bytes=max_bytes)


def decode_session(data: bytes, *, model_fingerprint: str | None, tokenizer_fingerprint: str | None,
                   history_only: bool = False, name: str = "session file", trusted: bool = False,
                   max_bytes: int = MAX_DECOMPRESSED_BYTES) -> tuple[dict, KVSnapshot | StateSnapshot | None]:
    """Verify and decode a session file's bytes: (session dict, snapshot or None). Raises only SessionFileError.

    Args:
        model_fingerprint / tokenizer_fingerprint: what this process runs (None: not checked); a mismatch is
            refused, except that with ``history_only`` a model mismatch returns the history without KV.
        name: how messages name the file (never pass a server path that a remote caller should not see).
        trusted: the caller wrote this file itself (the durable store). Only then may the snapshot be shareable
            (``shareable=True`` unless the file says ``kv_private``); otherwise its KV stays private.
        max_bytes: the most bytes accepted once decompressed (and uncompressed).
    """
    try:
        return _decode(bytes(data), model_fingerprint, tokenizer_fingerprint, history_only, name, trusted, max_bytes)
    except SessionFileError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, OverflowError, RecursionError, RuntimeError) as exc:
        # defence in depth: every check in _decode should refuse malformed input before anything raises these
        raise SessionFileError(f"{name}: malformed ({type(exc).__name__})") from exc


def _decode(data: bytes, model_fingerprint: str | None, tokenizer_fingerprint: str | None, history_only: bool,
            name: str, trusted: bool, max_bytes: int) -> tuple[dict, KVSnapshot | StateSnapshot | None]:
    from safetensors.torch import load

    if data[:4] == _ZSTD_MAGIC:
        data = _decompress(data, max_bytes, name)
    elif len(data) > max_bytes:
        raise SessionFileError(f"{name}: {len(data)} bytes, over the limit of {max_bytes}")
    meta = _header_metadata(data, name)
    if meta.get("format") != FORMAT:
        raise SessionFileError(f"{name}: not a gemma-sessions session file (a foreign safetensors file)")
    version = meta.get("format_version", "")
    if not _VERSION.fullmatch(version) or int(version) < 1:
        raise SessionFileError(f"{name}: format_version must be a positive integer")
    if int(version) > FORMAT_VERSION:
        raise SessionFileError(f"{name}: format version {int(version)} is newer than this gemma-sessions "
                               f"({FORMAT_VERSION}); upgrade to read it")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise SessionFileError(f"{name}: metadata lacks {', '.join(missing)}")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed data
        raise SessionFileError(f"{name}: truncated or malformed tensor data") from exc
    if _checksum(tensors, meta) != meta["checksum"]:
        raise SessionFileError(f"{name}: checksum mismatch: the file is corrupted")
    if tokenizer_fingerprint is not None and meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise SessionFileError(f"{name}: made with another tokenizer; its token ids mean other text here")
    session = _json(meta["session"], "session", dict, name)
    layout = _layout(meta["layout"], int(version), name)
    private = meta.get("kv_private", "0")
    if private not in ("0", "1"):
        raise SessionFileError(f"{name}: kv_private must be 0 or 1")
    _check_tensors(tensors, meta, layout, name)
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        if history_only:
            return session, None
        raise SessionFileError(f"{name}: made by another model (or weight format); its KV is not valid here. "
                               "Import the history only to recompute it")
    return session, _snapshot(tensors, meta, layout, shareable=trusted and private == "0")


# ---------------------------------------------------------------------------------------------- bytes and JSON
def _compressed_bound(max_bytes: int) -> int:
    return max_bytes + (max_bytes >> 8) + _ZSTD_SLACK


def _decompress(data: bytes, max_bytes: int, name: str) -> bytes:
    """Stream-decompress one zstd frame, stopping as soon as the output passes the smallest of ``max_bytes``, the
    frame's declared content size and the size the safetensors header inside declares (a 32 KB frame of zeros
    that would make 1 GB is refused after its first 8 bytes)."""
    import zstandard

    if len(data) > _compressed_bound(max_bytes):
        raise SessionFileError(f"{name}: {len(data)} compressed bytes, over the limit of {max_bytes}")
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise SessionFileError(f"{name}: corrupt zstd frame header") from exc
    known = declared not in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR, 0)
    if known and declared > max_bytes:
        raise SessionFileError(f"{name}: decompresses to {declared} bytes, over the limit of {max_bytes}")
    limit = declared if known else max_bytes
    out = bytearray()
    sized = False
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        while chunk := reader.read(min(_CHUNK, limit + 1 - len(out))):
            out += chunk
            if len(out) > limit:
                raise SessionFileError(f"{name}: decompresses to more than the {limit} bytes it may hold")
            if not sized and (total := _declared_size(out, name)) is not None:
                if total > max_bytes:
                    raise SessionFileError(f"{name}: declares {total} bytes, over the limit of {max_bytes}")
                limit, sized = min(limit, total), True
    except zstandard.ZstdError as exc:
        raise SessionFileError(f"{name}: corrupt or truncated zstd data") from exc
    if known and len(out) != declared:
        raise SessionFileError(f"{name}: truncated zstd data ({len(out)} of {declared} bytes)")
    return bytes(out)


def _declared_size(prefix: bytearray, name: str) -> int | None:
    """The whole file's size by its safetensors header, once ``prefix`` holds the header (None before)."""
    if len(prefix) < 8:
        return None
    n = int.from_bytes(prefix[:8], "little")
    if n <= 1 or n > 100 << 20:  # safetensors itself refuses headers over 100 MB
        raise SessionFileError(f"{name}: not a safetensors file (header length {n})")
    if len(prefix) > 8 and prefix[8] != ord("{"):  # the safetensors format: the header MUST begin with "{"
        raise SessionFileError(f"{name}: not a safetensors file (no JSON header)")
    if len(prefix) < 8 + n:
        return None
    header = _header(bytes(prefix[8:8 + n]), name)
    ends = []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and key != "__metadata__" else [0, 0]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
            raise SessionFileError(f"{name}: malformed safetensors header (tensor offsets)")
        ends.append(offsets[1])
    return 8 + n + max(ends, default=0)


def _header(raw: bytes, name: str) -> dict:
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SessionFileError(f"{name}: corrupt header") from exc
    if not isinstance(header, dict):
        raise SessionFileError(f"{name}: corrupt header (not a JSON object)")
    return header


def _header_metadata(data: bytes, name: str) -> dict[str, str]:
    if len(data) < 8:
        raise SessionFileError(f"{name}: truncated (no safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise SessionFileError(f"{name}: truncated or not a safetensors file")
    meta = _header(data[8:8 + n], name).get("__metadata__")
    if not isinstance(meta, dict):
        raise SessionFileError(f"{name}: not a gemma-sessions session file (no metadata)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SessionFileError(f"{name}: metadata values must be strings")
    return meta


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def _json(text: str, what: str, kind: type, name: str) -> Any:
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError is a ValueError; so are 5,000-digit integers)
        raise SessionFileError(f"{name}: {what} is not valid JSON") from exc
    if not isinstance(value, kind):
        raise SessionFileError(f"{name}: {what} must be a JSON {'object' if kind is dict else kind.__name__}")
    return value


def _layout(text: str, version: int, name: str) -> dict[str, Any]:
    """{} (no KV), {"kind": "recurrent"} or a KV layout: {"block_size": int, "group_kinds": [...]}, plus from format
    version 2 "group_shapes" and optionally "fingerprint" (module docstring); nothing else."""
    layout = _json(text, "layout", dict, name)
    if not layout or layout == {"kind": "recurrent"}:
        return layout
    keys = {"block_size", "group_kinds"} | ({"group_shapes"} if version >= 2 else set())
    optional = {"fingerprint"} if version >= 2 else set()
    if not keys <= set(layout) <= keys | optional:
        wanted = ", ".join(f'"{k}": ...' for k in sorted(keys))
        raise SessionFileError(f"{name}: layout must be {{}}, {{\"kind\": \"recurrent\"}} or {{{wanted}}}"
                               + "".join(f' with an optional "{k}"' for k in optional) + f" (format {version})")
    bs, kinds = layout["block_size"], layout["group_kinds"]
    if type(bs) is not int or not 1 <= bs <= _MAX_BLOCK_SIZE:
        raise SessionFileError(f"{name}: layout block_size must be an integer in 1..{_MAX_BLOCK_SIZE}")
    if not isinstance(kinds, list) or not 1 <= len(kinds) <= _MAX_GROUPS or any(k not in ("full", "sliding")
                                                                                 for k in kinds):
        raise SessionFileError(f"{name}: layout group_kinds must be a list of \"full\" / \"sliding\"")
    shapes = layout.get("group_shapes", [])
    if "group_shapes" in layout and (not isinstance(shapes, list) or len(shapes) != len(kinds) or not all(
            isinstance(sh, list) and len(sh) == 3 and all(type(x) is int and 1 <= x <= _MAX_DIM for x in sh)
            for sh in shapes)):
        raise SessionFileError(f"{name}: layout group_shapes must hold [layers, kv_heads, head_dim] (integers in "
                               f"1..{_MAX_DIM}) for each group")
    fingerprint = layout.get("fingerprint", "")
    if "fingerprint" in layout and not (isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint)):
        raise SessionFileError(f"{name}: layout fingerprint must be 64 lowercase hex digits")
    return layout


# ---------------------------------------------------------------------------------------------- tensors
def _check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], layout: dict, name: str) -> None:
    """Every tensor the layout names, no other, each of its dtype and shape, with sane values."""
    if not layout:
        if tensors or meta["kv_quant"] != "none":
            raise SessionFileError(f"{name}: tensors without a KV layout")
        return
    if "tokens" not in tensors:
        raise SessionFileError(f"{name}: lacks tensor tokens")
    tokens = tensors["tokens"]
    if tokens.dtype != torch.int32 or tokens.dim() != 1:
        raise SessionFileError(f"{name}: tokens must be int32 [T]")
    if tokens.numel() > MAX_TOKENS:
        raise SessionFileError(f"{name}: {tokens.numel()} tokens, more than {MAX_TOKENS}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise SessionFileError(f"{name}: negative token ids")
    if layout.get("kind") == "recurrent":
        _check_state(tensors, meta, tokens.numel(), name)
    else:
        _check_kv(tensors, meta, layout, tokens.numel(), name)


def _expect_names(tensors: dict[str, torch.Tensor], expected: set[str], name: str) -> None:
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise SessionFileError(f"{name}: lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    if extra:
        raise SessionFileError(f"{name}: holds tensors its layout does not name ({ascii(extra[0])[:60]}"
                               + (f" and {len(extra) - 1} more)" if len(extra) > 1 else ")"))


def _check_kv(tensors: dict[str, torch.Tensor], meta: dict[str, str], layout: dict, num_tokens: int,
              name: str) -> None:
    quant, dtype_name = meta["kv_quant"], meta["kv_dtype"]
    if quant not in ("none", "int8") or dtype_name not in _DTYPES:
        raise SessionFileError(f"{name}: kv_quant must be none / int8 and kv_dtype one of {', '.join(_DTYPES)}")
    groups, bs = len(layout["group_kinds"]), layout["block_size"]
    expected = {"tokens"} | {f"kv.g{g}{s}" for g in range(groups)
                             for s in ("", ".index") + ((".scale",) if quant == "int8" else ())}
    _expect_names(tensors, expected, name)
    n_blocks = (num_tokens + bs - 1) // bs
    page_shape = None
    for g in range(groups):
        pages, index = tensors[f"kv.g{g}"], tensors[f"kv.g{g}.index"]
        what = f"kv.g{g}"
        if pages.dtype != (torch.int8 if quant == "int8" else _DTYPES[dtype_name]):
            raise SessionFileError(f"{name}: {what} is {str(pages.dtype).removeprefix('torch.')}, expected "
                                   f"{'int8' if quant == 'int8' else dtype_name}")
        if pages.dim() != 6 or pages.shape[2] != 2 or pages.shape[3] != bs or 0 in pages.shape[1:]:
            raise SessionFileError(f"{name}: {what} must be [n, layers, 2, {bs}, kv_heads, head_dim]")
        if "group_shapes" in layout:  # each group its own shape, as the layout says
            lpg, kvh, hd = layout["group_shapes"][g]
            if tuple(pages.shape[1:]) != (lpg, 2, bs, kvh, hd):
                raise SessionFileError(f"{name}: {what}'s pages are not of the layout's shape "
                                       f"[n, {lpg}, 2, {bs}, {kvh}, {hd}]")
        elif page_shape is not None and pages.shape[1:] != page_shape:  # format 1: one page shape
            raise SessionFileError(f"{name}: {what}'s pages differ in shape from kv.g0's")
        page_shape = pages.shape[1:]
        _check_index(index, pages.shape[0], n_blocks, what, name)
        if quant == "int8":
            scale = tensors[f"kv.g{g}.scale"]
            if scale.dtype != torch.float32 or scale.shape != pages.shape[:4]:
                raise SessionFileError(f"{name}: {what}.scale must be float32 of the pages' first 4 dims")
            _check_values(scale, f"{what}.scale", name, low=0.0, high=MAX_ABS_VALUE / 127)
            if pages.numel() and int(pages.min()) < -127:
                raise SessionFileError(f"{name}: {what}: int8 codes must be in -127..127")
        else:
            _check_values(pages, what, name)


def _check_index(index: torch.Tensor, n: int, n_blocks: int, what: str, name: str) -> None:
    if index.dtype != torch.int64 or index.dim() != 1 or index.numel() != n:
        raise SessionFileError(f"{name}: {what}.index must be int64 [{n}] (one position per page)")
    if n and (int(index.min()) < 0 or int(index.max()) >= n_blocks):
        raise SessionFileError(f"{name}: {what}.index: block positions outside the sequence's {n_blocks} blocks")
    if n > 1 and not bool((index[1:] > index[:-1]).all()):
        raise SessionFileError(f"{name}: {what}.index: block positions are not sorted and unique")


def _check_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], num_tokens: int, name: str) -> None:
    if meta["kv_quant"] != "none" or meta["kv_dtype"] != "native":
        raise SessionFileError(f"{name}: a recurrent state is stored unquantized in its native dtypes")
    state = [k for k in tensors if k != "tokens"]
    bad = [k for k in state if not _STATE_NAME.fullmatch(k)]
    if bad:
        raise SessionFileError(f"{name}: holds tensors its layout does not name ({ascii(bad[0])[:60]})")
    if "state.kpos" not in tensors:
        raise SessionFileError(f"{name}: lacks tensor state.kpos")
    for k in state:
        t = tensors[k]
        if k == "state.kpos":
            if t.dtype != torch.int64 or t.dim() != 1:
                raise SessionFileError(f"{name}: state.kpos must be int64 [ring]")
            if t.numel() and (int(t.min()) < -1 or int(t.max()) >= num_tokens):
                raise SessionFileError(f"{name}: state.kpos: positions outside the snapshot's tokens")
        elif t.dtype not in _DTYPES.values():
            raise SessionFileError(f"{name}: {k} must be float32 / bfloat16 / float16")
        else:
            _check_values(t, k, name)


def _check_values(t: torch.Tensor, what: str, name: str, low: float = -MAX_ABS_VALUE,
                  high: float = MAX_ABS_VALUE) -> None:
    """Refuse NaN, inf and values outside [low, high] (in float32, piece by piece: bounded extra memory)."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].float()
        if not bool(((part >= low) & (part <= high)).all()):  # NaN compares false: one test for NaN, inf, range
            if not bool(torch.isfinite(part).all()):
                raise SessionFileError(f"{name}: {what} holds non-finite values (NaN or inf)")
            raise SessionFileError(f"{name}: {what} holds values outside [{low:g}, {high:g}]")


def _snapshot(tensors: dict[str, torch.Tensor], meta: dict[str, str], layout: dict,
              shareable: bool) -> KVSnapshot | StateSnapshot | None:
    if not layout:
        return None
    tokens = tuple(int(t) for t in tensors["tokens"].tolist())
    if layout.get("kind") == "recurrent":
        state = {name[len("state."):]: t for name, t in tensors.items() if name.startswith("state.")}
        return StateSnapshot(tokens=tokens, state=state, shareable=shareable)
    pages, index = [], []
    for g in range(len(layout["group_kinds"])):
        p = tensors[f"kv.g{g}"]
        if meta["kv_quant"] == "int8":
            p = p.float() * tensors[f"kv.g{g}.scale"][..., None, None]
        pages.append(p)
        index.append(tuple(int(i) for i in tensors[f"kv.g{g}.index"].tolist()))
    return KVSnapshot(tokens=tokens, block_size=layout["block_size"], group_kinds=tuple(layout["group_kinds"]),
                      pages=tuple(pages), index=tuple(index), shareable=shareable,
                      layout_fingerprint=layout.get("fingerprint"))
