// Fused residual add + RMSNorm / LayerNorm, one block per row. Rounding as in HF Llama: the sum is
// stored in the activation dtype and the statistics are taken over that stored value in fp32.
#include "common.cuh"

namespace shardserve {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// r = round(x + residual) stored to res_out; returns this thread's partial sum of f(r).
template <typename T>
__device__ __forceinline__ float add_store(const T* x, const T* res, T* res_out, int64_t base,
                                           int64_t N, bool square) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    float v = to_f(x[base + i]);
    if (res != nullptr) v = round_to<T>(v + to_f(res[base + i]));
    res_out[base + i] = from_f<T>(v);
    acc += square ? v * v : v;
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
               T* __restrict__ out, T* __restrict__ res_out, int64_t N, float eps) {
  __shared__ float red[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * N;
  float ss = block_sum(add_store(x, res, res_out, base, N, true), red);
  const float inv = rsqrtf(ss / static_cast<float>(N) + eps);
  // each thread re-reads only the elements it wrote itself
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const float n = round_to<T>(to_f(res_out[base + i]) * inv);  // HF: weight * hidden.to(dtype)
    out[base + i] = from_f<T>(n * to_f(w[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ln_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
              const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ res_out, int64_t N,
              float eps) {
  __shared__ float red[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * N;
  const float mean = block_sum(add_store(x, res, res_out, base, N, false), red) / static_cast<float>(N);
  float var = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const float d = to_f(res_out[base + i]) - mean;
    var += d * d;
  }
  var = block_sum(var, red) / static_cast<float>(N);
  const float rstd = rsqrtf(var + eps);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    float v = (to_f(res_out[base + i]) - mean) * rstd * to_f(w[i]);
    if (bias != nullptr) v += to_f(bias[i]);
    out[base + i] = from_f<T>(v);
  }
}

}  // namespace

cudaError_t fused_add_rms_norm(const void* x, const void* residual, const void* weight, void* out,
                               void* residual_out, DType dt, int64_t T_, int64_t N, float eps,
                               cudaStream_t stream) {
  if (T_ == 0 || N == 0) return cudaSuccess;
  SS_CUDA_DISPATCH(dt, rms_kernel<T><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(
                           static_cast<const T*>(x), static_cast<const T*>(residual),
                           static_cast<const T*>(weight), static_cast<T*>(out),
                           static_cast<T*>(residual_out), N, eps));
  return cudaGetLastError();
}

cudaError_t fused_add_layer_norm(const void* x, const void* residual, const void* weight,
                                 const void* bias, void* out, void* residual_out, DType dt,
                                 int64_t T_, int64_t N, float eps, cudaStream_t stream) {
  if (T_ == 0 || N == 0) return cudaSuccess;
  SS_CUDA_DISPATCH(dt, ln_kernel<T><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(
                           static_cast<const T*>(x), static_cast<const T*>(residual),
                           static_cast<const T*>(weight), static_cast<const T*>(bias),
                           static_cast<T*>(out), static_cast<T*>(residual_out), N, eps));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shardserve
