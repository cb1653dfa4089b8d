// decode_stack: every decoder layer of a decode step in one call.
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products_wide.h"
#include "products_batched.h"
#include "fused.h"
#include "attention.h"

namespace {

// decode_stack: every decoder layer of a decode step (one new token per row, the paged KV cache) in one call: the
// same kernels, in the same order, as GemmaModel._hidden_fused with PagedBatch.attend (so the same bits): products
// of up to 8 rows run qmatmul, larger ones qmatmul_i16 (wide given) or qmatmul_bf16 (the caller checks that
// Linear.forward chooses them too),
// without ~200 Python-level calls per step. Absent tensors (no offsets, no post norms, no q/k norms) are passed as
// empty tensors. Per layer l (lin: 12 tensors, codes/scales/offsets of qkv, o, gate_up, down; groups: 4 ints;
// norms: 6 tensors, input/post_attn/pre_mlp/post_mlp/q/k): h = in_norm(x) ... returns the final-normed hidden.
static inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

at::Tensor decode_stack(const at::Tensor& x_in, at::TensorList lin, at::TensorList wide, at::IntArrayRef groups,
                        at::TensorList norms,
                        const at::Tensor& final_norm, at::TensorList cos, at::TensorList sin, const at::Tensor& flat,
                        at::IntArrayRef off_k, at::IntArrayRef off_v, at::IntArrayRef layer_group,
                        at::TensorList write, at::TensorList table, at::TensorList start, at::TensorList lengths,
                        int64_t block, int64_t page_stride, double scale, double softcap, int64_t hq, int64_t hkv,
                        double eps, int64_t exact_rows) {
  const int64_t L = static_cast<int64_t>(groups.size()) / 4;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(lin.size()) == 12 * L && static_cast<int64_t>(norms.size()) == 6 * L &&
                  static_cast<int64_t>(cos.size()) == L && static_cast<int64_t>(sin.size()) == L &&
                  static_cast<int64_t>(off_k.size()) == L && static_cast<int64_t>(off_v.size()) == L &&
                  static_cast<int64_t>(layer_group.size()) == L,
              "decode_stack: per-layer lists of inconsistent lengths");
  const int64_t M = x_in.size(0), S = flat.size(0);
  TORCH_CHECK(wide.empty() || static_cast<int64_t>(wide.size()) == 12 * L, "decode_stack: wide needs 12 per layer");
  TORCH_CHECK(M <= exact_rows || !wide.empty() || kBf16Dot || kWide, "decode_stack: ", M,
              " rows need qmatmul_i16's layout, qmatmul_bf16 or qmatmul_wide, which this build lacks");
  // a product of this step: qmatmul (exact) up to exact_rows rows, beyond qmatmul_i16 on its layout (wide: packed
  // codes, scales, offsets per product, i16_pack) when given, else qmatmul_wide (AVX2) or qmatmul_bf16
  const auto product = [&](const at::Tensor& x, const at::Tensor* w, const at::Tensor* p, int64_t G) {
    if (M <= exact_rows) return qmatmul(x, w[0], w[1], opt(w[2]), G);
    if (p != nullptr) return qmatmul_i16(x, p[0], p[1], p[2], G);
    return kWide ? qmatmul_wide(x, w[0], w[1], opt(w[2]), G) : qmatmul_bf16(x, w[0], w[1], opt(w[2]), G);
  };
  at::Tensor x = x_in.contiguous();
  at::Tensor h = rms_norm(x, norms[0], eps);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = lin.data() + 12 * l;
    const at::Tensor* pk = wide.empty() ? nullptr : wide.data() + 12 * l;
    const auto wp = [&](int j) { return pk == nullptr ? nullptr : pk + 3 * j; };
    const at::Tensor* nm = norms.data() + 6 * l;
    const int64_t g = layer_group[l];
    TORCH_CHECK(g >= 0 && g < static_cast<int64_t>(write.size()) && g < static_cast<int64_t>(table.size()),
                "decode_stack: bad layer group");
    at::Tensor qkv = product(h, w, wp(0), groups[4 * l]);
    auto qkv_split = qk_norm_rope(qkv, opt(nm[4]), opt(nm[5]), cos[l], sin[l], hq, hkv, eps);
    const at::Tensor& q = std::get<0>(qkv_split);
    flat.index_copy_(0, write[g] + off_k[l], std::get<1>(qkv_split).to(flat.scalar_type()));
    flat.index_copy_(0, write[g] + off_v[l], std::get<2>(qkv_split).to(flat.scalar_type()));
    at::Tensor att = decode_attention(q, flat.narrow(0, off_k[l], S - off_k[l]), flat.narrow(0, off_v[l], S - off_v[l]),
                                      table[g], start[g], lengths[g], block, page_stride, scale, softcap);
    at::Tensor a = product(att.reshape({M, -1}), w + 3, wp(1), groups[4 * l + 1]);
    auto r1 = add_rms_norm(x, a, opt(nm[1]), opt(nm[2]), eps);
    x = std::get<0>(r1);
    at::Tensor gu = product(std::get<1>(r1), w + 6, wp(2), groups[4 * l + 2]);
    at::Tensor m = product(geglu(gu), w + 9, wp(3), groups[4 * l + 3]);
    const at::Tensor& next = l + 1 < L ? norms[6 * (l + 1)] : final_norm;
    auto r2 = add_rms_norm(x, m, opt(nm[3]), next, eps);
    x = std::get<0>(r2);
    h = std::get<1>(r2);
  }
  return h;
}

}  // namespace
