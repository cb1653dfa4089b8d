// The CPU kernels' one translation unit: every part, in order, then the ops' registration as torch.ops.<GS_NAMESPACE>.*
// (TORCH_LIBRARY, no pybind11). The parts, by concern:
//
//   common.h            headers, this build's instruction-set macros, row-block helpers
//   pool.h              the kernels' thread pool (par_for)
//   codes.h             how products read a weight row's codes: int8, or packed at 4-6 bits (unpack_codes)
//   products.h          qmatmul (the exact grouped-int8 product; qmatmul_packed on packed codes), dequantize
//   products_wide.h     qmatmul_wide (AVX2: the many-row float32 product; qmatmul_wide_packed)
//   products_batched.h  qmatmul_bf16 (AVX512-BF16), qmatmul_i16 (AVX512-VNNI; AMX tiles)
//   fused.h             rms_norm, add_rms_norm, geglu, qk_norm_rope, q_norm_rope
//   attention.h         decode_attention
//   head.h              argmax, q8_head (the exact greedy token through int8 activations)
//   stack.h             decode_stack (every layer of a decode step in one call, from a description of the layers)
//
// One translation unit, as one file was before: the same inlining, hence the same bits, and one compiler run.
//
// Built once per instruction-set variant with explicit flags (kernels/build.py: avx2 = x86-64-v3, avx512 = x86-64-v4,
// avx512_vnni, avx512_bf16, amx); each variant registers its ops under its own namespace (GS_NAMESPACE, e.g.
// gemma_sessions_avx2), so a process can hold several (the tests compare them) and loads only those its CPU runs.

#include "products.h"
#include "products_wide.h"
#include "products_batched.h"
#include "fused.h"
#include "attention.h"
#include "head.h"
#include "stack.h"

#ifndef GS_NAMESPACE
#define GS_NAMESPACE gemma_sessions
#endif
// TORCH_LIBRARY pastes its namespace argument (##): one more macro level expands GS_NAMESPACE first.
#define GS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GS_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

GS_LIBRARY(GS_NAMESPACE, m) {
  m.def("qmatmul(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor scale, float eps) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("decode_stack(Tensor x, Tensor[] weights, Tensor[] wide, Tensor[] norms, Tensor final_norm, Tensor spec, "
        "Tensor fspec, float eps, Tensor[] cos, Tensor[] sin, Tensor(a!)[] flats, int[] kv, Tensor[] write, "
        "Tensor[] table, Tensor[] start, Tensor[] lengths, int block, int[] page_stride, int exact_rows) -> Tensor");
  m.def("qmatmul_wide(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("qmatmul_packed(Tensor x, Tensor packed, int bits, int bias, Tensor scales, Tensor? offsets, int group) -> "
        "Tensor");
  m.def("qmatmul_wide_packed(Tensor x, Tensor packed, int bits, int bias, Tensor scales, Tensor? offsets, "
        "int group) -> Tensor");
  m.def("unpack_codes(Tensor packed, int bits, int bias, int k) -> Tensor");
  m.def("pack_codes(Tensor codes, int bits, int bias) -> Tensor");
  m.def("wide_available() -> bool", &wide_available);
  m.def("dequantize(Tensor codes, Tensor scales, Tensor? offsets, int group, int start, int end) -> Tensor");
  m.def("qmatmul_bf16(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("i16_available() -> bool", &i16_available);
  m.def("amx_available() -> bool", &amx_available);
  m.def("amx_group_ok(int group) -> bool", &amx_group_ok);
  m.def("i16_pack(Tensor codes, Tensor scales, Tensor? offsets, int group, bool quads=False) -> (Tensor, Tensor, Tensor)");
  m.def("qmatmul_i16(Tensor x, Tensor wq, Tensor sw, Tensor ow, int group) -> Tensor");
  m.def("bf16_dot_available() -> bool", &bf16_dot_available);
  m.def("geglu(Tensor gate_up) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor? s1, Tensor? s2, float eps) -> (Tensor, Tensor)");
  m.def("qk_norm_rope(Tensor qkv, Tensor? q_scale, Tensor? k_scale, Tensor cos, Tensor sin, int hq, int hkv, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("q_norm_rope(Tensor q, Tensor? q_scale, Tensor cos, Tensor sin, int hq, float eps) -> Tensor");
  m.def("q8_head_available() -> bool", &q8_head_available);
  m.def("q8_head_pack(Tensor codes, Tensor scales) -> (Tensor, Tensor, Tensor)");
  m.def("q8_head(Tensor x, Tensor wq, Tensor sw, Tensor aw, Tensor codes, Tensor scales, bool want_logits) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor start, Tensor lengths, int block, "
        "int page_stride, float scale, float softcap) -> Tensor");
}

GS_LIBRARY_IMPL(GS_NAMESPACE, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax", &argmax_rows);
  m.impl("decode_stack", &decode_stack);
  m.impl("decode_attention", &decode_attention);
  m.impl("qmatmul_wide", &qmatmul_wide);
  m.impl("qmatmul_packed", &qmatmul_packed);
  m.impl("qmatmul_wide_packed", &qmatmul_wide_packed);
  m.impl("unpack_codes", &unpack_codes);
  m.impl("pack_codes", &pack_codes);
  m.impl("dequantize", &dequantize);
  m.impl("qmatmul_bf16", &qmatmul_bf16);
  m.impl("i16_pack", &i16_pack);
  m.impl("qmatmul_i16", &qmatmul_i16);
  m.impl("geglu", &geglu);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("q_norm_rope", &q_norm_rope);
  m.impl("q8_head_pack", &q8_head_pack);
  m.impl("q8_head", &q8_head);
}
