// Raw-pointer entry points of the CPU kernels (bound to torch in bindings.cpp).
// All arrays are contiguous row-major; shapes are given in the comments.
#pragma once

#include <cstdint>

#include "common.h"

namespace shardserve {
namespace cpu {

// out[B,H,D] = softmax(scale * q.K^T + alibi) V over the context of each sequence, K/V read
// through block tables. caches: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks];
// context_lens[B] counts the current token. alibi: [H] or null. H % Hkv == 0.
void paged_attention_decode(const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* block_tables, const int32_t* context_lens,
                            const float* alibi, void* out, DType dt, int64_t B, int64_t H,
                            int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                            float scale);

// residual_out = x + residual (or x); out = rmsnorm(residual_out) * weight, per row of N.
// residual may be null. x, residual, weight, out, residual_out: [T, N] ([N] for weight).
void fused_add_rms_norm(const void* x, const void* residual, const void* weight, void* out,
                        void* residual_out, DType dt, int64_t T, int64_t N, float eps);

// Same with LayerNorm: out = (r - mean) / sqrt(var + eps) * weight + bias; bias may be null.
void fused_add_layer_norm(const void* x, const void* residual, const void* weight,
                          const void* bias, void* out, void* residual_out, DType dt, int64_t T,
                          int64_t N, float eps);

// Rotary on the first rot_dim dims of q[T,H,D], k[T,Hkv,D] into q_out, k_out, then k_out and
// v[T,Hkv,D] written to flat cache slots (slot < 0: skipped). cos_sin: [max_pos, rot_dim],
// cos half then sin half, of dtype cs_dt (F32 or dt). caches: [num_slots, Hkv, D].
void rotary_cache_write(const void* q, const void* k, const void* v, const int64_t* positions,
                        const void* cos_sin, DType cs_dt, void* q_out, void* k_out, void* k_cache,
                        void* v_cache, const int64_t* slot_mapping, DType dt, int64_t T,
                        int64_t H, int64_t Hkv, int64_t D, int64_t rot_dim, bool is_neox);

// y[T,O] = (x[T,I] . qw[O,I]^T) * scales[O] + bias[O]; bias may be null. Weight-only int8.
void int8_linear(const float* x, const int8_t* qw, const float* scales, const float* bias,
                 float* y, int64_t T, int64_t O, int64_t I);

// y[T,O] = x . W^T + bias, W[o,i] = (q[o,i] - zero[o,g]) * scale[o,g], g = i / group_size.
// packed[O, I/2]: in every run of 32 weights, byte j holds weight j (low nibble) and j+16 (high).
// scales, zeros: [O, I/group_size] fp32; zeros null means 8 (symmetric). group_size % 32 == 0.
// I is the packed width: a layer whose in_features the group does not divide is padded (weights
// and, in bindings.cpp, the inputs with zeros) to the next multiple of the group.
void int4_linear(const float* x, const uint8_t* packed, const float* scales, const float* zeros,
                 const float* bias, float* y, int64_t T, int64_t O, int64_t I, int64_t group_size);

// w8a8: dynamic per-row int8 activations. q[t,i] = round_half_even(x[t,i] / s[t]) clamped to
// [-127, 127], s[t] = max(amax_i |x[t,i]| / 127, 1e-12) (fp32 division, as torch).
void quantize_rows_int8(const float* x, int8_t* q, float* scales, int64_t T, int64_t I);
// acc[T,O] = qx[T,I] . qw[O,I]^T in int32 (exact).
void int8_gemm(const int8_t* qx, const int8_t* qw, int32_t* acc, int64_t T, int64_t O, int64_t I);
// y[T,O] = (float(acc[t,o]) * s_x[t]) * scales[o] + bias[o], acc from the two above; bias may be null.
void w8a8_linear(const float* x, const int8_t* qw, const float* scales, const float* bias, float* y,
                 int64_t T, int64_t O, int64_t I);

// W[O,I] fp32 from the int8 / int4 forms above (for rows [o0, o1)); used for large T.
void int8_dequant(const int8_t* qw, const float* scales, float* w, int64_t o0, int64_t o1,
                  int64_t I);
void int4_dequant(const uint8_t* packed, const float* scales, const float* zeros, float* w,
                  int64_t o0, int64_t o1, int64_t I, int64_t group_size);

// One token per row of logits[B,V]. temperature <= 0: greedy (first argmax). Otherwise top_k
// (0 = off) then top_p (>= 1 = off) filtering, then the inverse CDF at uniforms[b] in [0,1),
// walking kept tokens in index order. Spec and torch twin: native/reference.py.
void sample_top_k_top_p(const float* logits, const float* temperature, const int64_t* top_k,
                        const float* top_p, const double* uniforms, int64_t* out, int64_t B,
                        int64_t V);

}  // namespace cpu
}  // namespace shardserve
