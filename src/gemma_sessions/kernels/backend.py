"""The CPU kernel backend's policy: which compiled kernel computes a quantized product of a given number of rows.

Contract: the model asks this module for a quantized projection (:class:`QuantLinear`, made once per weight at load
time) and for fused ops (:func:`geglu_mlp`, :func:`matmul_dtype`); the engine asks :func:`plan` how a step of so
many rows runs (its head, whether its decode rows stay exact alone); a model's :class:`DecodeStack` says whether a
decode step can run as one compiled call, and runs it. Nothing above this package names a CPU feature or a row-count
threshold.

One policy, :func:`plan`, answers for every caller::

    rows  1 ........ exact_max_rows() ........ I16_MAX_ROWS ........ many (prefill)
          EXACT      | WIDE (AVX2 build), I16 (VNNI build) or BF16_DOT (BF16 build), then
                     | the bf16 GEMM on a bf16 copy, or float32 tiles where bf16 would be software

The kernels a build has are asked through ``kernels.*_available()`` (what the compiled library was built for);
the measurements behind each threshold are in bench/RESULTS.md ("Kernel policy").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .packed import PackedCodes

log = logging.getLogger("gemma_sessions.kernels")

# The products' kernels, as plan() and QuantLinear.plan() name them.
EXACT = "qmatmul"  # float32 activations and sums, exact weights; a row's bits do not depend on the batch
WIDE = "qmatmul_wide"  # the same math as a GEMM tile (AVX2 builds): float32 chains, a row's bits its own
I16 = "qmatmul_i16"  # int16 activations, integer group sums (AVX512-VNNI builds; AMX tiles give the same bits)
BF16_DOT = "qmatmul_bf16"  # bf16 inputs and weights, float32 sums (AVX512-BF16 builds)
BF16_GEMM = "bf16_gemm"  # torch's bf16 GEMM on a bf16 copy of W (made on first need)
F32_TILES = "float32_tiles"  # torch's float32 GEMM over dequantized tiles of W (no copy kept)

# Rows up to which a product runs the exact kernel where a many-row kernel takes the rows above: at one row it
# streams the weights fastest; by 16 rows the many-row kernels (or the bf16 GEMM) win.
QMATMUL_MAX_ROWS = 8
# The LM head keeps the exact kernel to this many rows where no WIDE kernel runs: its alternative is float32 tiles
# (no bf16 copy of the vocabulary-sized head is kept), several times slower at these sizes.
HEAD_QMATMUL_MAX_ROWS = 32
# BF16_DOT takes products above QMATMUL_MAX_ROWS while rows x in_features stays within this many inputs (their bf16
# copy fits L1) ...
BF16_DOT_MAX_ELEMENTS = 16384
# ... and every product of at most this many rows (the engine's batched decode), so the whole decode step can run as
# one compiled call (stack_plan).
BF16_DOT_MAX_ROWS = 16
# Vocabulary rows per float32 tile of the head's many-row products (scoring every position of a sequence).
HEAD_TILE_ROWS = 16384
# Rows from which the engine's greedy rows take their token from the int8-activation head (q8_head) rather than the
# exact kernel's logits (the same tokens): below, the exact kernel's simpler loop streams the codes as fast ...
GREEDY_HEAD_MIN_ROWS = 5
# ... except on AVX2 builds, where q8_head's 8-lane vpmaddubsw does 32 products per two multiplies against 16 for the
# exact kernel's FMAs: faster from one row.
WIDE_GREEDY_HEAD_MIN_ROWS = 1
# I16 takes the layers' products above QMATMUL_MAX_ROWS up to this many rows (beyond, the bf16 GEMM wins); its
# error is ~1e-4 relative against ~3e-3 for the bf16 paths.
I16_MAX_ROWS = 64
# Where a build has no many-row kernel, the exact kernel takes products (and the engine's batched head) up to this
# many rows: faster than the alternatives there, and a batched decode step then gives every row its bits alone.
EXACT_WIDE_MAX_ROWS = 64
# Output rows per float32 tile of the layers' prefill products where bf16 GEMMs would run in software.
LAYER_TILE_ROWS = 512
_PACK_LOCK = threading.Lock()  # QuantLinear.prepare_greedy / prepare_i16: one packing each, whichever thread first
# Group sizes whose products read packed codes (kernels/packed.py): every GGUF type narrower than 8 bits has 16 or 32.
PACKED_GROUPS = (16, 32)
# The widest codes a layer keeps packed. The exact kernel converts every code to float32, so at one row it is bound
# by that arithmetic about as much as by memory: on the AVX2 build unpacking 5 and 6 bits cost more time than their
# fewer bytes saved, while 4 bits (Q4_K, Q4_0) broke even and halve those layers' memory (measurements with issue 18's
# native-width weights). GEMMA_SESSIONS_PACKED_BITS (4, 5 or 6; 8: none) overrides it, for A/B runs.
PACKED_MAX_BITS = 4


def packed_max_bits() -> int:
    """:data:`PACKED_MAX_BITS`, or the width ``GEMMA_SESSIONS_PACKED_BITS`` names."""
    env = os.environ.get("GEMMA_SESSIONS_PACKED_BITS", "")
    return int(env) if env in ("4", "5", "6", "8") else PACKED_MAX_BITS


class UnpackedCodes:
    """The int8 copies of packed codes that kernels reading int8 only have made (``QuantLinear.codes``): how many
    and their bytes, in this process (memory the packed layout did not save)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.count += 1
            self.bytes += nbytes
            first = self.count == 1
        if first:
            log.info("a kernel that reads int8 codes only unpacked a packed weight (%d bytes kept; "
                     "kernels.backend.UNPACKED counts them)", nbytes)


UNPACKED = UnpackedCodes()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How a step of ``rows`` rows runs on this build (see :func:`plan`).

    Attributes:
        product: the layers' product kernel (EXACT, WIDE, I16, BF16_DOT, or BF16_GEMM for the many-row torch
            path), for a projection whose shape every kernel takes (``QuantLinear.plan`` refines it per weight).
        exact: whether the rows are few enough for the exact kernel, whose products give each row the bits it
            gets alone (the engine then runs decode rows apart from prefill chunks).
        greedy_head: whether the engine's greedy rows take their token from the int8-activation head.
        approx_logits: whether sampled rows among rows too many for the exact kernel take that head's approximate
            logits (builds whose head keeps 8-bit activations); otherwise they keep the product's logits.
    """

    rows: int
    product: str
    exact: bool
    greedy_head: bool
    approx_logits: bool


def exact_max_rows() -> int:
    """Rows up to which the layers' products (and the engine's batched LM head) run the exact kernel:
    ``QMATMUL_MAX_ROWS`` where a many-row kernel takes the rows above, else ``EXACT_WIDE_MAX_ROWS``."""
    if kernels.i16_available() or kernels.bf16_dot_available() or kernels.wide_available():
        return QMATMUL_MAX_ROWS
    return EXACT_WIDE_MAX_ROWS


def greedy_head_min_rows() -> int:
    """Rows from which the engine's greedy rows take their token from the int8-activation head."""
    return WIDE_GREEDY_HEAD_MIN_ROWS if kernels.wide_available() else GREEDY_HEAD_MIN_ROWS


def approx_head_logits() -> bool:
    """Whether sampled rows among more than ``exact_max_rows()`` take the int8-activation head's approximate
    logits: where its activations have 8 bits; the AVX2 build's have 7 (several times the error), and there sampled
    rows keep the product's logits."""
    return not kernels.wide_available()


def plan(rows: int) -> Plan:
    """The one policy: how a step of this many rows runs here. ``Linear`` products, the engine's head and its
    decode step all follow it."""
    exact = rows <= exact_max_rows()
    if kernels.kernel() is None:
        product = BF16_GEMM
    elif exact:
        product = EXACT
    elif kernels.wide_available():
        product = WIDE
    elif rows <= I16_MAX_ROWS and kernels.i16_available():
        product = I16
    elif rows <= BF16_DOT_MAX_ROWS and kernels.bf16_dot_available():
        product = BF16_DOT
    else:
        product = BF16_GEMM
    return Plan(rows=rows, product=product, exact=exact, greedy_head=rows >= greedy_head_min_rows(),
                approx_logits=approx_head_logits())


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which torch's matmuls of ``dtype`` tensors should run here: float32 where this CPU has no
    native bf16 (torch then converts bf16 in software, several times slower than float32), else ``dtype``."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not kernels.native_bf16():
        return torch.float32
    return dtype


class QuantLinear(nn.Module):
    """A bias-free projection with grouped int8 weights: ``W[n, k] = scales[n, k // G] * codes[n, k] +
    offsets[n, k // G]`` (int8 codes; float32 scales per group of G inputs; float32 offsets or None), computed by
    the kernel :meth:`plan` picks for the row count.

    Codes that fit ``packed_max_bits()`` bits (of a layer's GGUF Q4/Q5/Q6 types; groups of 16 or 32) are kept packed
    at that width (:attr:`packed`, kernels/packed.py) where the compiled kernels run: EXACT and WIDE read them, unpacking in
    registers, with the same bits as on int8 codes. The other kernels (I16, BF16_DOT, AMX, the bf16 copy, float32
    tiles) take int8 codes, unpacked on first need (:attr:`codes`; the copies kept are counted in ``UNPACKED``). The
    head keeps int8 codes (q8_head reads them).

    Paths (``plan``): EXACT up to ``max_kernel_rows`` rows; then WIDE, I16 (not the head) or BF16_DOT (not the head)
    where the build has it and the shape fits; then float32 tiles (the head; layers without native bf16) or the bf16
    GEMM on a bf16 copy of W made on first need (inputs, weights and outputs rounded to bf16). Without the compiled
    kernel every path is the bf16 copy's. ``forward_batch`` is the engine's batched head; ``greedy`` its exact
    greedy tokens through int8 activations.

    NOTE: prefill keeps the bf16 GEMM's rounding (top-1 agreement with float32 ~0.988 on the 270M) rather than a
    float32 GEMM, which is exact but ~2x slower; see bench/RESULTS.md.

    Example::

        lin = QuantLinear(codes, scales, None, 32)   # codes int8 [out, in], scales float32 [out, in / 32]
        y = lin(x)                                     # x: [N, in] float32 -> [N, out] float32
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int, *,
                 head: bool = False):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.int8 = True
        self.head = head
        self.group = group
        pk = None
        widest = packed_max_bits()
        if widest < 8 and not head and group in PACKED_GROUPS and codes.device.type == "cpu" and kernels.available():
            pk = kernels.pack_codes_fast(codes, widest)
        self.pk_bits, self.pk_bias = (pk.bits, pk.bias) if pk is not None else (8, 0)
        self.register_buffer("packed_codes", pk.data if pk is not None else None)  # uint8, see kernels/packed.py
        self.register_buffer("int8_codes", codes if pk is None else None)  # packed: the unpacked copy, on need
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.bf16: torch.Tensor | None = None  # the prefill copy, made on first need
        self._q8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # greedy()'s layout, on first need
        self._i16: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # qmatmul_i16's, on first need
        self._i16_shape_ok: bool | None = None  # i16_rows' fixed part, on first ask
        self._wide_ok: bool | None = None  # wide_rows' fixed part, on first ask

    @property
    def packed(self) -> PackedCodes | None:
        """The codes as the packed products read them, or None (int8 codes only)."""
        if self.packed_codes is None:
            return None
        return PackedCodes(data=self.packed_codes, bits=self.pk_bits, bias=self.pk_bias, in_features=self.in_features)

    @property
    def codes(self) -> torch.Tensor:
        """int8 codes ``[out, in]``: the codes themselves, or for packed ones their unpacked copy, made on first need
        and kept (counted in ``UNPACKED``)."""
        if self.int8_codes is None:
            with _PACK_LOCK:
                if self.int8_codes is None:
                    self.int8_codes = kernels.unpack_codes(self.packed)
                    UNPACKED.add(self.int8_codes.numel())
        return self.int8_codes

    def _codes_once(self) -> torch.Tensor:
        """int8 codes for a one-time re-layout (i16_pack, the bf16 copy): the kept copy if there is one, else an
        unpacked copy that is not kept."""
        return self.int8_codes if self.int8_codes is not None else kernels.unpack_codes(self.packed)

    @property
    def max_kernel_rows(self) -> int:
        """Rows up to which ``forward`` runs the exact kernel (see :func:`exact_max_rows`)."""
        if self.head and not self.wide_rows(exact_max_rows() + 1):
            return max(HEAD_QMATMUL_MAX_ROWS, exact_max_rows())
        return exact_max_rows()

    def plan(self, rows: int, batch: bool = False) -> str:
        """The kernel ``forward`` (``forward_batch`` with ``batch``) runs for this many rows."""
        op = kernels.kernel() is not None
        if batch and rows > exact_max_rows() and not self.wide_rows(rows):
            if rows * self.in_features <= BF16_DOT_MAX_ELEMENTS and self._bf16_dot():
                return BF16_DOT
            return F32_TILES if op and not kernels.native_bf16() else BF16_GEMM
        if op and rows <= self.max_kernel_rows:
            return EXACT
        if self.wide_rows(rows):
            return WIDE
        if self.i16_rows(rows):
            return I16
        if not self.head and self._bf16_dot_rows(rows):
            return BF16_DOT
        return F32_TILES if op and (self.head or not kernels.native_bf16()) else BF16_GEMM

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, in] -> [N, out], same dtype as x
        op = kernels.kernel()
        if op is not None and x.shape[0] <= self.max_kernel_rows:  # decode: the one hot call, kept bare
            xf = x if x.dtype == torch.float32 else x.float()
            if self.packed_codes is not None:
                y = kernels.packed_kernel()(xf, self.packed_codes, self.pk_bits, self.pk_bias, self.scales,
                                            self.offsets, self.group)
            else:
                y = op(xf, self.int8_codes, self.scales, self.offsets, self.group)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return self._run(self.plan(x.shape[0]), x)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The engine's batched decode (the LM head): the exact kernel up to ``exact_max_rows()`` rows, so a step of
        a few decode rows is exact as alone; beyond, WIDE where it runs, else BF16_DOT within
        ``BF16_DOT_MAX_ELEMENTS`` inputs, else the bf16 GEMM (float32 tiles without native bf16)."""
        return self._run(self.plan(x.shape[0], batch=True), x)

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        pk = self.packed
        if path == EXACT and pk is not None:
            return kernels.qmatmul_packed(x, pk, self.scales, self.offsets, self.group).to(x.dtype)
        if path == EXACT:
            return kernels.qmatmul(x, self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if path == WIDE and pk is not None:
            return kernels.qmatmul_wide_packed(x, pk, self.scales, self.offsets, self.group).to(x.dtype)
        if path == WIDE:
            return kernels.qmatmul_wide(x, self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if path == I16:
            return kernels.qmatmul_i16(x, self.prepare_i16(), self.group).to(x.dtype)
        if path == BF16_DOT:
            return kernels.qmatmul_bf16(x, self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if path == F32_TILES:
            return self._float32_tiles(x.float(), HEAD_TILE_ROWS if self.head else LAYER_TILE_ROWS).to(x.dtype)
        return self.bf16_gemm(x).to(x.dtype)

    def _bf16_dot(self) -> bool:
        return kernels.bf16_dot_available() and self.in_features % 32 == 0 and self.group % 16 == 0

    def greedy_ready(self) -> bool:
        """Whether :meth:`greedy` runs: a head on the CPU with groups of 32 and no offsets (Q8_0 or symmetric), a
        vocabulary that is a multiple of 16, and a build with the int8-activation head (q8_head)."""
        return (self.head and self.group == 32 and self.offsets is None and self.out_features % 16 == 0
                and self.in_features % 32 == 0 and self.scales.device.type == "cpu" and kernels.q8_head_available())

    def greedy(self, x: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The EXACT greedy token of each row of ``x @ W^T`` (the exact kernel's argmax, bit for bit), through
        ``kernels.q8_head``: int8 activations, integer products, then exact logits for the few outputs the error bound
        cannot rule out. Returns (tokens [M] int64, -1 for a row with non-finite values; the approximate float32
        logits [M, vocab] when ``want_logits``, else None). The re-laid weights (~1.125x the codes) are made on first
        use (:meth:`prepare_greedy`)."""
        tokens, _, logits = kernels.q8_head(x, self.prepare_greedy(), self.codes, self.scales, want_logits)
        return tokens, logits

    def prepare_greedy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = self._q8
        if packed is None:
            with _PACK_LOCK:
                if self._q8 is None:
                    self._q8 = kernels.q8_head_pack(self.codes, self.scales)
                packed = self._q8
        return packed

    def wide_rows(self, rows: int) -> bool:
        """Whether ``forward`` of this many rows runs WIDE (more rows than the exact kernel takes; a group that is a
        multiple of 8; a build with it)."""
        if rows <= QMATMUL_MAX_ROWS:
            return False
        if self._wide_ok is None:
            self._wide_ok = bool(self.group % 8 == 0 and self.scales.device.type == "cpu" and kernels.wide_available())
        return self._wide_ok

    def i16_rows(self, rows: int) -> bool:
        """Whether ``forward`` of this many rows runs I16 (a layer, not the head; more rows than the exact kernel
        takes, at most ``I16_MAX_ROWS``; N % 16 == 0, an even group of at most 512; a build with it)."""
        if not QMATMUL_MAX_ROWS < rows <= I16_MAX_ROWS:
            return False
        if self._i16_shape_ok is None:  # asked per product per step: the fixed part once
            self._i16_shape_ok = bool(not self.head and self.out_features % 16 == 0 and self.group % 2 == 0
                                      and self.group <= 512 and self.scales.device.type == "cpu")
        return self._i16_shape_ok and kernels.i16_available()

    def prepare_i16(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qmatmul_i16's layout of the weights (a second copy of the codes, scales and offsets), made on first need
        (the engine makes it at start) whatever the thread."""
        packed = self._i16
        if packed is None:
            with _PACK_LOCK:
                if self._i16 is None:
                    self._i16 = kernels.i16_pack(self._codes_once(), self.scales, self.offsets, self.group)
                packed = self._i16
        return packed

    def _bf16_dot_rows(self, rows: int) -> bool:
        """Whether a product of this many rows (above the exact kernel's) runs BF16_DOT."""
        small = rows * self.in_features <= BF16_DOT_MAX_ELEMENTS or rows <= BF16_DOT_MAX_ROWS
        return small and self._bf16_dot()

    def bf16_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: a bf16 GEMM on a bf16 copy of W, made on first need; bf16 out."""
        if self.bf16 is None:
            self.bf16 = kernels.dequantize(self._codes_once(), self.scales, self.offsets, self.group).to(
                torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), self.bf16)

    def uses_bf16_gemm(self, rows: int) -> bool:
        """Whether ``forward`` of this many rows runs the bf16 GEMM (a layer's prefill path)."""
        if self.head:
            return False
        return kernels.kernel() is None or self.plan(rows) == BF16_GEMM

    def _float32_tiles(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for start in range(0, self.out_features, tile):
            end = min(start + tile, self.out_features)
            out[:, start:end] = F.linear(x, kernels.dequantize_rows(self.codes, self.scales, self.offsets, self.group,
                                                                    start, end))
        return out

    def weight_bytes(self) -> int:
        """Bytes of weight read per product on the decode path (packed codes where the layer keeps them)."""
        off = 0 if self.offsets is None else self.offsets.numel() * 4
        codes = self.packed_codes if self.packed_codes is not None else self.int8_codes
        return codes.numel() + self.scales.numel() * 4 + off


def geglu_mlp(gate_up: QuantLinear, down: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """``down(gelu_tanh(gate) * up)`` for ``gate_up(x) = [gate | up]``, with the activation as one compiled pass
    between the products; None where the compiled kernels do not run (the model then runs its torch ops).
    Where the products are bf16 GEMMs (prefill) the activation reads the first's bf16 output and writes the
    second's bf16 input (no [N, inter] float32 temporaries)."""
    if not kernels.available():
        return None
    if gate_up.uses_bf16_gemm(x.shape[0]):
        return down.bf16_gemm(kernels.geglu(gate_up.bf16_gemm(x))).to(x.dtype)
    if x.device.type != "cpu":
        return None
    return down(kernels.geglu(gate_up(x)))


def stack_plan(products: list[QuantLinear], rows: int) -> str | None:
    """The product kernel with which a decode step of this many rows runs every layer in one compiled call
    (``kernels.decode_stack``): EXACT up to ``exact_max_rows()``, else WIDE, I16 or BF16_DOT (at most
    ``BF16_DOT_MAX_ROWS`` rows) when every product takes it; None when some product would take another path (the
    step then runs layer by layer)."""
    if not kernels.available():
        return None
    if rows <= exact_max_rows():
        return EXACT
    paths = {li.plan(rows) for li in products}
    if len(paths) != 1:
        return None
    (path,) = paths
    if path in (WIDE, I16) or (path == BF16_DOT and rows <= BF16_DOT_MAX_ROWS):
        return path
    return None


class DecodeStack:
    """A model's decode step as one compiled call (``kernels.decode_stack``) with the policy around it: which product
    kernel a step of so many rows runs (:func:`stack_plan`, fixed per model and build, so kept per row count), the
    int16 layouts that kernel then needs, and the exact kernel's row limit. The model gives the description
    (``kernels.StackSpec``: model math only); the engine's cache the step's K/V (``kernels.StackKV``).

    Example::

        stack = DecodeStack(spec)                   # once per model
        if stack.plan(rows) is not None:            # else the step runs layer by layer
            h = stack(x, cos, sin, kv)              # x: [rows, hidden] -> final-normed [rows, hidden]
    """

    def __init__(self, spec: kernels.StackSpec):
        self.spec = spec
        self._plans: dict[int, str | None] = {}
        self._i16: list[torch.Tensor] | None = None  # every product's qmatmul_i16 layout, in the spec's order
        self._int8: tuple[list[torch.Tensor], torch.Tensor] | None = None  # int8 codes for BF16_DOT, on first need

    def plan(self, rows: int) -> str | None:
        """The product kernel of a step of this many rows in one call, or None (see :func:`stack_plan`)."""
        if not kernels.available():
            return None
        if rows not in self._plans:
            self._plans[rows] = stack_plan(self.spec.products(), rows)
        return self._plans[rows]

    def __call__(self, x: torch.Tensor, cos: list[torch.Tensor], sin: list[torch.Tensor],
                 kv: kernels.StackKV) -> torch.Tensor:
        """The final-normed hidden ``[rows, hidden]`` of a decode step (requires ``plan(rows)``); writes its K/V."""
        wide, int8 = [], None
        path = self.plan(x.shape[0])
        if path == I16:
            if self._i16 is None:
                self._i16 = [t for li in self.spec.products() for t in li.prepare_i16()]
            wide = self._i16
        elif path == BF16_DOT and any(li.packed_codes is not None for li in self.spec.products()):
            if self._int8 is None:  # qmatmul_bf16 reads int8 codes only
                self._int8 = self.spec.int8_args()
            int8 = self._int8
        return kernels.decode_stack(x, self.spec, kv, cos, sin, wide, exact_max_rows(), int8)
