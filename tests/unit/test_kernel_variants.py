"""The kernels' instruction-set variants: which one a CPU gets, the override, builds with explicit flags, and every
variant this CPU executes against the float32 reference and bit for bit against the others where the contract says
the bits are the same. (tests/unit/test_kernels.py runs its kernel tests under each runnable variant too.)"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from gemma_sessions import kernels
from gemma_sessions.kernels import build as kbuild
from gemma_sessions.models import quant

V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "sse4_2"})
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ZEN3, ICELAKE = V3, V4 | {"avx512_vnni"}
ZEN4 = V4 | {"avx512_vnni", "avx512_bf16"}
SAPPHIRE = ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"}
# Ops whose result is exact by construction, hence the same bits in every build (dequantize: codes * scale, then
# + offset, two roundings with contraction off; argmax). The float products and fused ops agree within float32
# rounding only: lanes differ between AVX2 and AVX-512, and even on the same code paths GCC contracts a * b + c into an
# FMA (-ffp-contract=fast) where inlining, which each variant's flags change, puts them in one expression.
EXACT_OPS = ("dequantize", "argmax")


@pytest.fixture
def on_x86(monkeypatch):
    monkeypatch.setattr(kbuild, "x86", lambda: True)
    monkeypatch.delenv(kbuild.ENV, raising=False)


@pytest.mark.parametrize("features,best", [(ZEN3, "avx2"), (ICELAKE, "avx512_vnni"), (ZEN4, "avx512_bf16"),
                                           (SAPPHIRE, "amx"), (V4, "avx512"), (frozenset({"sse2"}), None)])
def test_select_takes_the_best_variant_the_cpu_executes(on_x86, features, best):
    assert kbuild.select(features) == best
    assert (best in kbuild.runnable(features)) if best else kbuild.runnable(features) == []


def test_the_override_forces_a_lower_variant_never_one_the_cpu_lacks(on_x86, monkeypatch, caplog):
    monkeypatch.setenv(kbuild.ENV, "AVX2")
    assert kbuild.select(SAPPHIRE) == "avx2"
    monkeypatch.setenv(kbuild.ENV, "avx512")
    assert kbuild.select(ZEN4) == "avx512"
    with caplog.at_level(logging.WARNING, logger="gemma_sessions.kernels"):
        monkeypatch.setenv(kbuild.ENV, "amx")
        assert kbuild.select(ZEN4) == "avx512_bf16"  # the CPU lacks AMX: its best instead, never amx
        monkeypatch.setenv(kbuild.ENV, "sse9")
        assert kbuild.select(ZEN3) == "avx2"
    assert "needs amx_int8 amx_tile" in caplog.text and "sse9 ignored (unknown)" in caplog.text
    monkeypatch.setenv(kbuild.ENV, "torch")
    assert kbuild.select(SAPPHIRE) is None


def test_builds_use_explicit_flags_and_a_namespace_per_variant(tmp_path):
    for v in kbuild.VARIANTS:
        cmd = kbuild.command(v.name, tmp_path / "x.so", "c++")
        assert "-march=native" not in cmd and f"-DGS_NAMESPACE=gemma_sessions_{v.name}" in cmd
        assert all(f in cmd for f in v.flags)
    assert "-march=x86-64-v3" in kbuild.command("avx2", tmp_path / "x.so", "c++")
    assert {"-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-int8"} <= set(
        kbuild.command("amx", tmp_path / "x.so", "c++"))


def test_a_variant_the_cpu_cannot_execute_is_never_loaded():
    lacking = [v.name for v in kbuild.VARIANTS if kbuild.missing(v.name)]
    if not lacking:
        pytest.skip("this CPU executes every variant")
    for name in lacking:
        with pytest.raises(ValueError, match="cannot execute"):
            kernels.use_variant(name)
        assert name not in kernels._loaded


def _weight(n: int, k: int, group: int, offsets: bool, seed: int) -> quant.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01
    off = torch.randn(n, k // group, generator=g) * 0.05 if offsets else None
    return quant.QuantWeight(codes=codes, scales=scales, offsets=off, group=group)


def _outputs() -> dict[str, torch.Tensor]:
    """Every op of the loaded variant on fixed inputs, checked against the float32 reference on the way."""
    g = torch.Generator().manual_seed(7)
    out = {}
    w = _weight(96, 640, 32, True, 1)
    dense = w.dequantize()
    for m in (1, 7, 20):
        x = torch.randn(m, 640, generator=g)
        y = kernels.qmatmul(x, w.codes, w.scales, w.offsets, 32)
        ref = x.double() @ dense.double().T
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
        out[f"qmatmul{m}"] = y
        if kernels.wide_available():
            out[f"wide{m}"] = kernels.qmatmul_wide(x, w.codes, w.scales, w.offsets, 32)
            assert ((out[f"wide{m}"] - ref).abs().max() / ref.abs().max()).item() <= 1e-5
        if kernels.i16_available():
            out[f"i16{m}"] = kernels.qmatmul_i16(x, kernels.i16_pack(w.codes, w.scales, w.offsets, 32), 32)
            assert ((out[f"i16{m}"] - ref).abs().max() / ref.abs().max()).item() <= 1e-3
    out["dequantize"] = kernels.dequantize_rows(w.codes, w.scales, w.offsets, 32, 5, 90)
    assert torch.equal(out["dequantize"], dense[5:90])
    x = torch.randn(9, 640, generator=g)
    scale = 1 + torch.randn(640, generator=g) * 0.1
    out["rms_norm"] = kernels.rms_norm(x, scale, 1e-6)
    assert (out["rms_norm"] - torch.nn.functional.rms_norm(x, (640,), scale, 1e-6)).abs().max().item() <= 1e-5
    out["geglu"] = kernels.geglu(torch.randn(9, 2048, generator=g))
    logits = torch.randn(3, 70001, generator=g)
    out["argmax"] = kernels.argmax(logits)
    assert torch.equal(out["argmax"], logits.argmax(-1))
    q, kv = torch.randn(3, 4, 256, generator=g), torch.randn(700, 1, 256, generator=g)
    table = torch.arange(700).view(1, 700).repeat(3, 1)
    att = kernels.decode_attention(q, kv, kv, table, torch.tensor([0, 4, 9]), torch.tensor([1, 300, 690]), 1, 1,
                                   0.0625, None)
    for b, (s, n) in enumerate([(0, 1), (4, 300), (9, 690)]):
        keys = kv[s:s + n, 0]
        want = torch.softmax((keys @ q[b].T).T * 0.0625, -1) @ keys
        assert (att[b] - want).abs().max().item() <= 1e-5
    out["attention"] = att
    if kernels.q8_head_available():
        h = _weight(2048, 640, 32, False, 2)
        xs = torch.randn(6, 640, generator=g)
        tokens, _, _ = kernels.q8_head(xs, kernels.q8_head_pack(h.codes, h.scales), h.codes, h.scales, False)
        exact = kernels.qmatmul(xs, h.codes, h.scales, None, 32)  # the exact greedy token, bit for bit
        assert torch.equal(tokens, kernels.argmax(exact))
        out["q8_head"] = tokens
    return out


@pytest.fixture(scope="module")
def per_variant() -> dict[str, dict[str, torch.Tensor]]:
    if not kernels.available():
        pytest.skip(f"kernels not built here: {kernels._state.get('error')}")
    got = {}
    for name in kbuild.runnable():
        saved = kernels.use_variant(name)
        try:
            got[name] = _outputs()
        finally:
            kernels.restore(saved)
    return got


@pytest.mark.parametrize("name", [v.name for v in kbuild.VARIANTS] if kbuild.x86() else [kbuild.NATIVE.name])
def test_each_variant_the_cpu_executes_matches_the_float32_reference(per_variant, name):
    lacking = kbuild.missing(name)
    if lacking:
        pytest.skip(f"this CPU cannot execute the {name} kernels: it lacks {' '.join(sorted(lacking))}")
    assert "qmatmul1" in per_variant[name]  # _outputs checked every op against its reference


def test_variants_give_the_same_bits_where_the_contract_says_so(per_variant):
    """Every pair of variants this CPU executes: the exact ops bit for bit, the rest within float32 rounding (each
    variant's q8_head tokens already equal its own exact kernel's argmax, bit for bit, in _outputs)."""
    if len(per_variant) < 2:
        pytest.skip(f"this CPU executes only {', '.join(per_variant) or 'no variant'}: nothing to compare")
    for a, b in itertools.combinations(per_variant, 2):
        for key in per_variant[a].keys() & per_variant[b].keys():
            x, y = per_variant[a][key], per_variant[b][key]
            if key in EXACT_OPS:
                assert torch.equal(x, y), (a, b, key)
            elif x.is_floating_point():
                assert ((x - y).abs().max() / y.abs().max()).item() <= 1e-5, (a, b, key)


def _probe(env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); from gemma_sessions import kernels; "
            "print(kernels.available(), kernels.variant())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() + "\n" + done.stderr


def test_the_override_reaches_the_loader_and_a_built_cache_needs_no_compiler(monkeypatch):
    """A process loads what GEMMA_SESSIONS_CPU_CAPABILITY names (``torch``: nothing, with the warning that says
    so); with the cache built (at install), a process with no compiler at all still loads the kernels: nothing is
    compiled on first use."""
    if not kernels.available():
        pytest.skip(f"kernels not built here: {kernels._state.get('error')}")
    lowest = kbuild.runnable()[0]
    assert kbuild.library_path(lowest).exists()
    assert _probe({kbuild.ENV: lowest, "CXX": "/nonexistent/c++"}).startswith(f"True {lowest}")
    off = _probe({kbuild.ENV: "torch"})
    assert off.startswith("False None") and "kernels unavailable" in off


def test_without_a_compiler_a_build_of_the_same_inputs_is_found(tmp_path, monkeypatch):
    """An install built the kernels, then the compiler went away (a slim image): the library whose manifest matches
    these sources, flags and torch loads; one of other sources does not."""
    monkeypatch.setenv("GEMMA_SESSIONS_CACHE", str(tmp_path))
    monkeypatch.setattr(kbuild, "compiler", lambda: None)
    good, stale = tmp_path / "kernels" / "avx2-aaaa", tmp_path / "kernels" / "avx2-bbbb"
    for d, manifest in ((good, kbuild._manifest("avx2")), (stale, '{"inputs": ["other sources"]}')):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(manifest)
        (d / f"{kbuild.namespace('avx2')}.so").write_bytes(b"")
    assert kbuild.find_library("avx2") == good / "gemma_sessions_avx2.so"
    assert kbuild.find_library("avx512") is None
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        kbuild.build("avx512")
