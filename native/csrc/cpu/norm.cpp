// Fused residual add + RMSNorm / LayerNorm. Rounding follows HF Llama: the residual sum is stored
// in the activation dtype and the statistics are taken over that stored value in fp32.
#include <cmath>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

// r[N] (fp32 scratch) = round(x + residual); also stored to residual_out.
template <DType DT>
SS_INLINE void add_row(const void* x, const void* res, void* res_out, float* r, int64_t row,
                       int64_t N) {
  const int64_t base = row * N;
  for (int64_t i = 0; i < N; ++i) {
    float v = load_f<DT>(x, base + i);
    if (res) v = round_to<DT>(v + load_f<DT>(res, base + i));
    r[i] = v;
    store_f<DT>(res_out, base + i, v);
  }
}

template <DType DT>
SS_INLINE void rms_rows(const void* x, const void* res, const void* w, void* out, void* res_out,
                        int64_t T, int64_t N, float eps) {
#pragma omp parallel if (T * N >= (1 << 16))
  {
    float stack_buf[8192];
    float* r = N <= 8192 ? stack_buf : new float[N];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < T; ++row) {
      add_row<DT>(x, res, res_out, r, row, N);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < N; ++i) ss += r[i] * r[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
      for (int64_t i = 0; i < N; ++i) {
        // HF: weight * hidden.to(input_dtype)
        const float n = round_to<DT>(r[i] * inv);
        store_f<DT>(out, row * N + i, n * load_f<DT>(w, i));
      }
    }
    if (r != stack_buf) delete[] r;
  }
}

template <DType DT>
SS_INLINE void ln_rows(const void* x, const void* res, const void* w, const void* bias, void* out,
                       void* res_out, int64_t T, int64_t N, float eps) {
#pragma omp parallel if (T * N >= (1 << 16))
  {
    float stack_buf[8192];
    float* r = N <= 8192 ? stack_buf : new float[N];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < T; ++row) {
      add_row<DT>(x, res, res_out, r, row, N);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < N; ++i) sum += r[i];
      const float mean = sum / static_cast<float>(N);
      float var = 0.f;
#pragma omp simd reduction(+ : var)
      for (int64_t i = 0; i < N; ++i) var += (r[i] - mean) * (r[i] - mean);
      const float rstd = 1.f / std::sqrt(var / static_cast<float>(N) + eps);
      for (int64_t i = 0; i < N; ++i) {
        float v = (r[i] - mean) * rstd * load_f<DT>(w, i);
        if (bias) v += load_f<DT>(bias, i);
        store_f<DT>(out, row * N + i, v);
      }
    }
    if (r != stack_buf) delete[] r;
  }
}

#define SS_RMS_ARGS                                                                      \
  const void *x, const void *res, const void *w, void *out, void *res_out, DType dt, \
      int64_t T, int64_t N, float eps
#define SS_RMS_CALL SS_DISPATCH_DTYPE(dt, rms_rows<DT>(x, res, w, out, res_out, T, N, eps))
SS_TARGET_AVX512 void rms_avx512(SS_RMS_ARGS) { SS_RMS_CALL }
SS_TARGET_AVX2 void rms_avx2(SS_RMS_ARGS) { SS_RMS_CALL }
void rms_generic(SS_RMS_ARGS) { SS_RMS_CALL }

#define SS_LN_ARGS                                                                     \
  const void *x, const void *res, const void *w, const void *bias, void *out, void *res_out, \
      DType dt, int64_t T, int64_t N, float eps
#define SS_LN_CALL SS_DISPATCH_DTYPE(dt, ln_rows<DT>(x, res, w, bias, out, res_out, T, N, eps))
SS_TARGET_AVX512 void ln_avx512(SS_LN_ARGS) { SS_LN_CALL }
SS_TARGET_AVX2 void ln_avx2(SS_LN_ARGS) { SS_LN_CALL }
void ln_generic(SS_LN_ARGS) { SS_LN_CALL }

}  // namespace

void fused_add_rms_norm(const void* x, const void* residual, const void* weight, void* out,
                        void* residual_out, DType dt, int64_t T, int64_t N, float eps) {
  switch (detect_isa()) {
    case Isa::Avx512: rms_avx512(x, residual, weight, out, residual_out, dt, T, N, eps); break;
    case Isa::Avx2: rms_avx2(x, residual, weight, out, residual_out, dt, T, N, eps); break;
    default: rms_generic(x, residual, weight, out, residual_out, dt, T, N, eps);
  }
}

void fused_add_layer_norm(const void* x, const void* residual, const void* weight,
                          const void* bias, void* out, void* residual_out, DType dt, int64_t T,
                          int64_t N, float eps) {
  switch (detect_isa()) {
    case Isa::Avx512: ln_avx512(x, residual, weight, bias, out, residual_out, dt, T, N, eps); break;
    case Isa::Avx2: ln_avx2(x, residual, weight, bias, out, residual_out, dt, T, N, eps); break;
    default: ln_generic(x, residual, weight, bias, out, residual_out, dt, T, N, eps);
  }
}

}  // namespace cpu
}  // namespace shardserve
