// Paged-attention decode (one query token per sequence), split over context partitions of
// kAttnPartition tokens (flash-decoding): grid (partition, head, sequence) writes an
// unnormalised partial output with its max and sum; a second kernel merges the partitions.
#include "common.cuh"

namespace shardserve {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_partition_kernel(const T* __restrict__ q, const T* __restrict__ kc,
                          const T* __restrict__ vc, const int32_t* __restrict__ tables,
                          const int32_t* __restrict__ lens, const float* __restrict__ alibi,
                          float* __restrict__ part_out, float* __restrict__ part_max,
                          float* __restrict__ part_sum, int H, int Hkv, int D, int bs,
                          int max_blocks, int P, float scale) {
  extern __shared__ float smem[];  // q [D] | weights [kAttnPartition] | reduction scratch [32]
  float* qs = smem;
  float* wt = qs + D;
  float* red = wt + kAttnPartition;
  const int p = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int ctx = lens[b];
  const int t0 = p * kAttnPartition;
  const int64_t pidx = (static_cast<int64_t>(b) * H + h) * P + p;
  if (t0 >= ctx) {  // nothing in this partition (uniform over the block)
    if (threadIdx.x == 0) {
      part_max[pidx] = -INFINITY;
      part_sum[pidx] = 0.f;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) part_out[pidx * D + d] = 0.f;
    return;
  }
  const int t1 = min(ctx, t0 + kAttnPartition);
  const int n = t1 - t0;
  const int kh = h / (H / Hkv);  // query head h reads kv head h / group
  const int32_t* table = tables + static_cast<int64_t>(b) * max_blocks;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    qs[d] = to_f(q[(static_cast<int64_t>(b) * H + h) * D + d]) * scale;
  __syncthreads();

  // scores: one warp per token, lanes across the head dim
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float slope = alibi != nullptr ? alibi[h] : 0.f;
  for (int t = t0 + warp; t < t1; t += kWarps) {
    const int64_t slot = static_cast<int64_t>(table[t / bs]) * bs + t % bs;
    const T* krow = kc + (slot * Hkv + kh) * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += qs[d] * to_f(krow[d]);
    s = warp_sum(s);
    if (lane == 0) wt[t - t0] = s + slope * static_cast<float>(t - (ctx - 1));
  }
  __syncthreads();
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, wt[i]);
  m = block_max(m, red);
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = __expf(wt[i] - m);
    wt[i] = e;
    sum += e;
  }
  sum = block_sum(sum, red);  // its barriers also publish wt

  // values: threads across the head dim, tokens in order
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll 4
    for (int t = t0; t < t1; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / bs]) * bs + t % bs;
      acc += wt[t - t0] * to_f(vc[(slot * Hkv + kh) * D + d]);
    }
    part_out[pidx * D + d] = acc;
  }
  if (threadIdx.x == 0) {
    part_max[pidx] = m;
    part_sum[pidx] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_reduce_kernel(const float* __restrict__ part_out, const float* __restrict__ part_max,
                       const float* __restrict__ part_sum, T* __restrict__ out, int H, int D,
                       int P) {
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t base = (static_cast<int64_t>(b) * H + h) * P;
  float mx = -INFINITY;
  for (int p = 0; p < P; ++p) mx = fmaxf(mx, part_max[base + p]);
  float denom = 0.f;
  for (int p = 0; p < P; ++p)
    if (part_max[base + p] > -INFINITY) denom += part_sum[base + p] * __expf(part_max[base + p] - mx);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < P; ++p)
      if (part_max[base + p] > -INFINITY)
        acc += part_out[(base + p) * D + d] * __expf(part_max[base + p] - mx);
    out[(static_cast<int64_t>(b) * H + h) * D + d] = from_f<T>(denom > 0.f ? acc / denom : 0.f);
  }
}

}  // namespace

cudaError_t paged_attention_decode(const void* q, const void* k_cache, const void* v_cache,
                                   const int32_t* block_tables, const int32_t* context_lens,
                                   const float* alibi, void* out, float* part_out,
                                   float* part_max, float* part_sum, DType dt, int64_t B,
                                   int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                                   int64_t max_blocks, float scale, cudaStream_t stream) {
  if (B == 0 || H == 0 || D == 0) return cudaSuccess;
  if (Hkv <= 0 || H % Hkv != 0 || B > 65535 || H > 65535) return cudaErrorInvalidValue;
  const int P = static_cast<int>((max_blocks * block_size + kAttnPartition - 1) / kAttnPartition);
  const size_t smem = (D + kAttnPartition + 32) * sizeof(float);
  SS_CUDA_DISPATCH(dt, {
    if (P > 0)
      attn_partition_kernel<T><<<dim3(P, H, B), kThreads, smem, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
          block_tables, context_lens, alibi, part_out, part_max, part_sum, static_cast<int>(H),
          static_cast<int>(Hkv), static_cast<int>(D), static_cast<int>(block_size),
          static_cast<int>(max_blocks), P, scale);
    attn_reduce_kernel<T><<<dim3(H, B), kThreads, 0, stream>>>(
        part_out, part_max, part_sum, static_cast<T*>(out), static_cast<int>(H),
        static_cast<int>(D), P);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shardserve
