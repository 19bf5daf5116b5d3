// torch bindings of the CUDA kernels: CUDA implementations of the torch.ops.shardserve operators,
// whose schemas the CPU library defines (../cpu/bindings.cpp, ../include/op_schemas.h), so the CPU
// library is loaded first (native/ops.py). Built only where torch has CUDA (native/build.py); the
// kernels themselves (*.cu) include no torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace shardserve {
namespace cuda {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "shardserve (cuda): unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "shardserve (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "shardserve (cuda): ", name, " must be a CUDA tensor");
}

at::Tensor paged_attention_decode_op(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                     const at::Tensor& v_cache_in, const at::Tensor& tables_in,
                                     const at::Tensor& lens_in, double scale,
                                     const std::optional<at::Tensor>& alibi_in) {
  check_cuda(q_in, "q");
  c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 3 && k_cache_in.dim() == 4, "q [B,H,D], caches [NB,BS,Hkv,D]");
  TORCH_CHECK(k_cache_in.sizes() == v_cache_in.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(k_cache_in.scalar_type() == q_in.scalar_type() &&
                  v_cache_in.scalar_type() == q_in.scalar_type(),
              "q and caches must share a dtype");
  auto q = q_in.contiguous();
  auto kc = k_cache_in.contiguous();
  auto vc = v_cache_in.contiguous();
  auto tables = tables_in.to(q.device(), at::kInt).contiguous();
  auto lens = lens_in.to(q.device(), at::kInt).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK(kc.size(3) == D && H % Hkv == 0, "head dims / GQA groups do not match");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lens.numel() == B, "bad block tables");
  const int64_t max_blocks = tables.size(1);
  at::Tensor alibi;
  if (alibi_in.has_value()) {
    alibi = alibi_in->to(q.device(), at::kFloat).contiguous();
    TORCH_CHECK(alibi.numel() == H, "alibi_slopes must have H entries");
  }
  const int64_t P = (max_blocks * bs + kAttnPartition - 1) / kAttnPartition;
  auto f32 = q.options().dtype(at::kFloat);
  auto part_out = at::empty({B, H, std::max<int64_t>(P, 1), D}, f32);
  auto part_max = at::empty({B, H, std::max<int64_t>(P, 1)}, f32);
  auto part_sum = at::empty({B, H, std::max<int64_t>(P, 1)}, f32);
  auto out = at::empty_like(q);
  check(paged_attention_decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), tables.data_ptr<int32_t>(),
                               lens.data_ptr<int32_t>(),
                               alibi.defined() ? alibi.data_ptr<float>() : nullptr, out.data_ptr(),
                               part_out.data_ptr<float>(), part_max.data_ptr<float>(),
                               part_sum.data_ptr<float>(), to_dtype(q), B, H, Hkv, D, bs,
                               max_blocks, static_cast<float>(scale), stream_of(q)),
        "paged_attention_decode");
  return out;
}

std::tuple<at::Tensor, at::Tensor> norm_op(const at::Tensor& x_in,
                                           const std::optional<at::Tensor>& res_in,
                                           const at::Tensor& w_in,
                                           const std::optional<at::Tensor>& b_in, double eps,
                                           bool layer_norm) {
  check_cuda(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(-1);
  auto x = x_in.contiguous();
  auto w = w_in.to(x.device(), x.scalar_type()).contiguous();
  TORCH_CHECK(w.numel() == N, "weight must have N entries");
  at::Tensor res, bias;
  if (res_in.has_value()) {
    res = res_in->to(x.device(), x.scalar_type()).contiguous();
    TORCH_CHECK(res.sizes() == x.sizes(), "residual shape differs from x");
  }
  if (b_in.has_value()) {
    bias = b_in->to(x.device(), x.scalar_type()).contiguous();
    TORCH_CHECK(bias.numel() == N, "bias must have N entries");
  }
  auto out = at::empty_like(x);
  auto res_out = at::empty_like(x);
  const int64_t T = N > 0 ? x.numel() / N : 0;
  const void* rp = res.defined() ? res.data_ptr() : nullptr;
  if (layer_norm) {
    check(fused_add_layer_norm(x.data_ptr(), rp, w.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                               out.data_ptr(), res_out.data_ptr(), to_dtype(x), T, N,
                               static_cast<float>(eps), stream_of(x)),
          "fused_add_layer_norm");
  } else {
    check(fused_add_rms_norm(x.data_ptr(), rp, w.data_ptr(), out.data_ptr(), res_out.data_ptr(),
                             to_dtype(x), T, N, static_cast<float>(eps), stream_of(x)),
          "fused_add_rms_norm");
  }
  return {out, res_out};
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_op(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& res,
                                                         const at::Tensor& w, double eps) {
  return norm_op(x, res, w, std::nullopt, eps, false);
}

std::tuple<at::Tensor, at::Tensor> fused_add_layer_norm_op(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& res,
                                                           const at::Tensor& w,
                                                           const std::optional<at::Tensor>& b,
                                                           double eps) {
  return norm_op(x, res, w, b, eps, true);
}

std::tuple<at::Tensor, at::Tensor> rotary_cache_write_op(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& positions_in, const at::Tensor& cos_sin_in, at::Tensor k_cache,
    at::Tensor v_cache, const at::Tensor& slots_in, bool is_neox, int64_t rot_dim) {
  check_cuda(q_in, "q");
  c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.sizes() == k_in.sizes(),
              "q [T,H,D], k and v [T,Hkv,D]");
  auto q = q_in.contiguous();
  auto k = k_in.to(q.scalar_type()).contiguous();
  auto v = v_in.to(q.scalar_type()).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D, "k shape does not match q");
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= D, "rot_dim must be even and <= D");
  TORCH_CHECK(k_cache.is_cuda() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches must be contiguous CUDA tensors");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "caches must have the activation dtype");
  TORCH_CHECK(k_cache.numel() == v_cache.numel() && k_cache.numel() % (Hkv * D) == 0,
              "cache shape does not match [.., Hkv, D]");
  auto cs = cos_sin_in.to(q.device());
  if (cs.scalar_type() != at::kFloat && cs.scalar_type() != q.scalar_type()) cs = cs.to(at::kFloat);
  cs = cs.contiguous();
  TORCH_CHECK(cs.dim() == 2 && cs.size(1) == rot_dim, "cos_sin_cache must be [max_pos, rot_dim]");
  auto pos = positions_in.to(q.device(), at::kLong).contiguous();
  auto slots = slots_in.to(q.device(), at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == T && slots.numel() == T, "positions / slot_mapping need T entries");
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  check(rotary_cache_write(q.data_ptr(), k.data_ptr(), v.data_ptr(), pos.data_ptr<int64_t>(),
                           cs.data_ptr(), cs.scalar_type() == at::kFloat, q_out.data_ptr(),
                           k_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           slots.data_ptr<int64_t>(), to_dtype(q), T, H, Hkv, D, rot_dim, is_neox,
                           stream_of(q)),
        "rotary_cache_write");
  return {q_out, k_out};
}

// The vectorised GEMV paths load 16 bytes at a time; a view that starts mid-allocation is copied.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

at::Tensor finish_linear(const at::Tensor& y, const at::Tensor& x_in, int64_t O) {
  auto shape = x_in.sizes().vec();
  shape.back() = O;
  return y.to(x_in.scalar_type()).reshape(shape);
}

at::Tensor int8_linear_op(const at::Tensor& x_in, const at::Tensor& qw_in, const at::Tensor& s_in,
                          const std::optional<at::Tensor>& b_in) {
  check_cuda(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(qw_in.scalar_type() == at::kChar && qw_in.dim() == 2, "qw must be int8 [out, in]");
  const int64_t O = qw_in.size(0), I = qw_in.size(1);
  TORCH_CHECK(x_in.size(-1) == I, "x last dim must equal in_features");
  auto qw = qw_in.contiguous();
  auto s = s_in.to(x_in.device(), at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == O, "scales must have out_features entries");
  at::Tensor bias;
  if (b_in.has_value()) bias = b_in->to(x_in.device(), at::kFloat).contiguous();
  auto x2 = x_in.reshape({-1, I});
  const int64_t T = x2.size(0);
  if (T > kMaxGemvTokens) {  // compute-bound: dequantise in the activation dtype, then cuBLAS
    auto w = at::empty({O, I}, x2.options());
    check(int8_dequant(qw.data_ptr<int8_t>(), s.data_ptr<float>(), w.data_ptr(), to_dtype(x2), O, I,
                       stream_of(x2)),
          "int8_dequant");
    auto y = at::matmul(x2, w.t());
    if (bias.defined()) y = y + bias.to(y.scalar_type());
    return finish_linear(y, x_in, O);
  }
  auto x = aligned16(x2.to(at::kFloat).contiguous());
  qw = aligned16(qw);
  auto y = at::empty({T, O}, x.options());
  check(int8_gemv(x.data_ptr<float>(), qw.data_ptr<int8_t>(), s.data_ptr<float>(),
                  bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), T, O, I,
                  stream_of(x)),
        "int8_gemv");
  return finish_linear(y, x_in, O);
}

at::Tensor int4_linear_op(const at::Tensor& x_in, const at::Tensor& packed_in,
                          const at::Tensor& s_in, const std::optional<at::Tensor>& z_in,
                          const std::optional<at::Tensor>& b_in, int64_t group_size) {
  check_cuda(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2,
              "packed must be uint8 [out, in/2]");
  // I: the packed width (in_features rounded up to the group); x is padded with zeros to it, so
  // the last group's padded weights contribute nothing.
  const int64_t O = packed_in.size(0), I = packed_in.size(1) * 2, In = x_in.size(-1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && I % group_size == 0,
              "group_size must be a multiple of 32 dividing the packed width");
  TORCH_CHECK(In <= I && In > I - group_size, "x last dim must be in_features (packed: ", I, ")");
  const int64_t G = I / group_size;
  auto packed = packed_in.contiguous();
  auto s = s_in.to(x_in.device(), at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == O * G, "scales must be [out, in/group_size]");
  at::Tensor z, bias;
  if (z_in.has_value()) {
    z = z_in->to(x_in.device(), at::kFloat).contiguous();
    TORCH_CHECK(z.numel() == O * G, "zeros must be [out, in/group_size]");
  }
  if (b_in.has_value()) bias = b_in->to(x_in.device(), at::kFloat).contiguous();
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  auto x2 = x_in.reshape({-1, In});
  if (In < I) x2 = at::constant_pad_nd(x2, {0, I - In});
  const int64_t T = x2.size(0);
  if (T > kMaxGemvTokens) {
    auto w = at::empty({O, I}, x2.options());
    check(int4_dequant(packed.data_ptr<uint8_t>(), s.data_ptr<float>(), zp, w.data_ptr(), to_dtype(x2),
                       O, I, group_size, stream_of(x2)),
          "int4_dequant");
    auto y = at::matmul(x2, w.t());
    if (bias.defined()) y = y + bias.to(y.scalar_type());
    return finish_linear(y, x_in, O);
  }
  auto x = aligned16(x2.to(at::kFloat).contiguous());
  packed = aligned16(packed);
  auto y = at::empty({T, O}, x.options());
  check(int4_gemv(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), s.data_ptr<float>(), zp,
                  bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), T, O, I,
                  group_size, stream_of(x)),
        "int4_gemv");
  return finish_linear(y, x_in, O);
}

at::Tensor sample_top_k_top_p_op(const at::Tensor& logits_in, const at::Tensor& temperature_in,
                                 const at::Tensor& top_k_in, const at::Tensor& top_p_in,
                                 const at::Tensor& uniforms_in) {
  check_cuda(logits_in, "logits");
  c10::cuda::CUDAGuard guard(logits_in.device());
  TORCH_CHECK(logits_in.dim() == 2, "logits must be [B, V]");
  auto logits = logits_in.to(at::kFloat).contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto dev = logits.device();
  auto temp = temperature_in.to(dev, at::kFloat).contiguous();
  auto top_k = top_k_in.to(dev, at::kLong).contiguous();
  auto top_p = top_p_in.to(dev, at::kFloat).contiguous();
  auto u = uniforms_in.to(dev, at::kDouble).contiguous();
  TORCH_CHECK(temp.numel() == B && top_k.numel() == B && top_p.numel() == B && u.numel() == B,
              "per-row parameters need B entries");
  auto out = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0 || V == 0) return out.zero_();
  const bool filters =
      at::logical_or(at::logical_and(top_k > 0, top_k < V), top_p < 1.0).any().item<bool>();
  at::Tensor order;
  if (filters) order = std::get<1>(at::sort(logits, /*stable=*/true, /*dim=*/-1, /*descending=*/true)).contiguous();
  auto keep = at::empty({B, V}, logits.options().dtype(at::kByte));
  check(sample_top_k_top_p(logits.data_ptr<float>(), filters ? order.data_ptr<int64_t>() : nullptr,
                           keep.data_ptr<uint8_t>(), temp.data_ptr<float>(), top_k.data_ptr<int64_t>(),
                           top_p.data_ptr<float>(), u.data_ptr<double>(), out.data_ptr<int64_t>(), B,
                           V, stream_of(logits)),
        "sample_top_k_top_p");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace shardserve

TORCH_LIBRARY_IMPL(shardserve, CUDA, m) {
  using namespace shardserve::cuda;
  m.impl("paged_attention_decode", &paged_attention_decode_op);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_op);
  m.impl("fused_add_layer_norm", &fused_add_layer_norm_op);
  m.impl("rotary_cache_write", &rotary_cache_write_op);
  m.impl("int8_linear", &int8_linear_op);
  m.impl("int4_linear", &int4_linear_op);
  m.impl("sample_top_k_top_p", &sample_top_k_top_p_op);
}
