// torch bindings of the CPU kernels. This library defines the operator namespace torch.ops.shardserve
// (every schema, once: ../include/op_schemas.h) and registers the CPU implementations; the CUDA
// library (../cuda/bindings.cpp) adds CUDA implementations of the same operators, so torch
// dispatches by the tensors' device. Checks shapes and dtypes, makes inputs contiguous, then calls
// the raw-pointer kernels.
#include "../include/op_schemas.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "shardserve (cpu): unsupported dtype ", t.scalar_type());
  }
}

// t in dtype st: t itself when it already is (no dispatcher call: these ops run per layer per step)
at::Tensor as(const at::Tensor& t, at::ScalarType st) { return t.scalar_type() == st ? t : t.to(st); }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "shardserve (cpu): ", name, " must be on CPU");
}

at::Tensor paged_attention_decode_op(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                  const at::Tensor& v_cache_in, const at::Tensor& block_tables_in,
                                  const at::Tensor& context_lens_in, double scale,
                                  const std::optional<at::Tensor>& alibi_in) {
  check_cpu(q_in, "q");
  TORCH_CHECK(q_in.dim() == 3 && k_cache_in.dim() == 4, "q [B,H,D], caches [NB,BS,Hkv,D]");
  TORCH_CHECK(k_cache_in.sizes() == v_cache_in.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(k_cache_in.scalar_type() == q_in.scalar_type() &&
                  v_cache_in.scalar_type() == q_in.scalar_type(),
              "q and caches must share a dtype");
  auto q = q_in.contiguous();
  auto kc = k_cache_in.contiguous();
  auto vc = v_cache_in.contiguous();
  auto tables = as(block_tables_in, at::kInt).contiguous();
  auto lens = as(context_lens_in, at::kInt).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK(kc.size(3) == D && H % Hkv == 0, "head dims / GQA groups do not match");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lens.numel() == B, "bad block tables");
  const int64_t max_blocks = tables.size(1);
  const int32_t* lp = lens.data_ptr<int32_t>();
  TORCH_CHECK(std::all_of(lp, lp + lens.numel(), [&](int32_t n) { return n <= max_blocks * bs; }),
              "context longer than the block table");
  at::Tensor alibi;
  if (alibi_in.has_value()) {
    alibi = as(*alibi_in, at::kFloat).contiguous();
    TORCH_CHECK(alibi.numel() == H, "alibi_slopes must have H entries");
  }
  auto out = at::empty_like(q);
  paged_attention_decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), tables.data_ptr<int32_t>(),
                         lens.data_ptr<int32_t>(), alibi.defined() ? alibi.data_ptr<float>() : nullptr,
                         out.data_ptr(), to_dtype(q), B, H, Hkv, D, bs, max_blocks,
                         static_cast<float>(scale));
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_op(const at::Tensor& x_in,
                                                      const std::optional<at::Tensor>& res_in,
                                                      const at::Tensor& w_in, double eps) {
  check_cpu(x_in, "x");
  const int64_t N = x_in.size(-1);
  auto x = x_in.contiguous();
  auto w = as(w_in, x.scalar_type()).contiguous();
  TORCH_CHECK(w.numel() == N, "weight must have N entries");
  at::Tensor res;
  if (res_in.has_value()) {
    res = as(*res_in, x.scalar_type()).contiguous();
    TORCH_CHECK(res.sizes() == x.sizes(), "residual shape differs from x");
  }
  auto out = at::empty_like(x);
  auto res_out = at::empty_like(x);
  fused_add_rms_norm(x.data_ptr(), res.defined() ? res.data_ptr() : nullptr, w.data_ptr(),
                     out.data_ptr(), res_out.data_ptr(), to_dtype(x), x.numel() / std::max<int64_t>(N, 1),
                     N, static_cast<float>(eps));
  return {out, res_out};
}

std::tuple<at::Tensor, at::Tensor> fused_add_layer_norm_op(const at::Tensor& x_in,
                                                        const std::optional<at::Tensor>& res_in,
                                                        const at::Tensor& w_in,
                                                        const std::optional<at::Tensor>& b_in,
                                                        double eps) {
  check_cpu(x_in, "x");
  const int64_t N = x_in.size(-1);
  auto x = x_in.contiguous();
  auto w = as(w_in, x.scalar_type()).contiguous();
  TORCH_CHECK(w.numel() == N, "weight must have N entries");
  at::Tensor res, bias;
  if (res_in.has_value()) {
    res = as(*res_in, x.scalar_type()).contiguous();
    TORCH_CHECK(res.sizes() == x.sizes(), "residual shape differs from x");
  }
  if (b_in.has_value()) {
    bias = as(*b_in, x.scalar_type()).contiguous();
    TORCH_CHECK(bias.numel() == N, "bias must have N entries");
  }
  auto out = at::empty_like(x);
  auto res_out = at::empty_like(x);
  fused_add_layer_norm(x.data_ptr(), res.defined() ? res.data_ptr() : nullptr, w.data_ptr(),
                       bias.defined() ? bias.data_ptr() : nullptr, out.data_ptr(),
                       res_out.data_ptr(), to_dtype(x), x.numel() / std::max<int64_t>(N, 1), N,
                       static_cast<float>(eps));
  return {out, res_out};
}

std::tuple<at::Tensor, at::Tensor> rotary_cache_write_op(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& positions_in, const at::Tensor& cos_sin_in, at::Tensor k_cache,
    at::Tensor v_cache, const at::Tensor& slots_in, bool is_neox, int64_t rot_dim) {
  check_cpu(q_in, "q");
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.sizes() == k_in.sizes(),
              "q [T,H,D], k and v [T,Hkv,D]");
  auto q = q_in.contiguous();
  auto k = as(k_in, q.scalar_type()).contiguous();
  auto v = as(v_in, q.scalar_type()).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D, "k shape does not match q");
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= D, "rot_dim must be even and <= D");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "caches must have the activation dtype");
  TORCH_CHECK(k_cache.numel() == v_cache.numel() && k_cache.numel() % (Hkv * D) == 0,
              "cache shape does not match [.., Hkv, D]");
  auto cs = cos_sin_in;
  if (cs.scalar_type() != at::kFloat && cs.scalar_type() != q.scalar_type()) cs = as(cs, at::kFloat);
  cs = cs.contiguous();
  TORCH_CHECK(cs.dim() == 2 && cs.size(1) == rot_dim, "cos_sin_cache must be [max_pos, rot_dim]");
  auto pos = as(positions_in, at::kLong).contiguous();
  auto slots = as(slots_in, at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == T && slots.numel() == T, "positions / slot_mapping need T entries");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t n_pos = cs.size(0), n_slots = k_cache.numel() / (Hkv * D);
  TORCH_CHECK(std::all_of(pp, pp + T, [&](int64_t p) { return p >= 0 && p < n_pos; }),
              "position outside the cos/sin cache");
  TORCH_CHECK(std::all_of(sp, sp + T, [&](int64_t x) { return x < n_slots; }), "slot outside the cache");
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  rotary_cache_write(q.data_ptr(), k.data_ptr(), v.data_ptr(), pos.data_ptr<int64_t>(),
                     cs.data_ptr(), to_dtype(cs), q_out.data_ptr(), k_out.data_ptr(),
                     k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr<int64_t>(), to_dtype(q),
                     T, H, Hkv, D, rot_dim, is_neox);
  return {q_out, k_out};
}

// Up to this many tokens the register-tiled kernels (weights read once per row block) beat
// dequantise + MKL sgemm on these CPUs; above it, dequantise row chunks and call MKL.
constexpr int64_t kSmallT = 64;

template <typename Dequant>
at::Tensor dequant_matmul(const at::Tensor& x, int64_t O, int64_t I, Dequant&& deq) {
  auto y = at::empty({x.size(0), O}, x.options());
  const int64_t chunk = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(I, 1));
  auto w = at::empty({std::min(chunk, O), I}, x.options());
  for (int64_t o0 = 0; o0 < O; o0 += chunk) {
    const int64_t o1 = std::min(O, o0 + chunk);
    auto wc = w.narrow(0, 0, o1 - o0);
    deq(wc.data_ptr<float>(), o0, o1);
    y.narrow(1, o0, o1 - o0).copy_(at::mm(x, wc.t()));
  }
  return y;
}

at::Tensor int8_linear_op(const at::Tensor& x_in, const at::Tensor& qw_in, const at::Tensor& s_in,
                       const std::optional<at::Tensor>& b_in) {
  check_cpu(x_in, "x");
  TORCH_CHECK(qw_in.scalar_type() == at::kChar && qw_in.dim() == 2, "qw must be int8 [out, in]");
  const int64_t O = qw_in.size(0), I = qw_in.size(1);
  TORCH_CHECK(x_in.size(-1) == I, "x last dim must equal in_features");
  auto x = as(x_in.reshape({-1, I}), at::kFloat).contiguous();
  auto qw = qw_in.contiguous();
  auto s = as(s_in, at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == O, "scales must have out_features entries");
  at::Tensor bias;
  if (b_in.has_value()) bias = as(*b_in, at::kFloat).contiguous();
  const int64_t T = x.size(0);
  at::Tensor y;
  if (T > kSmallT) {
    y = dequant_matmul(x, O, I, [&](float* w, int64_t o0, int64_t o1) {
      int8_dequant(qw.data_ptr<int8_t>(), s.data_ptr<float>(), w, o0, o1, I);
    });
    if (bias.defined()) y.add_(bias);
  } else {
    y = at::empty({T, O}, x.options());
    int8_linear(x.data_ptr<float>(), qw.data_ptr<int8_t>(), s.data_ptr<float>(),
                bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), T, O, I);
  }
  auto shape = x_in.sizes().vec();
  shape.back() = O;
  return as(y, x_in.scalar_type()).reshape(shape);
}

at::Tensor int4_linear_op(const at::Tensor& x_in, const at::Tensor& packed_in,
                       const at::Tensor& s_in, const std::optional<at::Tensor>& z_in,
                       const std::optional<at::Tensor>& b_in, int64_t group_size) {
  check_cpu(x_in, "x");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2,
              "packed must be uint8 [out, in/2]");
  // I: the packed width (in_features rounded up to the group); the last group's padded inputs are
  // zeros here, so its padded weights contribute nothing.
  const int64_t O = packed_in.size(0), I = packed_in.size(1) * 2, In = x_in.size(-1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && I % group_size == 0,
              "group_size must be a multiple of 32 dividing the packed width");
  TORCH_CHECK(In <= I && In > I - group_size, "x last dim must be in_features (packed: ", I, ")");
  const int64_t G = I / group_size;
  auto x = as(x_in.reshape({-1, In}), at::kFloat);
  if (In < I) x = at::constant_pad_nd(x, {0, I - In});
  x = x.contiguous();
  auto packed = packed_in.contiguous();
  auto s = as(s_in, at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == O * G, "scales must be [out, in/group_size]");
  at::Tensor z, bias;
  if (z_in.has_value()) {
    z = as(*z_in, at::kFloat).contiguous();
    TORCH_CHECK(z.numel() == O * G, "zeros must be [out, in/group_size]");
  }
  if (b_in.has_value()) bias = as(*b_in, at::kFloat).contiguous();
  const int64_t T = x.size(0);
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  at::Tensor y;
  if (T > kSmallT) {
    y = dequant_matmul(x, O, I, [&](float* w, int64_t o0, int64_t o1) {
      int4_dequant(packed.data_ptr<uint8_t>(), s.data_ptr<float>(), zp, w, o0, o1, I, group_size);
    });
    if (bias.defined()) y.add_(bias);
  } else {
    y = at::empty({T, O}, x.options());
    int4_linear(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), s.data_ptr<float>(), zp,
                bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), T, O, I,
                group_size);
  }
  auto shape = x_in.sizes().vec();
  shape.back() = O;
  return as(y, x_in.scalar_type()).reshape(shape);
}

at::Tensor w8a8_linear_op(const at::Tensor& x_in, const at::Tensor& qw_in, const at::Tensor& s_in,
                          const std::optional<at::Tensor>& b_in) {
  check_cpu(x_in, "x");
  TORCH_CHECK(qw_in.scalar_type() == at::kChar && qw_in.dim() == 2, "qw must be int8 [out, in]");
  const int64_t O = qw_in.size(0), I = qw_in.size(1);
  TORCH_CHECK(x_in.size(-1) == I, "x last dim must equal in_features");
  auto x = as(x_in.reshape({-1, I}), at::kFloat).contiguous();
  auto qw = qw_in.contiguous();
  auto s = as(s_in, at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == O, "scales must have out_features entries");
  at::Tensor bias;
  if (b_in.has_value()) {
    bias = as(*b_in, at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == O, "bias must have out_features entries");
  }
  auto y = at::empty({x.size(0), O}, x.options());
  w8a8_linear(x.data_ptr<float>(), qw.data_ptr<int8_t>(), s.data_ptr<float>(),
              bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), x.size(0), O, I);
  auto shape = x_in.sizes().vec();
  shape.back() = O;
  return as(y, x_in.scalar_type()).reshape(shape);
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8_op(const at::Tensor& x_in) {
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be [T, I]");
  auto x = as(x_in, at::kFloat).contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto s = at::empty({x.size(0)}, x.options());
  quantize_rows_int8(x.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), x.size(0), x.size(1));
  return {q, s};
}

at::Tensor int8_gemm_op(const at::Tensor& qx_in, const at::Tensor& qw_in) {
  check_cpu(qx_in, "qx");
  TORCH_CHECK(qx_in.scalar_type() == at::kChar && qw_in.scalar_type() == at::kChar && qx_in.dim() == 2 &&
                  qw_in.dim() == 2 && qx_in.size(1) == qw_in.size(1),
              "qx [T, I] and qw [O, I] must be int8");
  auto qx = qx_in.contiguous();
  auto qw = qw_in.contiguous();
  auto out = at::empty({qx.size(0), qw.size(0)}, qx.options().dtype(at::kInt));
  int8_gemm(qx.data_ptr<int8_t>(), qw.data_ptr<int8_t>(), out.data_ptr<int32_t>(), qx.size(0), qw.size(0),
            qx.size(1));
  return out;
}

at::Tensor sample_top_k_top_p_op(const at::Tensor& logits_in, const at::Tensor& temperature_in,
                              const at::Tensor& top_k_in, const at::Tensor& top_p_in,
                              const at::Tensor& uniforms_in) {
  check_cpu(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 2, "logits must be [B, V]");
  auto logits = as(logits_in, at::kFloat).contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto temp = as(temperature_in, at::kFloat).contiguous();
  auto top_k = as(top_k_in, at::kLong).contiguous();
  auto top_p = as(top_p_in, at::kFloat).contiguous();
  auto u = as(uniforms_in, at::kDouble).contiguous();
  TORCH_CHECK(temp.numel() == B && top_k.numel() == B && top_p.numel() == B && u.numel() == B,
              "per-row parameters need B entries");
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  if (V > 0)
    sample_top_k_top_p(logits.data_ptr<float>(), temp.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                       top_p.data_ptr<float>(), u.data_ptr<double>(), out.data_ptr<int64_t>(), B, V);
  return out;
}

std::string isa_op() { return isa_name(detect_isa()); }

}  // namespace
}  // namespace cpu
}  // namespace shardserve

TORCH_LIBRARY(shardserve, m) {
  for (const char* schema : shardserve::schema::kDeviceOps) m.def(schema);
  m.def(shardserve::schema::kIsa, &shardserve::cpu::isa_op);  // no tensor argument: not dispatched
}

TORCH_LIBRARY_IMPL(shardserve, CPU, m) {
  using namespace shardserve::cpu;
  m.impl("paged_attention_decode", &paged_attention_decode_op);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_op);
  m.impl("fused_add_layer_norm", &fused_add_layer_norm_op);
  m.impl("rotary_cache_write", &rotary_cache_write_op);
  m.impl("int8_linear", &int8_linear_op);
  m.impl("int4_linear", &int4_linear_op);
  m.impl("w8a8_linear", &w8a8_linear_op);
  m.impl("quantize_rows_int8", &quantize_rows_int8_op);
  m.impl("int8_gemm", &int8_gemm_op);
  m.impl("sample_top_k_top_p", &sample_top_k_top_p_op);
}
