// Weight-only int8 / int4 GEMV for small token counts: one warp per output row, each lane
// streaming 16-byte weight chunks, up to NT tokens served from each weight load.
// Large token counts dequantise instead (int8_dequant / int4_dequant) and use cuBLAS.
#include "common.cuh"

namespace shardserve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ float dot16_i8(const int4& pk, const float* x) {
  const int8_t* b = reinterpret_cast<const int8_t*>(&pk);
  const float4* xv = reinterpret_cast<const float4*>(x);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 xx = xv[j];
    s += xx.x * b[4 * j] + xx.y * b[4 * j + 1] + xx.z * b[4 * j + 2] + xx.w * b[4 * j + 3];
  }
  return s;
}

// VEC: I % 16 == 0 and 16-byte aligned rows / x, else a scalar lane-strided loop.
template <int NT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    int8_gemv_kernel(const float* __restrict__ x, const int8_t* __restrict__ w,
                     const float* __restrict__ scales, const float* __restrict__ bias,
                     float* __restrict__ y, int T, int64_t O, int64_t I) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (o >= O) return;  // whole warp leaves together
  const int8_t* row = w + o * I;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  if (VEC) {
#pragma unroll 4
    for (int64_t i = lane * 16; i < I; i += 32 * 16) {
      const int4 pk = *reinterpret_cast<const int4*>(row + i);
#pragma unroll
      for (int t = 0; t < NT; ++t)
        if (t < T) acc[t] += dot16_i8(pk, x + t * I + i);
    }
  } else {
    for (int64_t i = lane; i < I; i += 32) {
      const float wv = static_cast<float>(row[i]);
#pragma unroll
      for (int t = 0; t < NT; ++t)
        if (t < T) acc[t] += wv * x[t * I + i];
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float s = warp_sum(acc[t]);
    if (lane == 0 && t < T) y[t * O + o] = s * scales[o] + (bias != nullptr ? bias[o] : 0.f);
  }
}

// One lane handles a 32-weight run: 16 bytes, byte j = weight j (low nibble) and j+16 (high).
template <int NT>
__global__ void __launch_bounds__(kThreads)
    int4_gemv_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed,
                     const float* __restrict__ scales, const float* __restrict__ zeros,
                     const float* __restrict__ bias, float* __restrict__ y, int T, int64_t O,
                     int64_t I, int64_t gs) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (o >= O) return;
  const int64_t G = I / gs;
  const uint8_t* row = packed + o * (I / 2);
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
#pragma unroll 2
  for (int64_t run = lane; run < I / 32; run += 32) {
    const int4 pk = *reinterpret_cast<const int4*>(row + run * 16);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&pk);
    const int64_t i0 = run * 32;
    const int64_t g = i0 / gs;
    const float s = scales[o * G + g];
    const float z = zeros != nullptr ? zeros[o * G + g] : 8.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= T) continue;
      const float4* xv = reinterpret_cast<const float4*>(x + t * I + i0);
      float dot = 0.f, xs = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // weights 4j..4j+3 (low nibbles) and 16+4j.. (high)
        const float4 lo = xv[j], hi = xv[4 + j];
        dot += lo.x * (b[4 * j] & 15) + lo.y * (b[4 * j + 1] & 15) + lo.z * (b[4 * j + 2] & 15) +
               lo.w * (b[4 * j + 3] & 15);
        dot += hi.x * (b[4 * j] >> 4) + hi.y * (b[4 * j + 1] >> 4) + hi.z * (b[4 * j + 2] >> 4) +
               hi.w * (b[4 * j + 3] >> 4);
        xs += lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
      }
      acc[t] += s * (dot - z * xs);
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0 && t < T) y[t * O + o] = v + (bias != nullptr ? bias[o] : 0.f);
  }
}

template <typename T>
__global__ void int8_dequant_kernel(const int8_t* __restrict__ qw, const float* __restrict__ scales,
                                    T* __restrict__ w, int64_t O, int64_t I) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < O * I;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    w[idx] = from_f<T>(static_cast<float>(qw[idx]) * scales[idx / I]);
}

template <typename T>
__global__ void int4_dequant_kernel(const uint8_t* __restrict__ packed,
                                    const float* __restrict__ scales,
                                    const float* __restrict__ zeros, T* __restrict__ w, int64_t O,
                                    int64_t I, int64_t gs) {
  const int64_t G = I / gs;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < O * I;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = idx / I, i = idx % I;
    const int64_t run = i / 32, j = i % 32;
    const uint8_t byte = packed[o * (I / 2) + run * 16 + (j & 15)];
    const float q = static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4));
    const int64_t g = i / gs;
    const float z = zeros != nullptr ? zeros[o * G + g] : 8.f;
    w[idx] = from_f<T>((q - z) * scales[o * G + g]);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

cudaError_t int8_gemv(const float* x, const int8_t* qw, const float* scales, const float* bias,
                      float* y, int64_t T, int64_t O, int64_t I, cudaStream_t stream) {
  if (T == 0 || O == 0) return cudaSuccess;
  if (T > kMaxGemvTokens) return cudaErrorInvalidValue;
  const bool vec = I % 16 == 0 && aligned16(qw) && aligned16(x);
  const unsigned grid = static_cast<unsigned>((O + kRowsPerBlock - 1) / kRowsPerBlock);
  const int t = static_cast<int>(T);
#define SS_I8(NT)                                                                              \
  if (vec)                                                                                     \
    int8_gemv_kernel<NT, true><<<grid, kThreads, 0, stream>>>(x, qw, scales, bias, y, t, O, I); \
  else                                                                                         \
    int8_gemv_kernel<NT, false><<<grid, kThreads, 0, stream>>>(x, qw, scales, bias, y, t, O, I)
  if (T == 1) {
    SS_I8(1);
  } else if (T == 2) {
    SS_I8(2);
  } else if (T <= 4) {
    SS_I8(4);
  } else {
    SS_I8(8);
  }
#undef SS_I8
  return cudaGetLastError();
}

cudaError_t int4_gemv(const float* x, const uint8_t* packed, const float* scales,
                      const float* zeros, const float* bias, float* y, int64_t T, int64_t O,
                      int64_t I, int64_t group_size, cudaStream_t stream) {
  if (T == 0 || O == 0) return cudaSuccess;
  if (T > kMaxGemvTokens || group_size <= 0 || group_size % 32 != 0 || I % group_size != 0 ||
      !aligned16(packed) || !aligned16(x))
    return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>((O + kRowsPerBlock - 1) / kRowsPerBlock);
  const int t = static_cast<int>(T);
#define SS_I4(NT) \
  int4_gemv_kernel<NT><<<grid, kThreads, 0, stream>>>(x, packed, scales, zeros, bias, y, t, O, I, group_size)
  if (T == 1) {
    SS_I4(1);
  } else if (T == 2) {
    SS_I4(2);
  } else if (T <= 4) {
    SS_I4(4);
  } else {
    SS_I4(8);
  }
#undef SS_I4
  return cudaGetLastError();
}

cudaError_t int8_dequant(const int8_t* qw, const float* scales, void* w, DType dt, int64_t O,
                         int64_t I, cudaStream_t stream) {
  if (O * I == 0) return cudaSuccess;
  SS_CUDA_DISPATCH(dt, int8_dequant_kernel<T><<<grid_for(O * I, 256), 256, 0, stream>>>(
                           qw, scales, static_cast<T*>(w), O, I));
  return cudaGetLastError();
}

cudaError_t int4_dequant(const uint8_t* packed, const float* scales, const float* zeros, void* w,
                         DType dt, int64_t O, int64_t I, int64_t group_size, cudaStream_t stream) {
  if (O * I == 0) return cudaSuccess;
  SS_CUDA_DISPATCH(dt, int4_dequant_kernel<T><<<grid_for(O * I, 256), 256, 0, stream>>>(
                           packed, scales, zeros, static_cast<T*>(w), O, I, group_size));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shardserve
