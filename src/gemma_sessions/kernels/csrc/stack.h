// decode_stack: every decoder layer of a decode step in one call, from a description of the layers.
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products_wide.h"
#include "products_batched.h"
#include "fused.h"
#include "attention.h"

namespace {

// ---------------------------------------------------------------------------------------------------- description
// A model describes its layers once (kernels/stack.py, StackSpec, writes these tables; the two must agree, and the
// column counts are checked): per layer l, a row of int64 `spec` and a row of float64 `fspec`, 12 tensors of
// `weights` (codes, int8 or packed as the row says, scales, offsets of the products qkv, o, gate_up, down; empty
// offsets: none), 12 of `wide` when
// given (each product's qmatmul_i16 layout), and 6 of `norms` (the scales of the input, post-attention, pre-MLP,
// post-MLP, q and k norms; present where the flag says, else empty).
enum StackInt : int64_t {
  SI_FLAGS,      // StackFlag bits
  SI_HEADS,      // query heads
  SI_KV_HEADS,   // kv heads (a KV-shared layer: its source's)
  SI_HEAD_DIM,
  SI_KV_LAYER,   // the layer whose K/V it attends: itself (it writes them), or an earlier one (it writes none)
  SI_ROPE,       // index of its cos/sin table
  SI_ACT,        // StackAct
  SI_GROUP,      // 4 columns: group size of qkv, o, gate_up, down
  SI_BITS = SI_GROUP + 4,  // 4 columns: their codes' width (8: int8 codes; 4 to 6: packed, see codes.h)
  SI_BIAS = SI_BITS + 4,   // 4 columns: their packed codes' bias
  SI_COLS = SI_BIAS + 4
};
enum StackFloat : int64_t {
  SF_SCALE,    // attention score scale
  SF_SOFTCAP,  // attention logit soft-cap (0: none)
  SF_SCALAR,   // the layer's output scalar (read where F_SCALAR)
  SF_COLS
};
enum StackFlag : int64_t {
  F_INPUT_NORM = 1,      // absent: the layer's input is the residual stream itself
  F_POST_ATTN_NORM = 2,  // absent: the attention output is added as is (Gemma 1)
  F_PRE_MLP_NORM = 4,
  F_POST_MLP_NORM = 8,
  F_Q_NORM = 16,         // per-head RMSNorm over head_dim before RoPE (Gemma 3)
  F_K_NORM = 32,
  F_V_NORM = 64,         // per-head RMSNorm over head_dim without a scale (no tensor)
  F_SCALAR = 128,        // the residual stream is multiplied by SF_SCALAR after the layer
  F_V_IS_K = 256,        // no v projection: qkv is [q | k], and V is the raw k (before the k norm and RoPE)
};
enum StackNorm : int64_t { SN_INPUT, SN_POST_ATTN, SN_PRE_MLP, SN_POST_MLP, SN_Q, SN_K, SN_COUNT };
enum StackAct : int64_t { ACT_GELU_TANH };  // gelu_tanh(gate) * up over the gate_up product's [gate | up]
constexpr int64_t kStackProducts = 4, kStackWeights = 3 * kStackProducts;

// One layer's row of the tables.
struct StackLayer {
  int64_t flags, hq, hkv, d, kv_layer, rope, act, group[kStackProducts], bits[kStackProducts], bias[kStackProducts];
  double scale, softcap, scalar;
  bool has(int64_t flag) const { return (flags & flag) != 0; }
};

// The tables' rows, checked against each other and the tensor lists (a bad description must fail, not read foreign
// memory).
static std::vector<StackLayer> stack_layers(const at::Tensor& spec, const at::Tensor& fspec, at::TensorList weights,
                                            at::TensorList wide, at::TensorList norms, int64_t n_rope) {
  TORCH_CHECK(spec.dim() == 2 && spec.scalar_type() == at::kLong && spec.size(1) == SI_COLS && spec.size(0) > 0,
              "decode_stack: spec must be int64 [layers, ", static_cast<int64_t>(SI_COLS), "]");
  const int64_t L = spec.size(0);
  TORCH_CHECK(fspec.dim() == 2 && fspec.scalar_type() == at::kDouble && fspec.size(0) == L && fspec.size(1) == SF_COLS,
              "decode_stack: fspec must be float64 [layers, ", static_cast<int64_t>(SF_COLS), "]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kStackWeights * L &&
                  static_cast<int64_t>(norms.size()) == SN_COUNT * L &&
                  (wide.empty() || static_cast<int64_t>(wide.size()) == kStackWeights * L),
              "decode_stack: weights (and wide, when given) need 12 tensors per layer, norms 6");
  const at::Tensor si = spec.contiguous(), sf = fspec.contiguous();
  std::vector<StackLayer> out(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* r = si.data_ptr<int64_t>() + l * SI_COLS;
    const double* f = sf.data_ptr<double>() + l * SF_COLS;
    StackLayer& y = out[l];
    y = {r[SI_FLAGS], r[SI_HEADS], r[SI_KV_HEADS], r[SI_HEAD_DIM], r[SI_KV_LAYER], r[SI_ROPE], r[SI_ACT], {},
         {}, {}, f[SF_SCALE], f[SF_SOFTCAP], f[SF_SCALAR]};
    std::copy(r + SI_GROUP, r + SI_GROUP + kStackProducts, y.group);
    std::copy(r + SI_BITS, r + SI_BITS + kStackProducts, y.bits);
    std::copy(r + SI_BIAS, r + SI_BIAS + kStackProducts, y.bias);
    for (int64_t j = 0; j < kStackProducts; ++j) {
      const at::Tensor& c = weights[kStackWeights * l + 3 * j];
      TORCH_CHECK(y.bits[j] == 8 ? c.scalar_type() == at::kChar : c.scalar_type() == at::kByte,
                  "decode_stack: layer ", l, ": product ", j, "'s codes are not the width its row says");
    }
    TORCH_CHECK(y.hq > 0 && y.hkv > 0 && y.hq % y.hkv == 0 && y.d > 0 && y.d % 2 == 0, "decode_stack: layer ", l,
                ": heads must be a multiple of kv heads, head_dim even");
    TORCH_CHECK(y.rope >= 0 && y.rope < n_rope, "decode_stack: layer ", l, ": no rope table ", y.rope);
    TORCH_CHECK(y.act == ACT_GELU_TANH, "decode_stack: layer ", l, ": unknown activation ", y.act);
    TORCH_CHECK(y.kv_layer >= 0 && y.kv_layer <= l, "decode_stack: layer ", l, " reads the K/V of layer ",
                y.kv_layer, ", not an earlier one");
    if (y.kv_layer == l) {
      TORCH_CHECK(y.has(F_Q_NORM) == y.has(F_K_NORM), "decode_stack: layer ", l, ": q and k norms come together");
    } else {
      const StackLayer& src = out[y.kv_layer];
      TORCH_CHECK(src.kv_layer == y.kv_layer && src.hkv == y.hkv && src.d == y.d, "decode_stack: layer ", l,
                  " must read a layer that writes K/V of its own shape");
      TORCH_CHECK(!y.has(F_K_NORM) && !y.has(F_V_NORM) && !y.has(F_V_IS_K), "decode_stack: layer ", l,
                  " writes no K/V to make");
    }
    for (int64_t j = 0; j < SN_COUNT; ++j) {
      const at::Tensor& t = norms[SN_COUNT * l + j];
      TORCH_CHECK(!y.has(int64_t{1} << j) || (t.defined() && t.numel() > 0), "decode_stack: layer ", l,
                  ": norm ", j, " flagged but absent");
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------- decode_stack
// Every decoder layer of a decode step (one new token per row, the paged KV cache) in one call, without ~200
// Python-level calls per step. Per layer, from its row of the description (absent norms skipped):
//
//   h = input_norm(x)
//   q, k, v = split(qkv(h)); q, k = rope(q_norm(q)), rope(k_norm(k)); v = v_norm(v)   (F_V_IS_K: v = the raw k)
//   K/V of this layer's slots <- k, v             (a KV-shared layer: qkv is q only, it writes nothing)
//   a = o(attention(q, the K/V of layer kv_layer, scale, softcap))
//   x = x + post_attn_norm(a); h = pre_mlp_norm(x)
//   x = x + post_mlp_norm(down(gelu_tanh(gate) * up)); x = x * scalar; h = the next layer's input_norm(x)
//
// returning the last h through final_norm. These are the kernels, in the order, that GemmaModel._hidden_fused runs
// with PagedBatch.attend (so the same bits for Gemma 1-3): each residual step is one add_rms_norm with the next
// norm (the next layer's input norm, or final_norm). Products of up to exact_rows rows run qmatmul, larger ones
// qmatmul_i16 (wide given) or qmatmul_wide (AVX2 builds) or qmatmul_bf16; the caller (kernels/backend.py) checks
// that Linear.forward chooses them too.
//
// The cache's part: flats [S, Hkv, D] hold K/V slots; layer l's K of slot s is flats[kv[4l]][s + kv[4l + 1]], its V
// flats[kv[4l]][s + kv[4l + 2]], and its block tables are those of group kv[4l + 3] (write: the rows' new slots;
// table, start, lengths: what decode_attention reads); page_stride is per flat. A KV-shared layer's entries are not
// read (it uses its source's).
static inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

at::Tensor decode_stack(const at::Tensor& x_in, at::TensorList weights, at::TensorList wide, at::TensorList norms,
                        const at::Tensor& final_norm, const at::Tensor& spec, const at::Tensor& fspec, double eps,
                        at::TensorList cos, at::TensorList sin, at::TensorList flats, at::IntArrayRef kv,
                        at::TensorList write, at::TensorList table, at::TensorList start, at::TensorList lengths,
                        int64_t block, at::IntArrayRef page_stride, int64_t exact_rows) {
  TORCH_CHECK(cos.size() == sin.size(), "decode_stack: one sin table per cos table");
  const std::vector<StackLayer> layers = stack_layers(spec, fspec, weights, wide, norms, cos.size());
  const int64_t L = static_cast<int64_t>(layers.size()), M = x_in.size(0);
  const int64_t NG = static_cast<int64_t>(write.size());  // KV groups
  TORCH_CHECK(static_cast<int64_t>(kv.size()) == 4 * L && page_stride.size() == flats.size() && !flats.empty() &&
                  static_cast<int64_t>(table.size()) == NG && static_cast<int64_t>(start.size()) == NG &&
                  static_cast<int64_t>(lengths.size()) == NG,
              "decode_stack: kv needs 4 ints per layer, page_stride one per flat, table/start/lengths one per group");
  TORCH_CHECK(M <= exact_rows || !wide.empty() || kBf16Dot || kWide, "decode_stack: ", M,
              " rows need qmatmul_i16's layout, qmatmul_bf16 or qmatmul_wide, which this build lacks");
  for (int64_t l = 0; l < L; ++l) {
    if (layers[l].kv_layer != l) continue;
    const int64_t f = kv[4 * l], ok = kv[4 * l + 1], ov = kv[4 * l + 2], g = kv[4 * l + 3];
    TORCH_CHECK(f >= 0 && f < static_cast<int64_t>(flats.size()) && g >= 0 && g < NG, "decode_stack: layer ", l,
                ": bad flat or group");
    const at::Tensor& flat = flats[f];
    TORCH_CHECK(flat.dim() == 3 && flat.size(1) == layers[l].hkv && flat.size(2) == layers[l].d && ok >= 0 &&
                    ov >= 0 && ok < flat.size(0) && ov < flat.size(0),
                "decode_stack: layer ", l, ": its flat is not [S, kv heads, head_dim] or its offsets are outside it");
  }
  // a product of this step: qmatmul (exact) up to exact_rows rows, beyond qmatmul_i16 on its layout (wide: packed
  // codes, scales, offsets per product, i16_pack) when given, else qmatmul_wide (AVX2) or qmatmul_bf16 (which reads
  // int8 codes only: the caller passes those). Codes narrower than 8 bits take the packed ops (codes.h).
  const auto product = [&](const at::Tensor& x, const at::Tensor* w, const at::Tensor* p, const StackLayer& y,
                           int j) {
    const int64_t G = y.group[j], bits = y.bits[j], bias = y.bias[j];
    w += 3 * j;
    if (M <= exact_rows) {
      return bits == 8 ? qmatmul(x, w[0], w[1], opt(w[2]), G)
                       : qmatmul_packed(x, w[0], bits, bias, w[1], opt(w[2]), G);
    }
    if (p != nullptr) return qmatmul_i16(x, p[3 * j], p[3 * j + 1], p[3 * j + 2], G);
    if (kWide) {
      return bits == 8 ? qmatmul_wide(x, w[0], w[1], opt(w[2]), G)
                       : qmatmul_wide_packed(x, w[0], bits, bias, w[1], opt(w[2]), G);
    }
    TORCH_CHECK(bits == 8, "decode_stack: qmatmul_bf16 reads int8 codes, not packed ones");
    return qmatmul_bf16(x, w[0], w[1], opt(w[2]), G);
  };
  const auto norm = [&](int64_t l, int64_t j) -> c10::optional<at::Tensor> {
    return layers[l].has(int64_t{1} << j) ? c10::optional<at::Tensor>(norms[SN_COUNT * l + j]) : c10::nullopt;
  };
  at::Tensor x = x_in.contiguous();
  at::Tensor h = layers[0].has(F_INPUT_NORM) ? rms_norm(x, norms[SN_INPUT], eps) : x;
  for (int64_t l = 0; l < L; ++l) {
    const StackLayer& y = layers[l];
    const at::Tensor* w = weights.data() + kStackWeights * l;
    const at::Tensor* pk = wide.empty() ? nullptr : wide.data() + kStackWeights * l;
    const int64_t src = y.kv_layer, f = kv[4 * src], g = kv[4 * src + 3];
    const int64_t off_k = kv[4 * src + 1], off_v = kv[4 * src + 2];
    const at::Tensor& flat = flats[f];
    const int64_t S = flat.size(0);
    at::Tensor qkv = product(h, w, pk, y, 0);
    const int64_t kv_heads_made = src != l ? 0 : y.has(F_V_IS_K) ? y.hkv : 2 * y.hkv;
    TORCH_CHECK(qkv.size(1) == (y.hq + kv_heads_made) * y.d, "decode_stack: layer ", l,
                ": the qkv product's width does not match its heads");
    at::Tensor q;
    if (src == l) {
      if (y.has(F_V_IS_K)) qkv = at::cat({qkv, qkv.narrow(1, y.hq * y.d, y.hkv * y.d)}, 1);  // [q | k | v = k]
      auto qkv_split = qk_norm_rope(qkv, norm(l, SN_Q), norm(l, SN_K), cos[y.rope], sin[y.rope], y.hq, y.hkv, eps);
      q = std::get<0>(qkv_split);
      at::Tensor v = std::get<2>(qkv_split);
      if (y.has(F_V_NORM)) v = rms_norm(v, at::ones({y.d}, v.options()), eps);  // times 1: exact, scale-free
      flat.index_copy_(0, write[g] + off_k, std::get<1>(qkv_split).to(flat.scalar_type()));
      flat.index_copy_(0, write[g] + off_v, v.to(flat.scalar_type()));
    } else {
      q = q_norm_rope(qkv, norm(l, SN_Q), cos[y.rope], sin[y.rope], y.hq, eps);
    }
    at::Tensor att = decode_attention(q, flat.narrow(0, off_k, S - off_k), flat.narrow(0, off_v, S - off_v), table[g],
                                      start[g], lengths[g], block, page_stride[f], y.scale, y.softcap);
    at::Tensor a = product(att.reshape({M, -1}), w, pk, y, 1);
    auto r1 = add_rms_norm(x, a, norm(l, SN_POST_ATTN), norm(l, SN_PRE_MLP), eps);
    x = std::get<0>(r1);
    if (y.has(F_PRE_MLP_NORM)) h = std::get<1>(r1);
    else h = x;
    at::Tensor gu = product(h, w, pk, y, 2);
    at::Tensor m = product(geglu(gu), w, pk, y, 3);
    // the next norm: the next layer's input norm, or final_norm after the last layer
    const c10::optional<at::Tensor> next = l + 1 < L ? norm(l + 1, SN_INPUT) : c10::optional<at::Tensor>(final_norm);
    if (y.has(F_SCALAR)) {  // x' = (x + post_mlp_norm(m)) * scalar, then the next norm of x'
      x = std::get<0>(add_rms_norm(x, m, norm(l, SN_POST_MLP), c10::nullopt, eps)).mul_(y.scalar);
      h = next.has_value() ? rms_norm(x, *next, eps) : x;
    } else {
      auto r2 = add_rms_norm(x, m, norm(l, SN_POST_MLP), next, eps);
      x = std::get<0>(r2);
      h = next.has_value() ? std::get<1>(r2) : x;
    }
  }
  return h;
}

}  // namespace
