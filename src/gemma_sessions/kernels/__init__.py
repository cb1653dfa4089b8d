"""CPU kernels: ``qmatmul`` (x @ W^T for a weight held as int8 codes + group scales), the batched products, the
LM head's greedy search, fused norms / RoPE / GeGLU and decode attention, compiled per instruction set.

Contract: ``qmatmul(x, codes, scales, offsets, group)`` returns float32 ``[M, N]`` for float32 ``x [M, K]``, int8
``codes [N, K]``, float32 ``scales [N, K/G]`` and optional float32 ``offsets [N, K/G]``, where the weight is

    W[n, k] = scales[n, k // G] * codes[n, k] + offsets[n, k // G]

exactly (the format ``models/quant.py`` makes from GGUF blocks). ``available()`` says whether the compiled kernels
load; when they do not (no compiler, an unsupported CPU, ``GEMMA_SESSIONS_NO_KERNELS=1`` or
``GEMMA_SESSIONS_CPU_CAPABILITY=torch``), every op runs its torch equivalent (slower) and a warning is logged once.

Which library loads is decided once per process (:mod:`.build`): the best instruction-set variant this CPU executes
(avx2, avx512, avx512_vnni, avx512_bf16, amx), or a lower one that ``GEMMA_SESSIONS_CPU_CAPABILITY`` names. Its
library comes from the cache, built there at install (``python -m gemma_sessions.kernels build``); a variant not
built yet is compiled on first use (~30 s, logged). :func:`use_variant` switches a process to another runnable
variant (the tests run every one this CPU executes). The model asks for them through :mod:`.backend`.

:func:`decode_stack` runs every layer of a decode step in one call, from a description of the model's layers
(:class:`StackSpec`, :mod:`.stack`) and of the step's K/V (:class:`StackKV`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from . import build as _build
from .packed import PackedCodes, pack_codes  # noqa: F401 - the packed codes' format, re-exported
from .packed import unpack_codes as unpack_codes_reference
from .stack import LayerSpec, StackKV, StackSpec  # noqa: F401 - the fused decode step's description, re-exported

log = logging.getLogger("gemma_sessions.kernels")

STALE_BUILD_S = 30 * 86400  # builds of other keys unused this long are deleted after a load (prune_builds)
_lock = threading.Lock()
# "op" -> the loaded qmatmul op, "ops" -> its torch.ops namespace, "variant" -> its name; or "error" -> why the
# kernels are unavailable; "forced" -> the variant use_variant() asked for; and the probes' answers, once asked.
_state: dict[str, object] = {}
_loaded: dict[str, object] = {}  # variant -> its torch.ops namespace, for each library loaded in this process


def _load():
    """The compiled qmatmul op of this process's variant (building it if the install did not), or raise."""
    if os.environ.get("GEMMA_SESSIONS_NO_KERNELS"):
        raise RuntimeError("disabled by GEMMA_SESSIONS_NO_KERNELS")
    variant = _state.get("forced") or _build.select()
    if variant is None:
        raise RuntimeError("no runnable variant (GEMMA_SESSIONS_CPU_CAPABILITY=torch, or a CPU without AVX2)")
    ops = _loaded.get(variant)
    if ops is None:
        so = _build.find_library(variant)
        if so is None:
            log.info("building the %s kernels now (python -m gemma_sessions.kernels build does it at install)",
                     variant)
            so = _build.build(variant)
        torch.ops.load_library(str(so))
        ops = _loaded[variant] = getattr(torch.ops, _build.namespace(variant))
        prune_builds(so.parent)
    _state["ops"], _state["variant"] = ops, variant
    return ops.qmatmul.default  # the overload itself: less dispatch per call than the packet


def _ops():
    """The loaded variant's torch.ops namespace (callers check :func:`kernel` first)."""
    return _state["ops"]


def variant() -> str | None:
    """The instruction-set variant this process runs (None: the torch fallback)."""
    return _state.get("variant") if kernel() is not None else None


def use_variant(name: str) -> dict:
    """Switch this process's kernels to variant ``name`` (loaded, and built if needed); raises ValueError when this
    CPU cannot execute it. Returns the previous state, for :func:`restore`. Objects that cached a layout of the
    previous variant (``QuantLinear``'s packed weights) must be made again."""
    lacking = _build.missing(name)
    if lacking:
        raise ValueError(f"this CPU cannot execute the {name} kernels (it lacks {' '.join(sorted(lacking))})")
    with _lock:
        saved = dict(_state)
        _state.clear()
        _state["forced"] = name
        if "keeper" in saved:  # quiet_openmp's thread serves every variant
            _state["keeper"] = saved["keeper"]
    if kernel() is None:
        restore(saved)
        raise RuntimeError(f"the {name} kernels did not load")
    return saved


def restore(saved: dict) -> None:
    """Go back to the state :func:`use_variant` returned."""
    with _lock:
        _state.clear()
        _state.update(saved)


def prune_builds(current: Path, max_age_s: float = STALE_BUILD_S) -> list[Path]:
    """Mark ``current`` (``<variant>-<key>``) as used now and delete sibling builds of the same variant, and the
    single-file kernels' ``qmatmul-*`` builds, unused for ``max_age_s`` (other source versions, compilers or torch
    versions: each load touches its own folder, so a build another install still loads stays). Returns what was
    removed; a folder that cannot be removed is left alone."""
    try:
        os.utime(current)
    except OSError:  # a read-only cache: nothing to mark, nothing to prune
        return []
    removed = []
    cutoff = time.time() - max_age_s
    prefix = current.name.rsplit("-", 1)[0]
    for other in {*current.parent.glob(f"{prefix}-*"), *current.parent.glob("qmatmul-*")}:
        try:
            if other != current and other.is_dir() and other.stat().st_mtime < cutoff:
                shutil.rmtree(other)
                removed.append(other)
        except OSError:
            continue
    if removed:
        log.info("removed %d stale kernel build(s) from %s", len(removed), current.parent)
    return removed


def quiet_openmp() -> bool:
    """Where torch was imported before gemma_sessions with no ``OMP_WAIT_POLICY`` (so libgomp's idle workers spin;
    see the package's ``__init__``): start a thread that keeps an OpenMP team of its own, once. libgomp then manages
    more threads than there are CPUs and cuts its workers' spin to ~100 iterations (GOMP_SPINCOUNT in the libgomp
    manual), close to the passive policy. Returns whether it started one."""
    import gemma_sessions

    if not gemma_sessions._TORCH_FIRST or "keeper" in _state or torch.get_num_threads() < 2:
        return False
    started = threading.Event()

    def keep() -> None:
        torch.ones(1 << 20).add_(1)  # a parallel region: this thread's own team of workers
        started.set()
        threading.Event().wait()  # the team lives as long as this thread

    _state["keeper"] = threading.Thread(target=keep, name="gemma-sessions-openmp-team", daemon=True)
    _state["keeper"].start()
    started.wait(10)
    return True


def kernel():
    """The compiled qmatmul op, or None when it cannot be built (a warning is logged once)."""
    op = _state.get("op")
    if op is not None:
        return op
    if "error" not in _state:
        with _lock:
            if "op" not in _state and "error" not in _state:
                try:
                    _state["op"] = _load()
                    quiet_openmp()
                except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch
                    _state["error"] = f"{type(exc).__name__}: {exc}"
                    log.warning("CPU kernels unavailable, every op runs its slower torch equivalent (%s); with a C++ "
                                "compiler, python -m gemma_sessions.kernels build makes them", _state["error"])
    return _state.get("op")


def available() -> bool:
    return kernel() is not None


def packed_kernel():
    """The compiled qmatmul_packed op (the decode products' hot call on packed codes), or None without the kernel."""
    if kernel() is None:
        return None
    if "packed_op" not in _state:
        _state["packed_op"] = _ops().qmatmul_packed.default
    return _state["packed_op"]


def qmatmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                      group: int) -> torch.Tensor:
    """The same product in plain torch: dequantize W in float32, then ``x @ W^T`` (the fallback and the tests'
    reference)."""
    return torch.nn.functional.linear(x.float(), dequantize(codes, scales, offsets, group))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int) -> torch.Tensor:
    """float32 ``[N, K]``: ``codes * scale + offset`` per group (exact for the GGUF block types, see quant.py)."""
    return dequantize_rows(codes, scales, offsets, group, 0, codes.shape[0])


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int, start: int,
                    end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of :func:`dequantize` (the same bits: ``codes * scale``, then ``+ offset``); one pass
    of the compiled kernel on CPU tensors, torch otherwise."""
    if codes.device.type == "cpu" and kernel() is not None:
        return _ops().dequantize.default(codes, scales, offsets, group, start, end)
    codes, scales = codes[start:end], scales[start:end]
    offsets = None if offsets is None else offsets[start:end]
    n, k = codes.shape
    w = codes.view(n, k // group, group).float() * scales[:, :, None]
    if offsets is not None:
        w += offsets[:, :, None]
    return w.view(n, k)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm of float32 ``x`` over its last dimension with the precomputed ``scale = 1 + w``, in one
    compiled pass per row (``F.rms_norm`` when the kernel is unavailable)."""
    if kernel() is None:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), scale, eps)
    return _ops().rms_norm.default(x, scale, eps)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, start: torch.Tensor,
                     lengths: torch.Tensor, block: int, page_stride: int, scale: float,
                     softcap: float | None) -> torch.Tensor | None:
    """One query per row over keys read in place: float32 ``q [B, Hq, D]``; ``k, v [S, Hkv, D]`` (float32 or
    bfloat16, rows contiguous). Row b attends to ``lengths[b]`` keys at positions ``start[b] + j``, whose slots are
    ``table[b, pos // block] * page_stride + pos % block`` (a paged cache's block table; ``block = page_stride = 1``
    and a table of slots for a plain list). Returns float32 ``[B, Hq, D]``, or None when the compiled kernel is
    unavailable or the tensors are not on the CPU (the caller then gathers and runs
    :func:`gemma_sessions.models.gemma.attention`)."""
    if q.device.type != "cpu" or kernel() is None:
        return None
    return _ops().decode_attention.default(q, k, v, table, start, lengths, block, page_stride,
                                                             scale, softcap or 0.0)


def _built_with(key: str, probe: str) -> bool:
    """Whether the compiled kernel exists and its build has a CPU feature (asked once, through op ``probe``)."""
    if kernel() is None:
        return False
    if key not in _state:
        _state[key] = bool(getattr(_ops(), probe)())
    return bool(_state[key])


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86: AVX512-BF16 or AMX-BF16; arm64: BF16). Without it torch's bf16
    GEMM converts in software, several times slower than float32, so the fast mode's many-row products run in
    float32 there (``models/gemma.py``). ``GEMMA_SESSIONS_NATIVE_BF16=0`` or ``1`` overrides the
    probe (tests take both paths on any CPU)."""
    if "native_bf16" not in _state:
        env = os.environ.get("GEMMA_SESSIONS_NATIVE_BF16")
        if env in ("0", "1"):
            _state["native_bf16"] = env == "1"
        else:
            try:
                with open("/proc/cpuinfo") as f:
                    words = set(next((line for line in f if line.startswith(("flags", "Features"))), "").split())
            except OSError:
                words = set()
            _state["native_bf16"] = bool(words & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(_state["native_bf16"])


def bf16_dot_available() -> bool:
    """Whether :func:`qmatmul_bf16` runs (a compiled kernel with AVX512-BF16)."""
    return _built_with("bf16", "bf16_dot_available")


def qmatmul_bf16(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 group: int) -> torch.Tensor:
    """``x @ W^T`` for many rows at the bf16 rate: x and W rounded to bf16 (W exactly as its bf16 copy would be),
    float32 sums and output. Requires :func:`bf16_dot_available`; K a multiple of 32 and group of 16."""
    if not bf16_dot_available():
        raise RuntimeError("qmatmul_bf16 needs the compiled kernel with AVX512-BF16")
    return _ops().qmatmul_bf16.default(x.float(), codes, scales, offsets, group)


def wide_available() -> bool:
    """Whether :func:`qmatmul_wide` runs (a compiled kernel with AVX2 and FMA but no AVX-512)."""
    return _built_with("wide", "wide_available")


def qmatmul_wide(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 group: int) -> torch.Tensor:
    """float32 ``x [M, K] @ W^T -> [M, N]`` for many rows on AVX2: a GEMM's register tile, lanes along the rows of
    x. Each output is one float32 FMA chain over k against W dequantized in float32 (as :func:`dequantize`), so a
    row's result does not depend on M or on the other rows (but is not :func:`qmatmul`'s, whose lanes run along k).
    Requires :func:`wide_available`; a group that is a multiple of 8."""
    if not wide_available():
        raise RuntimeError("qmatmul_wide needs the compiled kernel built for AVX2 without AVX-512")
    return _ops().qmatmul_wide.default(x.float(), codes, scales, offsets, group)


def qmatmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
            group: int) -> torch.Tensor:
    """float32 ``x [M, K] @ W^T -> [M, N]`` with W as above; the compiled kernel when available."""
    op = kernel()
    if op is None:
        return qmatmul_reference(x, codes, scales, offsets, group)
    return op(x.float(), codes, scales, offsets, group)


def qmatmul_packed(x: torch.Tensor, codes: PackedCodes, scales: torch.Tensor, offsets: torch.Tensor | None,
                   group: int) -> torch.Tensor:
    """:func:`qmatmul` on packed codes (:mod:`.packed`; a group of 16 or 32): the compiled kernel unpacks each chunk
    in registers and runs qmatmul's arithmetic in qmatmul's order, so the result equals ``qmatmul`` on
    ``unpack_codes(codes)`` bit for bit. Without the compiled kernel: the torch reference on the unpacked codes."""
    if kernel() is None:
        return qmatmul_reference(x, unpack_codes_reference(codes), scales, offsets, group)
    return _ops().qmatmul_packed.default(x.float(), codes.data, codes.bits, codes.bias, scales, offsets, group)


def qmatmul_wide_packed(x: torch.Tensor, codes: PackedCodes, scales: torch.Tensor, offsets: torch.Tensor | None,
                        group: int) -> torch.Tensor:
    """:func:`qmatmul_wide` on packed codes (bit for bit its result on the unpacked codes; each block of weight rows
    is unpacked into an int8 staging buffer in L1, then dequantized as qmatmul_wide does). Requires
    :func:`wide_available`."""
    if not wide_available():
        raise RuntimeError("qmatmul_wide needs the compiled kernel built for AVX2 without AVX-512")
    return _ops().qmatmul_wide_packed.default(x.float(), codes.data, codes.bits, codes.bias, scales, offsets, group)


def pack_codes_fast(codes: torch.Tensor, max_bits: int = 6) -> PackedCodes | None:
    """:func:`pack_codes` with the compiled packer where the kernel loads (one pass, no large temporaries: the load's
    peak and heap stay as without packing), torch otherwise; the same bytes."""
    if codes.device.type == "cpu" and kernel() is not None:
        return pack_codes(codes, _ops().pack_codes.default, max_bits)
    return pack_codes(codes, max_bits=max_bits)


def unpack_codes(codes: PackedCodes) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of packed codes (the kernels that read int8 only take these): one compiled pass
    where the kernel loads, torch otherwise; the same values either way."""
    if codes.data.device.type == "cpu" and kernel() is not None:
        return _ops().unpack_codes.default(codes.data, codes.bits, codes.bias, codes.in_features)
    return unpack_codes_reference(codes)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for ``[R, V]`` (or ``[V]``) logits, as torch computes it (the first maximal index; a
    NaN counts as the maximum): the compiled kernel for float32 CPU logits, torch otherwise."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() not in (1, 2) or kernel() is None:
        return logits.argmax(dim=-1)
    if logits.dim() == 1:
        return _ops().argmax.default(logits[None])[0]
    return _ops().argmax.default(logits)


def decode_stack(x: torch.Tensor, spec: StackSpec, kv: StackKV, cos: list, sin: list, wide: list,
                 exact_rows: int, int8: tuple[list, torch.Tensor] | None = None) -> torch.Tensor:
    """Every layer of a decode step over the paged KV cache in one compiled call, as ``spec`` describes them
    (:mod:`.stack`; for Gemma 1-3 the kernels in the order ``GemmaModel._hidden_fused`` runs them with
    ``PagedBatch.attend``, so the same bits). ``cos``/``sin``: the step's RoPE tables ``[N, head_dim]``, indexed by
    ``LayerSpec.rope``. Products run ``qmatmul`` up to ``exact_rows`` rows, beyond ``qmatmul_i16`` on ``wide`` (the
    products' :func:`i16_pack` layouts, 12 tensors per layer) or, with ``wide`` empty, ``qmatmul_wide`` (AVX2 builds)
    or ``qmatmul_bf16``: the caller picks (``backend.DecodeStack``). Writes the step's K/V into ``kv.flats``; returns
    the final-normed hidden ``[M, hidden]``. Packed products run ``qmatmul_packed`` / ``qmatmul_wide_packed``;
    ``qmatmul_bf16`` reads int8 codes only, so for it the caller passes ``int8`` (``spec.int8_args()``: the weights
    with int8 codes and their table). Requires the kernel (callers check :func:`available`)."""
    weights, table = int8 if int8 is not None else (spec.weights, spec.spec)
    return _ops().decode_stack.default(
        x, weights, wide, spec.norms, spec.final_norm, table, spec.fspec, spec.eps, cos, sin, kv.flats,
        kv.layout(), kv.write, kv.table, kv.start, kv.lengths, kv.block, kv.page_stride, exact_rows)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for ``gate_up = [gate | up]`` ([N, 2I], bf16 or float32, CPU) in one compiled pass,
    in the input's dtype (computed in float32, rounded once). Requires the compiled kernel (callers check
    :func:`available`; without it the model runs its torch ops)."""
    return _ops().geglu.default(gate_up)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, s1: torch.Tensor | None, s2: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder layer's residual step: ``x' = x + rms_norm(y) * s1`` (``x + y`` when s1 is None), and
    ``h = rms_norm(x') * s2`` (None when s2 is None); float32 on the CPU, one compiled pass. Requires the kernel."""
    xo, h = _ops().add_rms_norm.default(x, y, s1, s2, eps)
    return xo, (h if s2 is not None else None)


def qk_norm_rope(qkv: torch.Tensor, q_scale: torch.Tensor | None, k_scale: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, hq: int, hkv: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [N, (hq + 2 hkv) D]`` into q, k, v (``[N, H, D]``), RMS-normalise q and k per head (Gemma 3;
    skipped when the scales are None) and apply RoPE (``x cos + roll(x, D/2) sin`` with ``sin`` carrying
    rotate_half's signs; tables ``[N, D]``) to q and k; float32 on the CPU, one compiled pass. Requires the kernel
    (the model's torch path, ``Attention.forward``, is the same math)."""
    return _ops().qk_norm_rope.default(qkv, q_scale, k_scale, cos, sin, hq, hkv, eps)


def q_norm_rope(q: torch.Tensor, q_scale: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, hq: int,
                eps: float) -> torch.Tensor:
    """:func:`qk_norm_rope` for a projection of q heads only ``[N, hq D]`` (a layer that reads another layer's K/V):
    ``[N, hq, D]`` float32, normalised per head (unless ``q_scale`` is None) and rotated. Requires the kernel."""
    return _ops().q_norm_rope.default(q, q_scale, cos, sin, hq, eps)


def i16_available() -> bool:
    """Whether :func:`qmatmul_i16` runs (a compiled kernel with AVX512-VNNI and AVX512-BW)."""
    return _built_with("i16", "i16_available")


def amx_available() -> bool:
    """Whether :func:`qmatmul_i16` can run on AMX's int8 tiles (a build for a CPU with AMX-INT8 whose OS grants the
    tile state; ``GEMMA_SESSIONS_NO_AMX=1`` says no). Same bits as without, faster."""
    if "amx" not in _state:
        _state["amx"] = (not os.environ.get("GEMMA_SESSIONS_NO_AMX") and i16_available()
                         and bool(_ops().amx_available()))
    return bool(_state["amx"])


def amx_group_ok(group: int) -> bool:
    """Whether AMX's layout takes this group size (the kernel's rule: a multiple of 4, at most 256; at most 64 or a
    multiple of 64). False without the compiled kernel."""
    return kernel() is not None and bool(_ops().amx_group_ok(group))


def i16_pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int,
             amx: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped int8 weights re-laid for :func:`qmatmul_i16`: codes as ``[N/16, K/2, 16, 2]`` (16 outputs across a
    vector's lanes, 2 inputs per lane: vpdpwssd's layout) or, for AMX, ``[N/16, K/4, 16, 4]`` (the int8 tile's);
    scales and offsets (empty without) as ``[N/16, K/G, 16]``. N % 16 == 0 and an even group of at most 512.
    ``amx``: None picks AMX's layout where :func:`amx_available` and the group fits; both give the same bits."""
    if not i16_available():
        raise RuntimeError("qmatmul_i16 needs the compiled kernel with AVX512-VNNI")
    if amx is None:
        amx = amx_available() and amx_group_ok(group)
    return _ops().i16_pack.default(codes, scales, offsets, group, amx)


def qmatmul_i16(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    """float32 ``x [M, K] @ W^T -> [M, N]`` with x rounded to int16 (one scale per row: an error of at most
    max|x| / 65534 per element) and W's own codes, group sums exact in int32 (see csrc/products_batched.h). A row with a
    non-finite value gives NaN. ``packed`` is :func:`i16_pack`'s."""
    return _ops().qmatmul_i16.default(x.float(), *packed, group)


def q8_head_available() -> bool:
    """Whether :func:`q8_head` runs (a compiled kernel with AVX512-VNNI, or with AVX2 and no AVX-512)."""
    return _built_with("q8", "q8_head_available")


def q8_head_pack(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM head's weights re-laid for :func:`q8_head`: uint8 codes + 128 as ``[N/L, K/4, L, 4]``, scales as
    ``[N/L, K/32, L]`` (L = 16 outputs per vector with AVX512-VNNI, 8 with AVX2; with AVX2 float16 where every scale
    is a float16 value, as a Q8_0 head's are, else float32), and each group's largest sum of
    ``|W|`` over the outputs as ``[K/32]``. Codes int8 ``[N, K]``, float32 scales per group of 32."""
    if not q8_head_available():
        raise RuntimeError("q8_head needs the compiled kernel with AVX512-VNNI or AVX2")
    return _ops().q8_head_pack.default(codes, scales)


def q8_head(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], codes: torch.Tensor,
            scales: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The exact greedy token of ``x @ W^T`` (W = codes * scales, groups of 32) for each row of float32 ``x``,
    found through an int8-activation approximation with an error bound per row (see csrc/head.h). Returns
    (tokens [M] int64, -1 for a row with non-finite values; candidates [M]: exact logits computed per row;
    the approximate logits [M, N] when ``want_logits``, else None)."""
    tokens, cands, logits = _ops().q8_head.default(x.float(), *packed, codes, scales, want_logits)
    return tokens, cands, (logits if want_logits else None)
