// Batched top-k / top-p sampling: one block per row, so a row's token depends only on its own
// logits, parameters and uniform (batch invariance). The stable descending order of each row is
// computed by the caller (torch's segmented sort); the specification is native/reference.py.
#include <climits>

#include "common.cuh"

namespace shardserve {
namespace cuda {
namespace {

constexpr int kThreads = 1024;

// Inclusive prefix sum over the block; *total gets the block's sum. All threads must call.
__device__ __forceinline__ double block_scan(double v, double* warp_tot, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) warp_tot[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < warps ? warp_tot[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    if (lane < warps) warp_tot[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_tot[warp - 1];
  *total = warp_tot[warps - 1];
  return v;
}

__device__ __forceinline__ long long block_min_ll(long long v, long long* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long n = __shfl_xor_sync(0xffffffffu, v, o);
    v = n < v ? n : v;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  long long m = lane < warps ? scratch[lane] : LLONG_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long n = __shfl_xor_sync(0xffffffffu, m, o);
    m = n < m ? n : m;
  }
  return m;
}

__device__ __forceinline__ long long block_max_ll(long long v, long long* scratch) {
  return -block_min_ll(-v, scratch);
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, const int64_t* __restrict__ order,
                  uint8_t* __restrict__ keep, const float* __restrict__ temperature,
                  const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
                  const double* __restrict__ uniforms, int64_t* __restrict__ out, int64_t V) {
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  __shared__ long long lscratch[32];
  const int64_t b = blockIdx.x;
  const float* l = logits + b * V;
  const float temp = temperature[b];

  if (!(temp > 0.f)) {  // greedy: first index of the maximum
    float best = -INFINITY;
    long long bi = LLONG_MAX;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      if (l[i] > best || (l[i] == best && i < bi)) {
        best = l[i];
        bi = i;
      }
    const float m = block_max(best, fscratch);
    const long long idx = block_min_ll(best == m ? bi : LLONG_MAX, lscratch);
    if (threadIdx.x == 0) out[b] = idx == LLONG_MAX ? 0 : idx;
    return;
  }

  const double t = static_cast<double>(temp);
  float lmax = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) lmax = fmaxf(lmax, l[i]);
  const double zmax = static_cast<double>(block_max(lmax, fscratch)) / t;
  const int64_t k = top_k[b];
  const bool use_k = k > 0 && k < V;
  const float tp = top_p[b];
  const bool use_p = tp < 1.f;
  const int64_t* ord = order != nullptr ? order + b * V : nullptr;
  uint8_t* kp = keep + b * V;
  const int64_t K = use_k ? k : V;

  // top-k set (the first K in the sorted order), or everything
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) kp[i] = use_k ? 0 : 1;
  __syncthreads();
  if (use_k)
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) kp[ord[j]] = 1;
  __syncthreads();
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    if (kp[i]) part += exp(static_cast<double>(l[i]) / t - zmax);
  const double norm = block_sum(part, dscratch);

  if (use_p) {  // m = first sorted position j > 0 whose preceding mass is >= top_p (else K)
    double carry = 0.0, chunk_total = 0.0;
    long long m = K;
    for (int64_t c0 = 0; c0 < K; c0 += blockDim.x) {
      const int64_t j = c0 + threadIdx.x;
      const double pj = j < K ? exp(static_cast<double>(l[ord[j]]) / t - zmax) / norm : 0.0;
      const double before = carry + block_scan(pj, dscratch, &chunk_total) - pj;
      const long long cand =
          (j < K && j > 0 && before >= static_cast<double>(tp)) ? static_cast<long long>(j) : LLONG_MAX;
      const long long first = block_min_ll(cand, lscratch);
      if (first != LLONG_MAX) {
        m = first;
        break;
      }
      carry += chunk_total;
    }
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) kp[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) kp[ord[j]] = 1;
    __syncthreads();
  }

  // inverse CDF over kept tokens in index order
  part = 0.0;
  long long last = -1;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    if (kp[i]) {
      part += exp(static_cast<double>(l[i]) / t - zmax) / norm;
      last = i;
    }
  const double total = block_sum(part, dscratch);
  const long long last_kept = block_max_ll(last, lscratch);
  const double target = uniforms[b] * total;
  double carry = 0.0, chunk_total = 0.0;
  long long hit = LLONG_MAX;
  for (int64_t c0 = 0; c0 < V; c0 += blockDim.x) {
    const int64_t i = c0 + threadIdx.x;
    const bool kept = i < V && kp[i];
    const double pi = kept ? exp(static_cast<double>(l[i]) / t - zmax) / norm : 0.0;
    const double cum = carry + block_scan(pi, dscratch, &chunk_total);
    hit = block_min_ll(kept && cum > target ? static_cast<long long>(i) : LLONG_MAX, lscratch);
    if (hit != LLONG_MAX) break;
    carry += chunk_total;
  }
  if (threadIdx.x == 0) out[b] = hit != LLONG_MAX ? hit : (last_kept >= 0 ? last_kept : 0);
}

}  // namespace

cudaError_t sample_top_k_top_p(const float* logits, const int64_t* order, uint8_t* keep,
                               const float* temperature, const int64_t* top_k, const float* top_p,
                               const double* uniforms, int64_t* out, int64_t B, int64_t V,
                               cudaStream_t stream) {
  if (B == 0 || V == 0) return cudaSuccess;
  sample_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, order, keep, temperature,
                                                                     top_k, top_p, uniforms, out, V);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shardserve
