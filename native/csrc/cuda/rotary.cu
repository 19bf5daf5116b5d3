// Rotary embedding on q and k fused with writing k and v into their paged-cache slots.
// One block per token; threads over (head, rotated pair).
#include "common.cuh"

namespace shardserve {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename CS>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const int64_t* __restrict__ positions, const CS* __restrict__ cos_sin,
                  T* __restrict__ q_out, T* __restrict__ k_out, T* __restrict__ k_cache,
                  T* __restrict__ v_cache, const int64_t* __restrict__ slots, int H, int Hkv,
                  int D, int rot, bool neox) {
  const int64_t t = blockIdx.x;
  const int half = rot / 2;
  const CS* cs = cos_sin + positions[t] * rot;  // cos [half] then sin [half]
  const int64_t slot = slots[t];
  const int heads = H + Hkv;
  // rotated pairs of every q and k head
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const bool is_q = head < H;
    const int64_t off = is_q ? (t * H + head) * D : (t * Hkv + (head - H)) * D;
    const T* src = is_q ? q + off : k + off;
    T* dst = is_q ? q_out + off : k_out + off;
    const int i1 = neox ? i : 2 * i;
    const int i2 = neox ? i + half : 2 * i + 1;
    const float c = to_f(cs[i]), s = to_f(cs[half + i]);
    const float x1 = to_f(src[i1]), x2 = to_f(src[i2]);
    const T o1 = from_f<T>(x1 * c - x2 * s), o2 = from_f<T>(x2 * c + x1 * s);
    dst[i1] = o1;
    dst[i2] = o2;
    if (!is_q && slot >= 0) {
      T* kd = k_cache + (slot * Hkv + (head - H)) * D;
      kd[i1] = o1;
      kd[i2] = o2;
    }
  }
  // dims past rot_dim pass through
  const int rest = D - rot;
  for (int idx = threadIdx.x; idx < heads * rest; idx += blockDim.x) {
    const int head = idx / rest, d = rot + idx % rest;
    const bool is_q = head < H;
    const int64_t off = is_q ? (t * H + head) * D : (t * Hkv + (head - H)) * D;
    const T val = is_q ? q[off + d] : k[off + d];
    if (is_q) {
      q_out[off + d] = val;
    } else {
      k_out[off + d] = val;
      if (slot >= 0) k_cache[(slot * Hkv + (head - H)) * D + d] = val;
    }
  }
  if (slot >= 0)
    for (int idx = threadIdx.x; idx < Hkv * D; idx += blockDim.x)
      v_cache[slot * Hkv * D + idx] = v[t * Hkv * D + idx];
}

}  // namespace

cudaError_t rotary_cache_write(const void* q, const void* k, const void* v,
                               const int64_t* positions, const void* cos_sin, bool cs_is_f32,
                               void* q_out, void* k_out, void* k_cache, void* v_cache,
                               const int64_t* slot_mapping, DType dt, int64_t T_, int64_t H,
                               int64_t Hkv, int64_t D, int64_t rot_dim, bool is_neox,
                               cudaStream_t stream) {
  if (T_ == 0) return cudaSuccess;
  if (rot_dim <= 0 || rot_dim % 2 != 0 || rot_dim > D) return cudaErrorInvalidValue;
#define SS_ROT_LAUNCH(CS)                                                                        \
  rotary_kernel<T, CS><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(                      \
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), positions,   \
      static_cast<const CS*>(cos_sin), static_cast<T*>(q_out), static_cast<T*>(k_out),           \
      static_cast<T*>(k_cache), static_cast<T*>(v_cache), slot_mapping, static_cast<int>(H),     \
      static_cast<int>(Hkv), static_cast<int>(D), static_cast<int>(rot_dim), is_neox)
  SS_CUDA_DISPATCH(dt, {
    if (cs_is_f32) {
      SS_ROT_LAUNCH(float);
    } else {
      SS_ROT_LAUNCH(T);
    }
  });
#undef SS_ROT_LAUNCH
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace shardserve
