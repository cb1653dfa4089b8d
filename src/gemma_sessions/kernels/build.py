"""The kernels' instruction-set variants: which exist, which this CPU runs, and building them once into the cache.

Contract: :data:`VARIANTS` lists the builds from the most portable up, each with explicit compiler flags and the CPU
features it needs (``/proc/cpuinfo`` names). :func:`select` picks the best variant this CPU executes, or the one
``GEMMA_SESSIONS_CPU_CAPABILITY`` asks for when the CPU executes it (a lower variant, as ATen's
``ATEN_CPU_CAPABILITY``; ``torch`` turns the compiled kernels off). A variant the CPU cannot execute is never
selected, hence never loaded. :func:`build` compiles one variant into ``<cache dir>/kernels/<variant>-<key>/``, where
the key hashes the sources, the flags, the compiler and torch: the library depends on those only, so every clone and
venv with the same compiler and torch reuses it. ``python -m gemma_sessions.kernels build`` runs it at install.

    variant       flags                                   CPU features needed (beyond the previous row's)
    avx2          -march=x86-64-v3                        avx2 fma f16c bmi1 bmi2 movbe abm
    avx512        -march=x86-64-v4                        avx512f avx512bw avx512cd avx512dq avx512vl
    avx512_vnni   ... -mavx512vnni                        avx512_vnni
    avx512_bf16   ... -mavx512bf16                        avx512_bf16
    amx           ... -mamx-tile -mamx-int8 -mamx-bf16    amx_tile amx_int8 amx_bf16
    native        -march=native (not x86: the build machine's own CPU, keyed by its features)
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from ..paths import cache_dir

log = logging.getLogger("gemma_sessions.kernels")

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "ops.cpp"  # the one translation unit; it includes the other parts (csrc/*.h)
ENV = "GEMMA_SESSIONS_CPU_CAPABILITY"
# No OpenMP: the kernels' loops run on their own thread pool (csrc/pool.h, par_for), sized by torch.set_num_threads.
CFLAGS = ("-O3", "-pthread", "-fPIC", "-std=c++20")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]  # /proc/cpuinfo flags


_V3 = frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
VARIANTS = (
    Variant(name="avx2", flags=("-march=x86-64-v3",), needs=_V3),
    Variant(name="avx512", flags=("-march=x86-64-v4",), needs=_V4),
    Variant(name="avx512_vnni", flags=("-march=x86-64-v4", "-mavx512vnni"), needs=_V4 | {"avx512_vnni"}),
    Variant(name="avx512_bf16", flags=("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"),
            needs=_V4 | {"avx512_vnni", "avx512_bf16"}),
    Variant(name="amx", flags=("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-int8",
                               "-mamx-bf16"), needs=_V4 | {"avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}),
)
NATIVE = Variant(name="native", flags=("-march=native",), needs=frozenset())
BY_NAME = {v.name: v for v in (*VARIANTS, NATIVE)}


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_features() -> frozenset[str]:
    """This CPU's feature flags as the OS reports them (Linux ``/proc/cpuinfo``; the kernel lists only features whose
    register state it saves, so AVX-512 is absent where the OS does not enable it)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def missing(variant: str, features: frozenset[str] | None = None) -> frozenset[str]:
    """The CPU features ``variant`` needs that this CPU lacks (empty: it runs here)."""
    v = BY_NAME[variant]
    if v is NATIVE:
        return frozenset() if not x86() else frozenset({"(native is for CPUs other than x86)"})
    if not x86():
        return frozenset({"x86-64"})
    return v.needs - (cpu_features() if features is None else features)


def runnable(features: frozenset[str] | None = None) -> list[str]:
    """The variants this CPU executes, the most portable first."""
    if not x86():
        return [NATIVE.name]
    return [v.name for v in VARIANTS if not missing(v.name, features)]


def select(features: frozenset[str] | None = None) -> str | None:
    """The variant to load: ``GEMMA_SESSIONS_CPU_CAPABILITY`` when set and runnable here, else the best runnable
    one; None for ``torch`` (no compiled kernels) or when none runs (x86 without AVX2)."""
    can = runnable(features)
    want = os.environ.get(ENV, "").strip().lower()
    if want == "torch":
        return None
    if want:
        if want in can:
            return want
        why = "unknown" if want not in BY_NAME else f"needs {' '.join(sorted(missing(want, features)))}"
        log.warning("%s=%s ignored (%s); using %s", ENV, want, why, can[-1] if can else "the torch path")
    return can[-1] if can else None


def compiler() -> str | None:
    """The C++ compiler (``$CXX`` or ``c++``), or None."""
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


@functools.lru_cache(maxsize=8)
def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return cxx


def _sources():  # hashlib object over every source part
    h = hashlib.sha256()
    for part in sorted(CSRC.iterdir()):
        if part.suffix in (".cpp", ".h"):
            h.update(part.name.encode() + b"\0" + part.read_bytes())
    return h


def _inputs(variant: str) -> list[str]:
    """What a build of ``variant`` depends on besides the compiler: the sources, the flags, torch (and for ``native``
    the CPU's features, which its flags stand for)."""
    v = BY_NAME[variant]
    extra = " ".join(sorted(cpu_features())) if v is NATIVE else ""
    return [_sources().hexdigest(), variant, *CFLAGS, *v.flags, torch.__version__, platform.machine(), extra]


def key(variant: str, cxx: str | None = None) -> str:
    """The cache key of a build of ``variant``: its inputs (:func:`_inputs`) and the compiler."""
    h = _sources()
    inputs = _inputs(variant)
    for part in (*inputs[1:-3], _compiler_id(cxx or compiler() or "c++"), *inputs[-3:]):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def namespace(variant: str) -> str:
    """The torch.ops namespace a variant's library registers (``torch.ops.gemma_sessions_avx2``...)."""
    return f"gemma_sessions_{variant}"


def library_path(variant: str, cxx: str | None = None) -> Path:
    return cache_dir() / "kernels" / f"{variant}-{key(variant, cxx)}" / f"{namespace(variant)}.so"


def _manifest(variant: str) -> str:
    return json.dumps({"inputs": _inputs(variant)})


def find_library(variant: str) -> Path | None:
    """The built library of ``variant`` for these sources and this torch, or None. With a compiler, the one its key
    names; without one (removed after the install built the kernels, or not on this PATH), any build of the same
    inputs, by the manifest each build leaves beside its library."""
    if compiler() is not None:
        so = library_path(variant)
        if so.exists() and not (so.parent / "manifest.json").exists():
            try:  # a build from before manifests: record its inputs
                (so.parent / "manifest.json").write_text(_manifest(variant))
            except OSError:
                pass
        return so if so.exists() else None
    want = _manifest(variant)
    found = []
    for m in (cache_dir() / "kernels").glob(f"{variant}-*/manifest.json"):
        so = m.parent / f"{namespace(variant)}.so"
        try:
            if m.read_text() == want and so.exists():
                found.append((so.stat().st_mtime, so))
        except OSError:
            continue
    return max(found)[1] if found else None


def command(variant: str, out: Path, cxx: str) -> list[str]:
    """The compiler command for one variant: the one translation unit straight to a shared library linked against
    torch's C++ libraries (no Python, no pybind11: the library registers its ops itself)."""
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    inc = [f for p in cpp_extension.include_paths() for f in ("-isystem", p)]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [cxx, *CFLAGS, *BY_NAME[variant].flags, f"-DGS_NAMESPACE={namespace(variant)}",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc, "-shared", str(SOURCE), "-o", str(out), *libs,
            "-lc10", "-ltorch_cpu", "-ltorch"]


def build(variant: str, force: bool = False) -> Path:
    """Compile ``variant`` into the cache unless it is there; returns the library's path. Safe against concurrent
    builders (an flock, released by the OS if the builder dies) and against a build killed midway (the library
    is written under another name, then renamed). Raises RuntimeError without a compiler or on a failed build.
    Building never loads the library: a variant this CPU cannot execute can be built (for another machine)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX) on PATH")
    so = library_path(variant, cxx)
    if so.exists() and not force:
        return so
    so.parent.mkdir(parents=True, exist_ok=True)
    with open(so.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if so.exists() and not force:
                return so
            tmp = so.with_name(f".{so.name}.{os.getpid()}.tmp")
            t0 = time.monotonic()
            done = subprocess.run(command(variant, tmp, cxx), capture_output=True, text=True)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"building the {variant} kernels failed:\n{done.stderr[-4000:]}")
            (so.parent / "manifest.json").write_text(_manifest(variant))
            os.replace(tmp, so)
            log.info("built the %s kernels in %.0f s: %s", variant, time.monotonic() - t0, so)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return so
