"""Gemma 1, 2 and 3 text decoders in plain PyTorch, in one readable file.

Contract: token ids and positions in, hidden states / logits out. The model never sees a session or a cache
layout: attention reads and writes KV through a ``KVBatch`` object (``attend(layer, q, k, v) -> out``), so the
same layers run a single dense sequence (``DenseKV``, used by ``forward`` and ``generate``) and the engine's
paged, continuously batched steps. Tokens of every sequence in a step are flattened into one ``[N, hidden]``
matrix, so every projection is one matrix product whatever the batch.

Every numerical quirk is commented where it happens, with the transformers module that does the same
(``transformers/models/gemma3/modeling_gemma3.py`` unless named otherwise).
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import SLIDING, ModelConfig
from . import quant

# ------------------------------------------------------------------------------------------------ linear layers


# Rows (tokens) up to which an int8 Linear runs the grouped int8 kernel (kernels.qmatmul: exact weights, float32
# activations); larger batches (prefill) run a bf16 GEMM on a bf16 copy of the layer made on first need. Measured on
# the 2-core CPU with weights read from memory as decoding reads them (bench/kernels.py, bench/RESULTS.md): on the
# layers the kernel is 3-4x faster than the bf16 GEMM at 1 row, 0.7-2.2x at 8, 0.5-1.2x at 16.
QMATMUL_MAX_ROWS = 8
# The LM head's alternative beyond that is float32 tiles (no bf16 copy of the head): ~160 ms at 16 rows, ~4x the
# kernel's 68 ms, whose cost grows ~4 ms per row: the head keeps the kernel up to this many rows.
HEAD_QMATMUL_MAX_ROWS = 32
# Above QMATMUL_MAX_ROWS, while rows x in_features stays within this many inputs (their bf16 copy fits L1: 25 rows at
# K = 640, 16 at 1024, none beyond 8 at 2048), int8 products run kernels.qmatmul_bf16: the int8 codes are read,
# dequantized and rounded to bf16 in registers, with float32 sums (what the bf16 GEMM computes, without its bf16 copy
# of W and without rounding the output); beyond, the bf16 GEMM. Measured on the 270M with weights read from memory
# (bench/kernels.py, bench/RESULTS.md), bf16 GEMM time / qmatmul_bf16 time at 16 rows: LM head 1.35x, q+k+v 1.34x,
# gate+up 1.16x, attn_output 0.95x, ffn_down 0.77x; at 32 rows the GEMM wins but for k/v.
BF16_DOT_MAX_ELEMENTS = 16384
# ... and every product of at most this many rows (the engine's batched decode), whatever its width: in the engine
# (kernels on their own thread pool, torch's GEMMs on OpenMP) ffn_down at 16 rows measured ~5% faster per decode step
# than the bf16 GEMM, and the whole step can then run as one compiled call (GemmaModel.hidden_decode_stack).
BF16_DOT_MAX_ROWS = 16
# LM-head rows above which the head is computed in float32 from dequantized tiles of this many vocabulary rows (no
# bf16 copy of the 262k x hidden head is kept: only Model.forward-style scoring of every position gets there).
HEAD_TILE_ROWS = 16384
# Rows from which the engine finds greedy tokens with Linear.greedy (int8 activations, exact tokens) rather than the
# exact kernel's logits (the same tokens): bench/head.py on the 270M, q8_head time / qmatmul time over four runs at
# 1, 2, 4, 5, 6 and 8 rows: 1.0-1.8x, 1.5x, 0.8-1.3x, 0.85-1.0x, 0.6x, 0.5-0.7x (the head streams its codes either
# way; below ~5 rows the exact kernel's simpler loop streams them as fast or faster).
GREEDY_HEAD_MIN_ROWS = 5
# On AVX2 (no AVX-512) q8_head is faster than the exact kernel from one row: /tmp script on a 2-core Zen 3, the 270M's
# head, ms, exact / q8_head (medians of 5, two builds): 1 row 18.3-18.9 / 13.0-14.2, 2 rows 16.5-23.8 / 13.8-14.4, 5
# rows 34-38 / 16-19, 16 rows 81-87 (qmatmul_wide 67-75) / 39-45. Its 8-lane vpmaddubsw does 32 products per two
# multiplies where the exact kernel's FMAs do 16.
AVX2_GREEDY_HEAD_MIN_ROWS = 1
# Above QMATMUL_MAX_ROWS and up to this many rows, the layers' int8 products run kernels.qmatmul_i16 where it runs
# (AVX512-VNNI): int16 activations with one scale per row and the codes as integers, ~1e-4 relative error against
# ~3e-3 for the bf16 paths. On the 270M's 72 layer products (weights from memory), bf16 GEMM time / qmatmul_i16 time:
# 16 rows 1.62x, 32 1.28x, 64 1.09x, 128 0.86x, 512 0.70x; qmatmul_bf16 / qmatmul_i16 at 9 and 16 rows 1.1-1.4x.
I16_MAX_ROWS = 64
# Where no many-row kernel runs (qmatmul_i16 needs AVX512-VNNI, qmatmul_bf16 AVX512-BF16, qmatmul_wide AVX2 without
# AVX-512: a build for another CPU), the exact kernel takes the layers' products and the engine's batched head up to
# this many rows (see exact_max_rows).
EXACT_WIDE_MAX_ROWS = 64
# On AVX2 without AVX-512, products of more than QMATMUL_MAX_ROWS rows run kernels.qmatmul_wide: the engine's batched
# decode, chunks, prompts. Measured on a 2-core Zen 3 (/tmp script, medians of 5, a noisy machine), ms, the 270M's
# shapes [N x K], qmatmul / qmatmul_wide: 2048x640 at 16 rows 1.04-1.15 / 0.52-0.68, 640x2048 at 16 rows 0.96-1.11 /
# 0.50-0.58, the head's 65536x640 quarter at 16 rows 21.7-23.3 / 17.2-17.6 and 64 rows 78-93 / 41-53; at 8 rows qmatmul
# is faster (0.52-0.59 / 0.77-0.86). Beyond 16 rows the kernel runs as a GEMM (panels of x and of W, see qmatmul.cpp):
# the layers' four products at 294 rows 113-126 GFLOP/s each, the whole prefill forward of 16 sessions' prompts
# 3.9 -> 2.5 ms per row against float32 tiles (torch's GEMM over dequantized W, below).
# Without native bf16 (kernels.native_bf16) and without qmatmul_wide (an AVX-512 build with no BF16), products of
# more rows (prefill) run float32 GEMMs over dequantized tiles of this many output rows instead of the bf16 copy (no
# copy kept). On a 2-core Zen 3 at 512 rows, GFLOP/s: float32 tiles 42-68, the bf16 GEMM 8-11, the exact kernel
# 18-26 (/tmp script, a noisy machine).
LAYER_TILE_ROWS = 512
_PACK_LOCK = threading.Lock()  # Linear.prepare_greedy / prepare_i16: one packing each, whichever thread asks first


def greedy_head_min_rows() -> int:
    """Rows from which the engine's greedy rows take their tokens from ``Linear.greedy`` (see
    ``GREEDY_HEAD_MIN_ROWS`` and ``AVX2_GREEDY_HEAD_MIN_ROWS``)."""
    return AVX2_GREEDY_HEAD_MIN_ROWS if kernels.wide_available() else GREEDY_HEAD_MIN_ROWS


def approx_head_logits() -> bool:
    """Whether sampled rows among more than ``exact_max_rows()`` take ``Linear.greedy``'s approximate logits: with
    AVX512-VNNI's 8-bit activations (~3e-4 nats KL from the exact softmax on the 270M). Not on AVX2, whose 7-bit ones
    measured ~1.8e-3 mean and 7e-3 max on 32 of the 270M's hidden states: sampled rows keep the product's logits."""
    return not kernels.wide_available()


def exact_max_rows() -> int:
    """Rows up to which the int8 layers' products (and the engine's batched LM head) run the exact kernel:
    ``QMATMUL_MAX_ROWS`` where a many-row kernel (``qmatmul_i16``, ``qmatmul_bf16`` or on AVX2 ``qmatmul_wide``)
    takes the rows above; else ``EXACT_WIDE_MAX_ROWS``, where the exact kernel is the fastest product of 9-64 rows
    and a batched decode step then gives every row the bits it gets alone."""
    if kernels.i16_available() or kernels.bf16_dot_available() or kernels.wide_available():
        return QMATMUL_MAX_ROWS
    return EXACT_WIDE_MAX_ROWS


class Linear(nn.Module):
    """A bias-free projection whose weight is float32, bfloat16, or grouped int8 (``weight_format="int8"``).

    Grouped int8 holds ``W[n, k] = scales[n, k // G] * codes[n, k] + offsets[n, k // G]`` (models/quant.py): int8
    codes, float32 scales per group of G = 32 (16 for Q6_K) inputs, and float32 offsets for Q4_K/Q4_1/Q5_*. GGUF
    block types are converted EXACTLY (the weight equals the float32 mode's dequantization); float weights are
    quantized symmetric int8 per 32 (lossy). Paths:

    - ``N <= QMATMUL_MAX_ROWS`` rows (decode; ``HEAD_QMATMUL_MAX_ROWS`` for the head): ``kernels.qmatmul``,
      float32 activations and accumulation;
    - up to ``I16_MAX_ROWS`` rows where the kernel has AVX512-VNNI (batched decode, short chunks; not the head):
      ``kernels.qmatmul_i16``, x rounded to int16 per row, the codes as integers, on a second layout of the codes
      (112 MB on the 270M, made on first need; the engine makes it at start); with AMX-INT8 on the tile unit's
      layout, the same bits (``kernels.amx_available``);
    - else up to ``BF16_DOT_MAX_ELEMENTS`` inputs: ``kernels.qmatmul_bf16``, inputs and weights rounded to bf16,
      float32 sums and output, reading the int8 codes;
    - more rows (prefill): a bf16 GEMM on a bf16 copy of W made on first need (inputs, weights and outputs
      rounded to bf16: torch has no bf16 x bf16 -> float32 GEMM on CPU);
    - ``head=True`` (the tied LM head) with more rows: float32 products over dequantized tiles (no bf16 copy);
    - the engine's batched decode of the head (``forward_batch``) above ``QMATMUL_MAX_ROWS`` rows: as the layers
      (``qmatmul_bf16``, then the bf16 GEMM), for throughput at many concurrent sessions;
    - the engine's greedy rows from ``greedy_head_min_rows()`` rows (``greedy``): the exact argmax through int8
      activations and an error bound (``kernels.q8_head``, AVX512-VNNI or AVX2), no logits;
    - on AVX2 without AVX-512, products of more rows (layers, head, ``forward_batch``, prompts):
      ``kernels.qmatmul_wide``, float32 activations, weights and sums, a row's bits independent of the batch;
    - on a CPU with no many-row kernel: the exact kernel up to ``EXACT_WIDE_MAX_ROWS`` rows (layers and
      ``forward_batch``), and without native bf16 float32 products over dequantized tiles in place of the bf16 GEMM
      (see ``exact_max_rows`` and ``kernels.native_bf16``).

    NOTE: prefill measured on the 270M (top-1 agreement with float32 over 640 tokens / prefill speed): bf16 GEMM
    0.988 / 1.0; the same with ffn_down's input split into hi + lo bf16 halves (one GEMM over twice the rows, ~16
    bits of input kept) 0.991 / 0.8-0.88; a float32 GEMM would be exact but runs at ~0.45 (below llama.cpp). The plain
    bf16 GEMM keeps the 98% agreement target with a margin and the 1.5x prefill target with one; the split did not.
    When the kernel cannot be built (no compiler), every path uses the bf16 copy: slower and less exact.

    Example::

        lin = Linear(quant.quantize_symmetric(w), "int8")   # or a QuantWeight from quant.from_gguf
        y = lin(x)                                           # x: [N, in] float32 -> [N, out] float32
    """

    def __init__(self, weight: torch.Tensor | quant.QuantWeight, weight_format: str, *, head: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.int8 = weight_format == "int8"
        self.head = head
        self._i16_shape_ok: bool | None = None  # i16_rows' fixed part, on first ask
        self._wide_ok: bool | None = None  # wide_rows' fixed part, on first ask
        self.register_buffer("weight", None)
        if self.int8:
            qw = weight if isinstance(weight, quant.QuantWeight) else quant.quantize_symmetric(weight)
            self.register_buffer("codes", qw.codes)
            self.register_buffer("scales", qw.scales)
            self.register_buffer("offsets", qw.offsets)
            self.group = qw.group
            self.bf16: torch.Tensor | None = None  # the prefill copy, made on first need
            self._q8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # greedy()'s layout, on first need
            self._i16: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # qmatmul_i16's, on first need
        else:
            if isinstance(weight, quant.QuantWeight):
                weight = weight.dequantize()
            self.register_buffer("weight", weight.to(torch.bfloat16 if weight_format == "bfloat16" else torch.float32))

    @property
    def max_kernel_rows(self) -> int:
        """Rows up to which ``forward`` runs the exact kernel (see ``exact_max_rows``)."""
        if self.head and not self.wide_rows(exact_max_rows() + 1):
            return max(HEAD_QMATMUL_MAX_ROWS, exact_max_rows())
        return exact_max_rows()

    @property
    def quant_weight(self) -> quant.QuantWeight:
        return quant.QuantWeight(codes=self.codes, scales=self.scales, offsets=self.offsets, group=self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, in] -> [N, out], same dtype as x
        if not self.int8:
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        op = kernels.kernel()
        if op is not None and x.shape[0] <= self.max_kernel_rows and x.dtype == torch.float32:
            return op(x, self.codes, self.scales, self.offsets, self.group)  # decode: the one hot call, kept bare
        if op is not None and x.shape[0] <= self.max_kernel_rows:
            return op(x.float(), self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if self.wide_rows(x.shape[0]):
            return kernels.qmatmul_wide(x, self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if self.i16_rows(x.shape[0]):
            return kernels.qmatmul_i16(x, self.prepare_i16(), self.group).to(x.dtype)
        if not self.head and self._bf16_dot_rows(x.shape[0]):
            return kernels.qmatmul_bf16(x, self.codes, self.scales, self.offsets, self.group).to(x.dtype)
        if self.head and op is not None:
            return self._float32_tiles(x.float()).to(x.dtype)
        if op is not None and not kernels.native_bf16():  # float32 beats a software bf16 GEMM ~5x
            return self._float32_tiles(x.float(), LAYER_TILE_ROWS).to(x.dtype)
        return self._bf16_gemm(x)

    def forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The engine's batched decode (the LM head). Up to ``exact_max_rows()`` rows the exact kernel, so a step of
        a few decode rows (8; 64 on a CPU with no many-row kernel) is exact as alone; up to
        ``BF16_DOT_MAX_ELEMENTS`` inputs ``kernels.qmatmul_bf16`` (bf16 inputs and weights, float32 sums and
        output, reading the int8 codes); beyond,
        a bf16 GEMM on a bf16 copy of the weight (335 MB for the 270M's head, made on the first such batch), or
        without native bf16 float32 over dequantized tiles; on AVX2 ``kernels.qmatmul_wide`` beyond the exact rows."""
        if not self.int8 or x.shape[0] <= exact_max_rows() or self.wide_rows(x.shape[0]):
            return self(x)
        if x.numel() <= BF16_DOT_MAX_ELEMENTS and self._bf16_dot():
            return kernels.qmatmul_bf16(x, self.codes, self.scales, self.offsets, self.group)
        if kernels.kernel() is not None and not kernels.native_bf16():
            return self._float32_tiles(x.float()).to(x.dtype)
        return self._bf16_gemm(x)

    def _bf16_dot(self) -> bool:
        return kernels.bf16_dot_available() and self.in_features % 32 == 0 and self.group % 16 == 0

    def greedy_ready(self) -> bool:
        """Whether :meth:`greedy` runs: an int8 head on the CPU with groups of 32 and no offsets (Q8_0 or
        symmetric), a vocabulary that is a multiple of 16, and the compiled kernel with AVX512-VNNI or AVX2."""
        return (self.int8 and self.head and self.group == 32 and self.offsets is None and self.out_features % 16 == 0
                and self.in_features % 32 == 0 and self.codes.device.type == "cpu" and kernels.q8_head_available())

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
        """Whether ``forward`` of this many rows runs ``kernels.qmatmul_wide`` (more rows than the exact kernel
        takes; a group that is a multiple of 8; the kernel built for AVX2 without AVX-512)."""
        if rows <= QMATMUL_MAX_ROWS:
            return False
        if self._wide_ok is None:
            self._wide_ok = bool(self.int8 and self.group % 8 == 0 and self.codes.device.type == "cpu"
                                 and kernels.wide_available())
        return self._wide_ok

    def i16_rows(self, rows: int) -> bool:
        """Whether ``forward`` of this many rows runs ``kernels.qmatmul_i16`` (a layer, not the head; more rows than
        the exact kernel takes, at most ``I16_MAX_ROWS``; N % 16 == 0, an even group; the kernel with VNNI)."""
        if not QMATMUL_MAX_ROWS < rows <= I16_MAX_ROWS:
            return False
        if self._i16_shape_ok is None:  # asked ~130 times a step: the fixed part once
            self._i16_shape_ok = bool(self.int8 and not self.head and self.out_features % 16 == 0
                                      and self.group % 2 == 0 and self.group <= 512
                                      and self.codes.device.type == "cpu")
        return self._i16_shape_ok and kernels.i16_available()

    def prepare_i16(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qmatmul_i16's layout of the weights (a second copy of the codes, scales and offsets), made on first need
        (the engine makes it at start) whatever the thread."""
        packed = self._i16
        if packed is None:
            with _PACK_LOCK:
                if self._i16 is None:
                    self._i16 = kernels.i16_pack(self.codes, self.scales, self.offsets, self.group)
                packed = self._i16
        return packed

    def _bf16_dot_rows(self, rows: int) -> bool:
        """Whether a product of this many rows (above the exact kernel's) runs kernels.qmatmul_bf16."""
        small = rows * self.in_features <= BF16_DOT_MAX_ELEMENTS or rows <= BF16_DOT_MAX_ROWS
        return small and self._bf16_dot()

    def _bf16_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return self.bf16_gemm(x).to(x.dtype)

    def bf16_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows: a bf16 GEMM on a bf16 copy of W, made on first need; bf16 out."""
        if self.bf16 is None:
            self.bf16 = self.quant_weight.dequantize().to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), self.bf16)

    def uses_bf16_gemm(self, rows: int) -> bool:
        """Whether ``forward`` of this many rows runs the bf16 GEMM (an int8 layer's prefill path)."""
        if not self.int8 or self.head:
            return False
        if kernels.kernel() is None:
            return True
        return (rows > self.max_kernel_rows and not self.wide_rows(rows) and not self.i16_rows(rows)
                and not self._bf16_dot_rows(rows) and kernels.native_bf16())

    def _float32_tiles(self, x: torch.Tensor, tile: int = HEAD_TILE_ROWS) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for start in range(0, self.out_features, tile):
            end = min(start + tile, self.out_features)
            out[:, start:end] = F.linear(x, kernels.dequantize_rows(self.codes, self.scales, self.offsets, self.group,
                                                                    start, end))
        return out

    def dequantized(self) -> torch.Tensor:
        return self.quant_weight.dequantize() if self.int8 else self.weight.float()

    def weight_bytes(self) -> int:
        """Bytes of weight read per product on the decode path."""
        if not self.int8:
            return self.weight.numel() * self.weight.element_size()
        off = 0 if self.offsets is None else self.offsets.numel() * 4
        return self.codes.numel() + self.scales.numel() * 4 + off


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in float32, cast back.

    Gemma stores ``w`` as an offset from 1 (``Gemma3RMSNorm.forward``: ``output * (1.0 + self.weight.float())``;
    google/gemma_pytorch model.py RMSNorm). GGUF files hold ``1 + w`` (llama.cpp's converter adds the 1);
    weights.py subtracts it on load so this module always sees the Hugging Face convention.
    """

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("scale", 1.0 + weight.float())  # (1 + w), precomputed once
        self.eps = eps
        # fused (the int8 mode): one compiled pass instead of ~6 torch ops (rounding may differ in the last bit,
        # so the exact float32 and bfloat16 modes keep F.rms_norm)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the compiled pass (AVX-512) wins at every size: 55 us vs 1.1 ms for F.rms_norm on [510, 640]
        if self.fused and x.dtype == torch.float32 and x.device.type == "cpu":
            return kernels.rms_norm(x, self.scale, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


# ------------------------------------------------------------------------------------------------ attention


class KVBatch(Protocol):
    """What a layer needs from a KV cache for one forward step over N flattened tokens."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v ([N, Hkv, D]) for these tokens, attend q ([N, Hq, D]) over each token's visible keys."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              softcap: float | None) -> torch.Tensor:
    """Masked multi-query / grouped-query attention, eager (the transformers ``eager_attention_forward`` math).

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, L, D]; mask: bool [B, T, L], True where a query may see a key (None:
        all may).
    Returns:
        [B, Hq, T, D]
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not kernels.native_bf16():
        # no native bf16 (an AVX2 CPU): torch's bf16 matmuls convert in software, ~4x slower than float32
        return attention(q.float(), k.float(), v.float(), mask, scale, softcap).to(torch.bfloat16)
    b, hq, t, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g = hq // hkv
    # GQA/MQA: query head h uses kv head h // g (transformers' repeat_kv repeats each kv head g times in a row),
    # so folding the g query heads of one kv head into the row axis needs no copy of K or V.
    q = q.reshape(b, hkv, g * t, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, g*T, L]
    if softcap is not None:  # Gemma 2 attention logit soft-capping: cap * tanh(s / cap) (modeling_gemma2.py)
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # None: every key is visible to every query (a decode step of a dense cache)
        m = mask[:, None, None].expand(b, 1, g, t, kv_len).reshape(b, 1, g * t, kv_len)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # softmax upcast to float32, as transformers does
    return torch.matmul(probs, v).reshape(b, hq, t, d)


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [Tq, Tk]: causal, and for sliding layers only keys with ``k > q - window``.

    transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window`` (the query sees itself and the
    window - 1 tokens before it).
    """
    m = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        m &= k_pos[None, :] > q_pos[:, None] - window
    return m


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Gemma uses the "rotate half" (GPT-NeoX) RoPE layout; GGUF Gemma weights are not permuted (unlike Llama).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ROPE_BLOCK = 256  # positions per computed block of the RoPE tables (Rope._half_tables)


class Rope:
    """Cos/sin tables per layer kind. Gemma 3: base 10k on sliding layers, 1M on global ones, and linear scaling
    (x8) on global layers of 4B and up (``Gemma3RotaryEmbedding`` with per-layer-type ``rope_parameters``)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        d = config.head_dim
        self.inv_freq: dict[tuple[float, float], torch.Tensor] = {}
        self.layer_key = []
        for i in range(config.num_layers):
            key = (config.rope_theta(i), config.rope_scaling(i))
            if key not in self.inv_freq:
                theta, factor = key
                inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
                self.inv_freq[key] = (inv / factor).to(device)  # linear scaling divides the frequencies
            self.layer_key.append(key)
        self._tables: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = {}
        self._grow = threading.Lock()

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{key: (cos, signed sin)}, each [N, 1, D], computed in float32 then cast (as transformers does).

        The sin table carries rotate_half's sign: ``rotate_half(x) * sin == roll(x, D/2) * cat(-sin1, sin2)`` bit
        for bit (negation is exact), so :func:`apply_rope` needs one roll instead of chunk, neg and cat.
        """
        top = int(positions.max()) + 1 if positions.numel() else 0
        out = {}
        for key in self.inv_freq:
            cos_half, sin_half = self._half_tables(key, top)
            cos, sin = cos_half[positions], sin_half[positions]
            out[key] = (torch.cat((cos, cos), dim=-1).to(dtype)[:, None, :],
                        torch.cat((-sin, sin), dim=-1).to(dtype)[:, None, :])
        return out

    def _half_tables(self, key, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``position * inv_freq`` ([P, D/2] float32) for positions [0, P), P >= top.

        Kept and grown ROPE_BLOCK positions at a time, each block by one call: a position's value never depends on
        which step asked for it, and a decode step does no trig. (torch's float32 sin/cos go to MKL's vector math,
        which starts an OpenMP region even for one position; its worker then spins ~5 ms into the step's kernels.)
        Memory: D x 4 bytes per position per key (64 MB for the 270M's 32k context with both kinds).
        """
        tabs = self._tables.get(key)
        if tabs is not None and tabs[0].shape[0] >= top:
            return tabs
        with self._grow:
            tabs = self._tables.get(key)
            have = 0 if tabs is None else tabs[0].shape[0]
            if have >= top:
                return tabs
            want = max(top, 2 * have)
            blocks = []
            for start in range(have, want, ROPE_BLOCK):
                freqs = torch.arange(start, start + ROPE_BLOCK, device=self.inv_freq[key].device).float()[:, None] \
                    * self.inv_freq[key][None, :]
                blocks.append((freqs.cos(), freqs.sin()))
            new = (torch.cat(([tabs[0]] if tabs else []) + [c for c, _ in blocks]),
                   torch.cat(([tabs[1]] if tabs else []) + [s for _, s in blocks]))
            self._tables[key] = new
            return new


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * (-1 | +1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin  # x: [N, H, D]; tables: [N, 1, D]


# ------------------------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v share one fused matrix product: one weight read, one kernel launch per layer.
        self.qkv = Linear(cat_rows([w["q_proj"], w["k_proj"], w["v_proj"]]), fmt)
        self.o_proj = Linear(w["o_proj"], fmt)
        fused = fmt == "int8"
        self.q_norm = RMSNorm(w["q_norm"], config.rms_norm_eps, fused) if config.has_qk_norm else None
        self.k_norm = RMSNorm(w["k_norm"], config.rms_norm_eps, fused) if config.has_qk_norm else None
        # Scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5 (Gemma 2/3 config); Gemma 1
        # uses head_dim ** -0.5 (config.py sets query_pre_attn_scalar = head_dim for it).
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.fused, self.eps = fused, config.rms_norm_eps

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: KVBatch) -> torch.Tensor:
        n = x.shape[0]  # x: [N, hidden]
        if self.fused and x.device.type == "cpu" and kernels.available():  # split, q/k norms, RoPE in one pass
            qs, ks = (self.q_norm.scale, self.k_norm.scale) if self.q_norm is not None else (None, None)
            q, k, v = kernels.qk_norm_rope(self.qkv(x), qs, ks, rope[0].view(n, self.d), rope[1].view(n, self.d),
                                           self.hq, self.hkv, self.eps)
            return self.o_proj(kv.attend(self.layer, q, k, v).reshape(n, self.hq * self.d))
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k, v = q.view(n, self.hq, self.d), k.view(n, self.hkv, self.d), v.view(n, self.hkv, self.d)
        if self.q_norm is not None:  # Gemma 3: RMSNorm over head_dim on q and k, before RoPE (Gemma3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = kv.attend(self.layer, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.inter = w["gate_proj"].shape[0]
        self.gate_up = Linear(cat_rows([w["gate_proj"], w["up_proj"]]), fmt)  # fused, like qkv
        self.down_proj = Linear(w["down_proj"], fmt)
        self.fused = fmt == "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeGLU with the tanh approximation of GELU (hidden_activation="gelu_pytorch_tanh" in every Gemma).
        if self.gate_up.uses_bf16_gemm(x.shape[0]) and kernels.available():
            # prefill in the fast mode: both products are bf16 GEMMs; the activation reads the first's bf16 output
            # and writes the second's bf16 input in one compiled pass (values as converting to float32, F.gelu and
            # the product, then rounding once; no [N, inter] float32 temporaries)
            return self.down_proj.bf16_gemm(kernels.geglu(self.gate_up.bf16_gemm(x))).to(x.dtype)
        if self.fused and x.device.type == "cpu" and kernels.available():  # the activation in one pass too
            return self.down_proj(kernels.geglu(self.gate_up(x)))
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        eps, fused = config.rms_norm_eps, fmt == "int8"
        self.attn = Attention(config, layer, w, fmt)
        self.mlp = MLP(w, fmt)
        self.input_norm = RMSNorm(w["input_layernorm"], eps, fused)
        if config.has_post_norms:
            # Gemma 2/3: four norms per layer, "sandwiching" both attention and MLP (Gemma2DecoderLayer).
            self.post_attn_norm = RMSNorm(w["post_attention_layernorm"], eps, fused)
            self.pre_mlp_norm = RMSNorm(w["pre_feedforward_layernorm"], eps, fused)
            self.post_mlp_norm = RMSNorm(w["post_feedforward_layernorm"], eps, fused)
        else:
            # Gemma 1: two norms; its pre-MLP norm is named post_attention_layernorm in transformers.
            self.post_attn_norm = None
            self.pre_mlp_norm = RMSNorm(w["post_attention_layernorm"], eps, fused)
            self.post_mlp_norm = None

    def forward(self, x: torch.Tensor, rope: tuple, kv: KVBatch) -> torch.Tensor:
        h = self.attn(self.input_norm(x), rope, kv)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class GemmaModel(nn.Module):
    """The decoder stack. Build with :func:`GemmaModel.from_tensors`; run with :meth:`hidden` and :meth:`logits`.

    Example::

        kv = DenseKV(model, max_len=64)
        h = model.hidden(ids, torch.arange(len(ids)), kv)    # [T, hidden]
        logits = model.logits(h[-1:])                         # [1, vocab]
    """

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], weight_format: str,
                 device: torch.device):
        super().__init__()
        self.config = config
        self.weight_format = weight_format
        # Compute dtype: bfloat16 in the bf16 mode; float32 otherwise (the int8 mode keeps the residual stream in
        # float32; its decode products take float32 input, its prefill GEMMs bf16, see Linear).
        self.dtype = torch.bfloat16 if weight_format == "bfloat16" else torch.float32
        self.device = device
        self.embed = Linear(tensors["embed_tokens"], weight_format, head=True)  # tied: also the LM head
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, _layer_tensors(tensors, i), weight_format) for i in range(config.num_layers))
        self.norm = RMSNorm(tensors["norm"], config.rms_norm_eps, weight_format == "int8")
        self.rope = Rope(config, device)
        # Embeddings are scaled by sqrt(hidden_size), the scale cast to the compute dtype first
        # (Gemma3TextScaledWordEmbedding: ``embed_scale.to(self.weight.dtype)``; gemma_pytorch "normalizer").
        self.embed_scale = torch.tensor(math.sqrt(config.hidden_size), dtype=self.dtype, device=device)
        self._stack: tuple | None = None  # hidden_decode_stack's per-layer tensors, gathered on first use
        self._stack_wide: list | None = None  # ... and the products' qmatmul_i16 layouts
        self._product_list: list | None = None  # every layer's four products, in order (a plain list, not modules)
        self._i16_all: bool | None = None  # whether every product can run qmatmul_i16 (_stack_i16)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [N] -> [N, hidden]
        e = self.embed
        rows = quant.dequantize_rows(e.quant_weight, ids) if e.int8 else e.weight[ids]
        return rows.to(self.dtype) * self.embed_scale

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVBatch) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] for N flattened tokens at the given absolute positions."""
        x = self.embed_tokens(ids)
        tables = self.rope.tables(positions, self.dtype)
        if self.weight_format == "int8" and x.device.type == "cpu" and kernels.available():
            return self._hidden_fused(x, tables, kv)
        for layer in self.layers:
            x = layer(x, tables[self.rope.layer_key[layer.attn.layer]], kv)
        return self.norm(x)

    def _hidden_fused(self, x: torch.Tensor, tables: dict, kv: KVBatch) -> torch.Tensor:
        """The fast mode's layer loop: each residual step (add the normed branch, then the next norm, which is the
        next layer's input norm or the final norm) is one compiled pass (``kernels.add_rms_norm``). The same math as
        ``DecoderLayer.forward``, in ~8 ops per layer instead of ~35 (fewer dispatches and temporaries per step)."""
        eps, layers = self.config.rms_norm_eps, self.layers
        h = layers[0].input_norm(x)
        for i, layer in enumerate(layers):
            a = layer.attn(h, tables[self.rope.layer_key[i]], kv)
            post = layer.post_attn_norm.scale if layer.post_attn_norm is not None else None
            x, h = kernels.add_rms_norm(x, a, post, layer.pre_mlp_norm.scale, eps)
            m = layer.mlp(h)
            post = layer.post_mlp_norm.scale if layer.post_mlp_norm is not None else None
            nxt = layers[i + 1].input_norm.scale if i + 1 < len(layers) else self.norm.scale
            x, h = kernels.add_rms_norm(x, m, post, nxt, eps)
        return h

    def can_decode_stack(self, rows: int) -> bool:
        """Whether :meth:`hidden_decode_stack` applies to a decode step of this many rows: the fast mode on the CPU
        with the compiled kernels, and every product of the step one of the stack's kernels, as ``Linear.forward``
        chooses them: ``qmatmul`` up to ``QMATMUL_MAX_ROWS`` rows, then ``qmatmul_i16`` for every product (up to
        ``I16_MAX_ROWS``) or ``qmatmul_bf16`` for every product (up to ``BF16_DOT_MAX_ROWS``)."""
        if not (self.weight_format == "int8" and self.device.type == "cpu" and kernels.available()):
            return False
        if rows <= exact_max_rows() or all(li.wide_rows(rows) for li in self._products()):
            return True
        return self._stack_i16(rows) or (rows <= BF16_DOT_MAX_ROWS and all(
            li._bf16_dot_rows(rows) and not li.i16_rows(rows) for li in self._products()))

    def _products(self) -> list[Linear]:
        if self._product_list is None:
            self._product_list = [li for layer in self.layers for li in (
                layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]
        return self._product_list

    def _stack_i16(self, rows: int) -> bool:
        if not (QMATMUL_MAX_ROWS < rows <= I16_MAX_ROWS and kernels.i16_available()):
            return False
        if self._i16_all is None:  # every product can (fixed per model)
            self._i16_all = all(li.i16_rows(rows) for li in self._products())
        return self._i16_all

    def prepare_i16(self) -> None:
        """Make every layer product's ``qmatmul_i16`` layout now (the engine calls it at start, so the first
        batched step does not pay for it)."""
        for li in self._products():
            if li.i16_rows(QMATMUL_MAX_ROWS + 1):
                li.prepare_i16()

    def hidden_decode_stack(self, ids: torch.Tensor, positions: torch.Tensor, stack_args: dict) -> torch.Tensor:
        """:meth:`hidden` for a decode step (see :meth:`can_decode_stack`) over the paged cache, every layer in
        one compiled call (``kernels.decode_stack``; the engine's ``PagedBatch.stack_args`` gives the cache's part).
        The same kernels in the same order as :meth:`_hidden_fused`, so the same bits, without ~200 Python-level
        calls per step (~3 ms of a ~22 ms single-stream step on the 270M)."""
        x = self.embed_tokens(ids)
        tables = self.rope.tables(positions, self.dtype)
        n, d = x.shape[0], self.config.head_dim
        cos = [tables[k][0].view(n, d) for k in self.rope.layer_key]
        sin = [tables[k][1].view(n, d) for k in self.rope.layer_key]
        if self._stack is None:  # the per-layer tensors, gathered once
            empty = torch.empty(0, device=self.device)
            lin, groups, norms = [], [], []
            for layer in self.layers:
                for li in (layer.attn.qkv, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj):
                    lin += [li.codes, li.scales, li.offsets if li.offsets is not None else empty]
                    groups.append(li.group)
                norms += [m.scale if m is not None else empty for m in (
                    layer.input_norm, layer.post_attn_norm, layer.pre_mlp_norm, layer.post_mlp_norm,
                    layer.attn.q_norm, layer.attn.k_norm)]
            self._stack = (lin, groups, norms)
        lin, groups, norms = self._stack
        wide = []
        if self._stack_i16(n):  # the products' qmatmul_i16 layouts (see can_decode_stack)
            if self._stack_wide is None:
                self._stack_wide = [t for li in self._products() for t in li.prepare_i16()]
            wide = self._stack_wide
        a = self.layers[0].attn
        return kernels.decode_stack(x, lin, wide, groups, norms, self.norm.scale, cos, sin, hq=a.hq, hkv=a.hkv,
                                    eps=self.config.rms_norm_eps, exact_rows=exact_max_rows(), **stack_args)

    def new_sequence(self, max_len: int) -> DenseKV:
        """The state one sequence needs for :meth:`step` (a dense KV cache of ``max_len`` tokens)."""
        return DenseKV(self, max_len)

    def step(self, ids: torch.Tensor, kv: DenseKV, last_only: bool = False) -> torch.Tensor:
        """Run new tokens of one sequence; float32 logits for each (or only the last) of them."""
        h = self._advance(ids, kv)
        return self.logits(h[-1:] if last_only else h)

    def _advance(self, ids: torch.Tensor, kv: DenseKV) -> torch.Tensor:
        """The final hidden states of new tokens of one sequence, their K/V written and the sequence advanced."""
        h = self.hidden(ids, torch.arange(kv.length, kv.length + ids.numel(), device=ids.device), kv)
        kv.advance(ids.numel())
        return h

    def step_greedy(self, ids: torch.Tensor, kv: DenseKV) -> int:
        """:meth:`step` then the greedy token of the last position: ``argmax(step(ids, kv, last_only=True)[0])``,
        found by :meth:`greedy_head` where it serves a single row (``greedy_head_min_rows() == 1``: AVX2), which
        gives that very token without the full logits; else from the logits."""
        h = self._advance(ids, kv)
        if greedy_head_min_rows() <= 1 and self.can_greedy_head():
            token = int(self.greedy_head(h[-1:], want_logits=False)[0][0])
            if token >= 0:  # else non-finite values: torch's argmax decides, as before
                return token
        return int(kernels.argmax(self.logits(h[-1:])[0]))

    def can_greedy_head(self) -> bool:
        """Whether :meth:`greedy_head` runs (the int8 head on a CPU with AVX512-VNNI or AVX2; not under a final
        soft-cap, whose float32 tanh can tie logits that differ before it)."""
        return self.config.final_logit_softcapping is None and self.embed.greedy_ready()

    def greedy_head(self, h: torch.Tensor, want_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[N, hidden] -> (the exact greedy token per row, as ``logits(h[i:i+1]).argmax()`` gives it; -1 where h is
        not finite; approximate logits [N, vocab] when ``want_logits``). See ``Linear.greedy``."""
        return self.embed.greedy(h.float(), want_logits)

    def logits(self, h: torch.Tensor, batch: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], through the tied embedding. ``batch``: the engine's decode rows
        (see ``Linear.forward_batch``); otherwise scoring keeps the exact paths."""
        out = (self.embed.forward_batch(h) if batch else self.embed(h)).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma 2: final logits soft-capped at 30 (Gemma2ForCausalLM.forward)
            out = torch.tanh(out / cap) * cap
        return out


def cat_rows(ws: list) -> torch.Tensor | quant.QuantWeight:
    """Stack projection weights along their output dimension (float tensors or grouped int8 alike)."""
    if all(isinstance(w, quant.QuantWeight) for w in ws):
        return quant.cat_rows(ws)
    return torch.cat([w.dequantize() if isinstance(w, quant.QuantWeight) else w for w in ws])


def _layer_tensors(t: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"layers.{i}."
    out = {}
    for name, value in t.items():
        if name.startswith(prefix):
            key = name[len(prefix):].split(".")[-1]  # e.g. "self_attn.q_proj" -> "q_proj"
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ dense KV


# Queries per attention block of a long prompt in DenseKV: the engine's default prefill chunk (max_batched_tokens).
PREFILL_BLOCK = 512


class DenseKV:
    """A contiguous KV cache for ONE sequence (every layer keeps every token; masks apply the windows).

    Used by ``Model.forward`` and ``generate``; the engine uses the paged cache instead. ``attend`` writes the
    new tokens at ``[length, length + T)``; call :meth:`advance` after each forward.
    """

    def __init__(self, model: GemmaModel, max_len: int, kv_dtype: torch.dtype | None = None):
        c = model.config
        # The engine's rule: KV in bf16 unless the model runs in exact float32.
        dt = kv_dtype or (torch.float32 if model.weight_format == "float32" else torch.bfloat16)
        self.k = [torch.zeros(c.num_kv_heads, max_len, c.head_dim, dtype=dt, device=model.device)
                  for _ in range(c.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.windows = [c.sliding_window if t == SLIDING else None for t in c.layer_types]
        self.scale_softcap = (model.layers[0].attn.scale, c.attn_logit_softcapping)
        self.length = 0
        self.max_len = max_len
        self._masks: dict[tuple, torch.Tensor] = {}
        self._arange: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"DenseKV holds {self.max_len} tokens; {end} requested")
        self.k[layer][:, start:end] = k.transpose(0, 1)
        self.v[layer][:, start:end] = v.transpose(0, 1)
        window = self.windows[layer]
        lo = 0 if window is None else max(0, start - window + 1)  # keys no query of this step can see are skipped
        if t == 1:  # a decode step: the same kernel as the engine's decode rows (keys read in place, float32)
            start_len = torch.tensor([lo, end - lo])
            out = kernels.decode_attention(q.float(), self.k[layer].transpose(0, 1), self.v[layer].transpose(0, 1),
                                           self._positions(), start_len[:1], start_len[1:], 1, 1, *self.scale_softcap)
            if out is not None:
                return out.to(q.dtype)
        # One query (a decode step) sees every key in [lo, end): causal, and lo is where its window starts.
        dt = q.dtype if t == 1 else self.k[layer].dtype  # a decode step in the query's dtype, as the engine's rows
        outs = []
        # A long prompt in blocks of PREFILL_BLOCK queries, as the engine's chunks: each block's keys end at its last
        # query and start at its own window (a 2,000-token prompt's sliding layers: ~2x fewer scores to compute).
        for b0 in range(0, t, PREFILL_BLOCK):
            b1 = min(t, b0 + PREFILL_BLOCK)
            blo = 0 if window is None else max(0, start + b0 - window + 1)  # lo for the first block
            mask = None if t == 1 else self._mask(start + b0, start + b1, blo, window)[None]
            keys, vals = self.k[layer][None, :, blo:start + b1], self.v[layer][None, :, blo:start + b1]
            out = attention(q[b0:b1].transpose(0, 1)[None].to(dt), keys.to(dt), vals.to(dt), mask,
                            *self.scale_softcap)
            outs.append(out[0].transpose(0, 1))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.dtype)  # [T, Hq, D]

    def _positions(self) -> torch.Tensor:  # [1, max_len]: the slot of each position (a one-row "block table")
        if self._arange is None:
            self._arange = torch.arange(self.max_len)[None]
        return self._arange

    def _mask(self, start: int, end: int, lo: int, window: int | None) -> torch.Tensor:
        key = (start, end, lo, window)
        m = self._masks.get(key)
        if m is None:
            dev = self.k[0].device
            m = visibility_mask(torch.arange(start, end, device=dev), torch.arange(lo, end, device=dev), window)
            self._masks = {key: m} if len(self._masks) > 64 else {**self._masks, key: m}
        return m

    def advance(self, t: int) -> None:
        self.length += t
