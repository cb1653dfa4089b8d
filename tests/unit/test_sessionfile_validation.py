"""Session files from elsewhere are untrusted (issue "Hardening", defects 1 and 4).

* ``decode_session`` raises ``SessionFileError`` and nothing else for any malformed input, even one whose checksum an
  attacker recomputed (the checksum detects corruption; it authenticates nothing); its messages name no path.
* Decoded KV is private (``shareable=False``) unless the caller trusts the file and the file does not say private.
* Decompression is bounded: a zstd bomb is refused while memory grows by a few MB at most.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load, save

import gemma_sessions as gs
from gemma_sessions.engine import Engine
from gemma_sessions.sessions import sessionfile
from gemma_sessions.sessions.sessionfile import (MAX_ABS_VALUE, _checksum, decode_session, encode_session,
                                                 read_session_file)
from gemma_sessions.testing import tiny_griffin_model, tiny_model

SFE = gs.SessionFileError
P = gs.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
OPEN = dict(model_fingerprint=None, tokenizer_fingerprint=None)


def _export(model, prompt):
    with Engine(model, kv_cache_bytes=4 << 20, block_size=4) as e:
        h = e.new_kv()
        e.submit(prompt, P, kv=h).result()
        return e.export_kv(h)


@pytest.fixture(scope="module")
def snap():
    return _export(tiny_model("gemma3", seed=3), [2] + list(range(10, 40)))


@pytest.fixture(scope="module")
def state_snap():
    m = tiny_griffin_model(seed=3)
    return _export(m, m.tokenizer.encode("the user the model", add_bos=True))


def _encode(snapshot, **kw) -> bytes:
    return encode_session(snapshot, model_fingerprint="m", tokenizer_fingerprint="t",
                          session={"id": "x", "messages": []}, **kw)


def _parts(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8:8 + n])["__metadata__"]


def _forge(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """What an attacker writes: any tensors and metadata, with a checksum that matches them."""
    tensors = {k: v.clone() for k, v in tensors.items()}  # (safetensors refuses tensors sharing memory)
    meta = {**meta, "checksum": ""}
    meta["checksum"] = _checksum(tensors, meta)
    return save(tensors, metadata=meta)


def _refused(data: bytes, **kw) -> str:
    with pytest.raises(SFE) as info:
        decode_session(data, **{**OPEN, **kw})
    return str(info.value)


# ---------------------------------------------------------------------------------------------- malformed input
def _set(key, value):
    return lambda t, m: m.__setitem__(key, value)


def _drop(key):
    return lambda t, m: (m if key in m else t).pop(key)


def _tensor(key, fn):
    return lambda t, m: t.__setitem__(key, fn(t[key]))


def _nan_at(value):
    def put(p):
        p = p.clone()
        p.view(-1)[p.numel() // 2] = value
        return p
    return put


MALFORMED = {
    # metadata
    "version not an int": _set("format_version", "abc"),
    "version a float": _set("format_version", "1.5"),
    "version empty": _set("format_version", ""),
    "version zero": _set("format_version", "0"),
    "version huge": _set("format_version", "9" * 5000),
    **{f"no {k}": _drop(k) for k in ("model_fingerprint", "tokenizer_fingerprint", "kv_dtype", "kv_quant", "layout",
                                     "session")},
    "kv_private other": _set("kv_private", "yes"),
    "kv_quant other": _set("kv_quant", "int4"),
    "kv_dtype other": _set("kv_dtype", "float64"),
    # layout
    "layout not json": _set("layout", "{"),
    "layout a list": _set("layout", "[4]"),
    "layout block_size a string": _set("layout", '{"block_size": "4", "group_kinds": ["full"]}'),
    "layout block_size a bool": _set("layout", '{"block_size": true, "group_kinds": ["full"]}'),
    "layout block_size zero": _set("layout", '{"block_size": 0, "group_kinds": ["full"]}'),
    "layout block_size NaN": _set("layout", '{"block_size": NaN, "group_kinds": ["full"]}'),
    "layout kinds other": _set("layout", '{"block_size": 4, "group_kinds": ["global"]}'),
    "layout kinds a string": _set("layout", '{"block_size": 4, "group_kinds": "full"}'),
    "layout extra key": _set("layout", '{"block_size": 4, "group_kinds": ["full"], "x": 1}'),
    "layout other kind": _set("layout", '{"kind": "transformer"}'),
    "layout deeply nested": _set("layout", "[" * 100_000 + "]" * 100_000),
    "layout fewer groups": _set("layout", '{"block_size": 4, "group_kinds": ["full"]}'),
    "layout other block size": _set("layout", '{"block_size": 8, "group_kinds": '
                                              '["full", "sliding", "sliding", "sliding", "sliding", "sliding", '
                                              '"sliding"]}'),
    # session
    "session a list": _set("session", "[]"),
    "session a number": _set("session", "1"),
    "session not json": _set("session", "{"),
    "session deeply nested": _set("session", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "session NaN": _set("session", '{"a": NaN}'),
    # tensors the layout names / does not name
    "no kv.g0": _drop("kv.g0"),
    "no kv.g0.index": _drop("kv.g0.index"),
    "no tokens": _drop("tokens"),
    "extra tensor": lambda t, m: t.__setitem__("evil", torch.zeros(3)),
    "extra group": lambda t, m: t.__setitem__("kv.g99", t["kv.g0"]),
    "scale without int8": lambda t, m: t.__setitem__("kv.g0.scale", torch.ones(1)),
    # dtypes and shapes
    "tokens int64": _tensor("tokens", lambda x: x.long()),
    "tokens 2-d": _tensor("tokens", lambda x: x[None]),
    "index int32": _tensor("kv.g0.index", lambda x: x.int()),
    "pages float64": _tensor("kv.g0", lambda x: x.double()),
    "pages int8 unquantized": _tensor("kv.g0", lambda x: x.to(torch.int8)),
    "pages 5-d": _tensor("kv.g0", lambda x: x[0]),
    "pages scalar": _tensor("kv.g0", lambda x: x.reshape(-1)[0].clone()),
    "pages other block size": _tensor("kv.g0", lambda x: x[:, :, :, :2].contiguous()),
    "pages other head dim": _tensor("kv.g1", lambda x: x[..., :8].contiguous()),
    "pages fewer than index": _tensor("kv.g0", lambda x: x[:-1].contiguous()),
    # values
    "too many tokens": _tensor("tokens", lambda x: torch.zeros(sessionfile.MAX_TOKENS + 1, dtype=torch.int32)),
    "negative token": _tensor("tokens", lambda x: torch.cat([x[:-1], torch.tensor([-5], dtype=torch.int32)])),
    "index 1e9": _tensor("kv.g0.index", lambda x: torch.cat([x[:-1], torch.tensor([10 ** 9])])),
    "index negative": _tensor("kv.g0.index", lambda x: torch.cat([torch.tensor([-1]), x[1:]])),
    "index duplicated": _tensor("kv.g0.index", lambda x: torch.cat([x[:1], x[:-1]])),
    "index unsorted": _tensor("kv.g0.index", lambda x: x.flip(0)),
    "pages NaN": _tensor("kv.g0", _nan_at(float("nan"))),
    "pages inf": _tensor("kv.g1", _nan_at(float("inf"))),
    "pages -inf": _tensor("kv.g1", _nan_at(float("-inf"))),
    "pages absurd": _tensor("kv.g0", _nan_at(MAX_ABS_VALUE * 2)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_kv_file_is_refused(snap, case):
    tensors, meta = _parts(_encode(snap))
    MALFORMED[case](tensors, meta)
    message = _refused(_forge(tensors, meta))
    assert "malformed (" not in message, message  # an explicit check gave the reason, not the last-resort net


INT8_MALFORMED = {
    "no scale": _drop("kv.g0.scale"),
    "scale float16": _tensor("kv.g0.scale", lambda x: x.half()),
    "scale other shape": _tensor("kv.g0.scale", lambda x: x[..., :-1].contiguous()),
    "scale NaN": _tensor("kv.g0.scale", _nan_at(float("nan"))),
    "scale inf": _tensor("kv.g0.scale", _nan_at(float("inf"))),
    "scale negative": _tensor("kv.g0.scale", _nan_at(-1.0)),
    "scale absurd": _tensor("kv.g0.scale", _nan_at(1e6)),
    "code -128": _tensor("kv.g0", lambda x: x.flatten().index_fill(0, torch.tensor([0]), -128).view(x.shape)),
    "codes float": _tensor("kv.g0", lambda x: x.float()),
}


@pytest.mark.parametrize("case", list(INT8_MALFORMED))
def test_malformed_int8_file_is_refused(snap, case):
    tensors, meta = _parts(_encode(snap, quantize=True))
    INT8_MALFORMED[case](tensors, meta)
    _refused(_forge(tensors, meta))


STATE_MALFORMED = {
    "state NaN": lambda t, m: _tensor(next(k for k in t if k.startswith("state.rnn")), _nan_at(float("nan")))(t, m),
    "state inf": lambda t, m: _tensor(next(k for k in t if k.startswith("state.conv")), _nan_at(float("inf")))(t, m),
    "state absurd": lambda t, m: _tensor(next(k for k in t if k.startswith("state.k.")), _nan_at(1e9))(t, m),
    "state extra tensor": lambda t, m: t.__setitem__("state.evil", torch.zeros(2)),
    "kv tensor in a state": lambda t, m: t.__setitem__("kv.g0", torch.zeros(2)),
    "state int": lambda t, m: _tensor(next(k for k in t if k.startswith("state.rnn")), lambda x: x.long())(t, m),
    "kpos float": _tensor("state.kpos", lambda x: x.float()),
    "kpos beyond tokens": _tensor("state.kpos", lambda x: torch.full_like(x, 10 ** 6)),
    "kpos below -1": _tensor("state.kpos", lambda x: torch.full_like(x, -2)),
    "no kpos": _drop("state.kpos"),
    "quantized": _set("kv_quant", "int8"),
    "layout with extra key": _set("layout", '{"kind": "recurrent", "x": 1}'),
}


@pytest.mark.parametrize("case", list(STATE_MALFORMED))
def test_malformed_recurrent_file_is_refused(state_snap, case):
    tensors, meta = _parts(_encode(state_snap))
    STATE_MALFORMED[case](tensors, meta)
    _refused(_forge(tensors, meta))


def test_no_kv_file_holds_no_tensors(snap):
    tensors, meta = _parts(_encode(snap))
    meta["layout"] = "{}"
    _refused(_forge(tensors, meta))
    assert decode_session(_encode(None), **OPEN) == ({"id": "x", "messages": []}, None)


def test_raw_header_garbage_is_refused(snap):
    data = _encode(snap)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    variants = [
        b"[" * 50_000 + b"]" * 50_000,                              # deep JSON: RecursionError inside json
        json.dumps({**header, "__metadata__": {**header["__metadata__"], "format_version": 1}}).encode(),
        json.dumps({**header, "__metadata__": ["x"]}).encode(),
        b"\xff\xfe" + b" " * 10,
        json.dumps({"__metadata__": header["__metadata__"], "tokens": {"dtype": "I32", "shape": [10 ** 12],
                                                                        "data_offsets": [0, 4]}}).encode(),
    ]
    for raw in variants:
        _refused(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def test_random_damage_is_always_a_session_file_error(snap, state_snap):
    """Random truncations, bit flips (checksum or not) and header edits: SessionFileError, never another error."""
    rng = random.Random(0)
    import zstandard

    for good in (_encode(snap), _encode(snap, quantize=True), _encode(state_snap)):
        compressed = zstandard.ZstdCompressor(level=3).compress(good)
        n = int.from_bytes(good[:8], "little")
        for _ in range(60):
            data = bytearray(rng.choice((good, compressed)))
            kind = rng.randrange(3)
            if kind == 0:
                data = data[:rng.randrange(len(data))]
            elif kind == 1:
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            else:  # edit the header text (JSON structure, numbers), length kept
                i = rng.randrange(8, 8 + n)
                data[i] = ord(rng.choice('{}[]",:0123456789e-.'))
            try:
                decode_session(bytes(data), **OPEN)
            except SFE:
                pass


def test_messages_name_no_server_path(snap, tmp_path):
    secret = tmp_path / "srv-secret-dir"
    secret.mkdir()
    tensors, meta = _parts(_encode(snap))
    meta["format_version"] = "x"
    for data in (_forge(tensors, meta), b"junk", _encode(snap)[:100]):
        path = secret / "upload.gsession"
        path.write_bytes(data)
        with pytest.raises(SFE) as info:
            read_session_file(path, **OPEN)
        assert "srv-secret-dir" not in str(info.value) and str(tmp_path) not in str(info.value)
        assert str(info.value).startswith("session file:")
    with pytest.raises(SFE) as info:
        read_session_file(secret / "missing", **OPEN)
    assert "srv-secret-dir" not in str(info.value)
    with pytest.raises(SFE, match="^upload: "):
        read_session_file(path, **OPEN, name="upload")


# ---------------------------------------------------------------------------------------------- trust
def test_decoded_kv_is_private_unless_trusted_and_not_marked_private(snap, state_snap):
    for s in (snap, state_snap):
        data = _encode(s)
        assert _parts(data)[1]["kv_private"] == "0"
        assert decode_session(data, **OPEN)[1].shareable is False  # default: untrusted (HTTP, CLI imports)
        assert decode_session(data, **OPEN, trusted=True)[1].shareable is True  # the store's own file
        private = _encode(dataclasses.replace(s, shareable=False))
        assert _parts(private)[1]["kv_private"] == "1"
        assert decode_session(private, **OPEN, trusted=True)[1].shareable is False  # private stays private
    legacy_tensors, legacy_meta = _parts(_encode(snap))
    del legacy_meta["kv_private"]  # files written before the flag: shareable when trusted
    assert decode_session(_forge(legacy_tensors, legacy_meta), **OPEN, trusted=True)[1].shareable


def test_valid_files_still_roundtrip(snap, state_snap):
    _, got = decode_session(_encode(snap), **OPEN)
    assert got.tokens == snap.tokens and got.index == snap.index
    assert all(torch.equal(a, b) for a, b in zip(got.pages, snap.pages))
    _, got = decode_session(_encode(snap, quantize=True), **OPEN)
    assert all(torch.allclose(a, b, atol=float(b.abs().max()) / 100) for a, b in zip(got.pages, snap.pages))
    _, got = decode_session(_encode(state_snap), **OPEN)
    assert all(torch.equal(got.state[k], v) for k, v in state_snap.state.items())


# ---------------------------------------------------------------------------------------------- size bounds
def test_decompression_is_bounded_by_max_bytes(snap):
    import zstandard

    good = _encode(snap)
    for declared in (True, False):
        z = zstandard.ZstdCompressor(level=3, write_content_size=declared).compress(good)
        assert decode_session(z, **OPEN, max_bytes=len(good))[1].tokens == snap.tokens
        assert "limit" in _refused(z, max_bytes=len(good) - 1) or declared is False
        _refused(z, max_bytes=len(good) - 1)
        _refused(z[:len(z) // 2], max_bytes=len(good))  # truncated stream
    assert "limit" in _refused(good, max_bytes=len(good) - 1)  # uncompressed input too


def test_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.gsession"
    with open(path, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB on paper, nothing on disk
    with pytest.raises(SFE, match="limit"):
        read_session_file(path, **OPEN, max_bytes=1 << 20)
    with pytest.raises(SFE, match="limit"):
        read_session_file(path, **OPEN)  # the default bound (4 GiB)


_BOMB = textwrap.dedent("""
    import json, resource, sys
    import zstandard
    from gemma_sessions.errors import SessionFileError
    from gemma_sessions.sessions.sessionfile import decode_session

    def bomb(declare: bool, prefix: bytes = b"") -> bytes:
        # a zstd frame of 1 GiB (of zeros after ``prefix``), built in pieces: ~32 KB
        size = 1 << 30
        c = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(size=size if declare else -1)
        out, zeros = [c.compress(prefix)], bytes(1 << 20)
        for i in range(size >> 20):
            out.append(c.compress(zeros[:len(zeros) - len(prefix)] if i == 0 else zeros))
        out.append(c.flush())
        return b"".join(out)

    results = []
    # a valid-looking safetensors header (64 MiB long) followed by zeros: the stream cap must stop it
    cases = [(True, b"", 16 << 20), (False, b"", 16 << 20), (False, (64 << 20).to_bytes(8, "little") + b"{", 16 << 20),
             (False, b"", 4 << 30)]
    for declare, prefix, max_bytes in cases:
        data = bomb(declare, prefix)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_session(data, model_fingerprint=None, tokenizer_fingerprint=None, max_bytes=max_bytes)
            refused = ""
        except SessionFileError as exc:
            refused = str(exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results.append({"compressed": len(data), "refused": refused, "grew_kb": after - before})
    print(json.dumps(results))
""")


def test_zstd_bomb_is_refused_in_bounded_memory():
    """The issue's bomb: a ~32 KB frame of zeros declaring or producing 1 GiB grew RSS by 1 GB before being refused.
    Measured in a fresh process (ru_maxrss is a process-wide peak)."""
    out = subprocess.run([sys.executable, "-c", _BOMB], capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results:
        assert r["compressed"] < 64 << 10 and r["refused"], r
        assert r["grew_kb"] < 24 << 10, r  # at most ~16 MiB (the max_bytes of the first cases), never ~1 GiB


def test_module_constants_are_documented():
    assert sessionfile.MAX_DECOMPRESSED_BYTES == 4 << 30 and MAX_ABS_VALUE == 65504.0
