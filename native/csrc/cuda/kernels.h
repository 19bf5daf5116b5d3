// Host launchers of the CUDA kernels: raw device pointers, contiguous row-major arrays, the
// caller's stream. Plain C++ (no torch, no CUDA device code), so bindings.cpp can include it.
// Each returns the launch's cudaError_t. Shapes and semantics match native/csrc/cpu/kernels.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace shardserve {
namespace cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Tokens per partition of the split-context attention (flash-decoding style).
constexpr int kAttnPartition = 512;

// q [B,H,D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
// context_lens [B] int32; alibi [H] fp32 or null; out [B,H,D]. Workspace (fp32):
// part_out [B,H,P,D], part_max [B,H,P], part_sum [B,H,P], P = ceil(max_blocks*block_size/512).
cudaError_t paged_attention_decode(const void* q, const void* k_cache, const void* v_cache,
                                   const int32_t* block_tables, const int32_t* context_lens,
                                   const float* alibi, void* out, float* part_out,
                                   float* part_max, float* part_sum, DType dt, int64_t B,
                                   int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                                   int64_t max_blocks, float scale, cudaStream_t stream);

cudaError_t fused_add_rms_norm(const void* x, const void* residual, const void* weight, void* out,
                               void* residual_out, DType dt, int64_t T, int64_t N, float eps,
                               cudaStream_t stream);

cudaError_t fused_add_layer_norm(const void* x, const void* residual, const void* weight,
                                 const void* bias, void* out, void* residual_out, DType dt,
                                 int64_t T, int64_t N, float eps, cudaStream_t stream);

// cos_sin [max_pos, rot_dim] is fp32 (cs_is_f32) or of dtype dt; caches [num_slots, Hkv, D].
cudaError_t rotary_cache_write(const void* q, const void* k, const void* v,
                               const int64_t* positions, const void* cos_sin, bool cs_is_f32,
                               void* q_out, void* k_out, void* k_cache, void* v_cache,
                               const int64_t* slot_mapping, DType dt, int64_t T, int64_t H,
                               int64_t Hkv, int64_t D, int64_t rot_dim, bool is_neox,
                               cudaStream_t stream);

// Small-T weight-only GEMV: x fp32 [T,I], y fp32 [T,O]; T <= kMaxGemvTokens.
constexpr int kMaxGemvTokens = 8;
cudaError_t int8_gemv(const float* x, const int8_t* qw, const float* scales, const float* bias,
                      float* y, int64_t T, int64_t O, int64_t I, cudaStream_t stream);
cudaError_t int4_gemv(const float* x, const uint8_t* packed, const float* scales,
                      const float* zeros, const float* bias, float* y, int64_t T, int64_t O,
                      int64_t I, int64_t group_size, cudaStream_t stream);

// Dequantise to w [O, I] of dtype dt (for large T, followed by a cuBLAS matmul).
cudaError_t int8_dequant(const int8_t* qw, const float* scales, void* w, DType dt, int64_t O,
                         int64_t I, cudaStream_t stream);
cudaError_t int4_dequant(const uint8_t* packed, const float* scales, const float* zeros, void* w,
                         DType dt, int64_t O, int64_t I, int64_t group_size, cudaStream_t stream);

// logits [B,V] fp32; order [B,V] int64 = stable descending argsort of each row (may be null when
// no row filters); keep [B,V] uint8 scratch; temperature, top_p fp32 [B]; top_k int64 [B];
// uniforms fp64 [B]; out int64 [B]. Same specification as native/reference.py.
cudaError_t sample_top_k_top_p(const float* logits, const int64_t* order, uint8_t* keep,
                               const float* temperature, const int64_t* top_k, const float* top_p,
                               const double* uniforms, int64_t* out, int64_t B, int64_t V,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace shardserve
