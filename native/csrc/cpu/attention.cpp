// Paged-attention decode: one query token per sequence, K/V gathered through block tables.
// Work item = (sequence, kv head): the H/Hkv query heads of a group share each K/V row read.
// fp32 on AVX-512 with D % 16 == 0 has its own path (attend_f32_avx512): work item = (sequence,
// run of kv heads), so each position's K/V row [Hkv, D] is read as one contiguous stream.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

template <DType DT>
SS_INLINE float dot_q(const float* q, const void* k, int64_t off, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += q[d] * load_f<DT>(k, off + d);
  return s;
}

template <DType DT>
SS_INLINE void axpy_v(float p, const void* v, int64_t off, float* acc, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += p * load_f<DT>(v, off + d);
}

// Softmax of each score row [n, ctx], kept unnormalised: s = exp(s - row max) in place, and
// inv[i] = 1 / row sum (0 for a row with no mass); the weighted V sum is scaled by inv at the end.
SS_INLINE void softmax_rows(float* sc, int64_t n, int64_t ctx, float* inv) {
  for (int64_t i = 0; i < n; ++i) {
    float* s = sc + i * ctx;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) m = s[t] > m ? s[t] : m;
    float sum = 0.f;
    for (int64_t t = 0; t < ctx; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    inv[i] = sum > 0.f ? 1.f / sum : 0.f;
  }
}

template <DType DT>
SS_INLINE void attend_group(const void* q, const void* kc, const void* vc, const int32_t* table,
                            int64_t ctx, const float* alibi, void* out, int64_t b, int64_t kh,
                            int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale,
                            std::vector<float>& buf) {
  const int64_t G = H / Hkv;
  const int64_t h0 = kh * G;
  // buf: qf[G*D] | acc[G*D] | scores[G*ctx] | inv[G]
  buf.resize(static_cast<size_t>(2 * G * D + G * ctx + G));
  float* qf = buf.data();
  float* acc = qf + G * D;
  float* sc = acc + G * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) {
      qf[g * D + d] = load_f<DT>(q, (b * H + h0 + g) * D + d) * scale;
      acc[g * D + d] = 0.f;
    }
  // pass 1: scores; rows of the cache are [slot, Hkv, D]
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / bs]) * bs + t % bs;
    const int64_t off = (slot * Hkv + kh) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = dot_q<DT>(qf + g * D, kc, off, D);
      if (alibi) s += alibi[h0 + g] * static_cast<float>(t - (ctx - 1));
      sc[g * ctx + t] = s;
    }
  }
  float* inv = sc + G * ctx;
  softmax_rows(sc, G, ctx, inv);
  // pass 2: weighted sum of V
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / bs]) * bs + t % bs;
    const int64_t off = (slot * Hkv + kh) * D;
    for (int64_t g = 0; g < G; ++g) axpy_v<DT>(sc[g * ctx + t], vc, off, acc + g * D, D);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d)
      store_f<DT>(out, (b * H + h0 + g) * D + d, acc[g * D + d] * inv[g]);
}

template <DType DT>
SS_INLINE void attention_all(const void* q, const void* kc, const void* vc, const int32_t* tables,
                             const int32_t* lens, const float* alibi, void* out, int64_t B,
                             int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                             float scale) {
  const int64_t items = B * Hkv;
#pragma omp parallel
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / Hkv, kh = it % Hkv;
      const int64_t ctx = lens[b];
      if (ctx <= 0) {
        for (int64_t g = 0; g < H / Hkv; ++g)
          for (int64_t d = 0; d < D; ++d) store_f<DT>(out, (b * H + kh * (H / Hkv) + g) * D + d, 0.f);
        continue;
      }
      attend_group<DT>(q, kc, vc, tables + b * max_blocks, ctx, alibi, out, b, kh, H, Hkv, D, bs,
                       scale, buf);
    }
  }
}

// One sequence, kv heads [k0, k1): scores, softmax and the weighted V sum, fp32, D % 16 == 0.
// buf: qf[n*D] | acc[n*D] | scores[n*ctx] | inv[n] with n = (k1 - k0) * G query heads.
SS_TARGET_AVX512 void attend_f32_avx512(const float* q, const float* kc, const float* vc,
                                        const int32_t* table, int64_t ctx, const float* alibi,
                                        float* out, int64_t b, int64_t k0, int64_t k1, int64_t H,
                                        int64_t Hkv, int64_t D, int64_t bs, float scale,
                                        std::vector<float>& buf) {
  const int64_t G = H / Hkv, n = (k1 - k0) * G, h0 = k0 * G, row = Hkv * D;
  buf.resize(static_cast<size_t>(2 * n * D + n * ctx + n));
  float* qf = buf.data();
  float* acc = qf + n * D;
  float* sc = acc + n * D;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n * D; j += 16) {
    _mm512_storeu_ps(qf + j, _mm512_mul_ps(_mm512_loadu_ps(q + (b * H + h0) * D + j), vs));
    _mm512_storeu_ps(acc + j, _mm512_setzero_ps());
  }
  const int64_t nblk = (ctx + bs - 1) / bs;
  // pass 1: scores, position by position (the block's rows are contiguous in the cache)
  for (int64_t blk = 0, t = 0; blk < nblk; ++blk) {
    const float* kb = kc + static_cast<int64_t>(table[blk]) * bs * row + k0 * D;
    for (int64_t o = 0; o < bs && t < ctx; ++o, ++t) {
      const float* kr = kb + o * row;
      for (int64_t i = 0; i < n; ++i) {
        const float* kh = kr + (i / G) * D;
        const float* qh = qf + i * D;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kh));
        for (int64_t d = 16; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), _mm512_loadu_ps(kh + d), a);
        float s = _mm512_reduce_add_ps(a);
        if (alibi) s += alibi[h0 + i] * static_cast<float>(t - (ctx - 1));
        sc[i * ctx + t] = s;
      }
    }
  }
  float* inv = sc + n * ctx;
  softmax_rows(sc, n, ctx, inv);
  // pass 2: weighted sum of V
  for (int64_t blk = 0, t = 0; blk < nblk; ++blk) {
    const float* vb = vc + static_cast<int64_t>(table[blk]) * bs * row + k0 * D;
    for (int64_t o = 0; o < bs && t < ctx; ++o, ++t) {
      const float* vr = vb + o * row;
      for (int64_t i = 0; i < n; ++i) {
        const float* vh = vr + (i / G) * D;
        float* ah = acc + i * D;
        const __m512 p = _mm512_set1_ps(sc[i * ctx + t]);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(ah + d, _mm512_fmadd_ps(p, _mm512_loadu_ps(vh + d), _mm512_loadu_ps(ah + d)));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const __m512 w = _mm512_set1_ps(inv[i]);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(out + (b * H + h0 + i) * D + d, _mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), w));
  }
}

SS_TARGET_AVX512 void attention_f32_avx512(const float* q, const float* kc, const float* vc,
                                           const int32_t* tables, const int32_t* lens,
                                           const float* alibi, float* out, int64_t B, int64_t H,
                                           int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                                           float scale) {
  // enough items to keep every thread busy, each as many whole kv heads as that allows
  const int64_t want = 4 * static_cast<int64_t>(omp_get_max_threads());
  const int64_t parts = std::min<int64_t>(Hkv, std::max<int64_t>(1, (want + B - 1) / B));
  const int64_t per = (Hkv + parts - 1) / parts;
  const int64_t items = B * parts;
#pragma omp parallel
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / parts, k0 = (it % parts) * per, k1 = std::min(Hkv, k0 + per);
      if (k0 >= k1) continue;
      if (lens[b] <= 0) {
        std::fill(out + (b * H + k0 * (H / Hkv)) * D, out + (b * H + k1 * (H / Hkv)) * D, 0.f);
        continue;
      }
      attend_f32_avx512(q, kc, vc, tables + b * max_blocks, lens[b], alibi, out, b, k0, k1, H, Hkv,
                        D, bs, scale, buf);
    }
  }
}

#define SS_ATTN_ARGS                                                                          \
  const void *q, const void *kc, const void *vc, const int32_t *tables, const int32_t *lens,  \
      const float *alibi, void *out, DType dt, int64_t B, int64_t H, int64_t Hkv, int64_t D, \
      int64_t bs, int64_t mb, float scale
#define SS_ATTN_CALL \
  SS_DISPATCH_DTYPE(dt, attention_all<DT>(q, kc, vc, tables, lens, alibi, out, B, H, Hkv, D, bs, mb, scale))

SS_TARGET_AVX512 void attention_avx512(SS_ATTN_ARGS) { SS_ATTN_CALL }
SS_TARGET_AVX2 void attention_avx2(SS_ATTN_ARGS) { SS_ATTN_CALL }
void attention_generic(SS_ATTN_ARGS) { SS_ATTN_CALL }

}  // namespace

void paged_attention_decode(const void* q, const void* k_cache, const void* v_cache,
                            const int32_t* block_tables, const int32_t* context_lens,
                            const float* alibi, void* out, DType dt, int64_t B, int64_t H,
                            int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                            float scale) {
  switch (detect_isa()) {
    case Isa::Avx512:
      if (dt == DType::F32 && D % 16 == 0) {
        attention_f32_avx512(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                             static_cast<const float*>(v_cache), block_tables, context_lens, alibi,
                             static_cast<float*>(out), B, H, Hkv, D, block_size, max_blocks, scale);
        break;
      }
      attention_avx512(q, k_cache, v_cache, block_tables, context_lens, alibi, out, dt, B, H, Hkv,
                       D, block_size, max_blocks, scale);
      break;
    case Isa::Avx2:
      attention_avx2(q, k_cache, v_cache, block_tables, context_lens, alibi, out, dt, B, H, Hkv, D,
                     block_size, max_blocks, scale);
      break;
    default:
      attention_generic(q, k_cache, v_cache, block_tables, context_lens, alibi, out, dt, B, H, Hkv,
                        D, block_size, max_blocks, scale);
  }
}

}  // namespace cpu
}  // namespace shardserve
