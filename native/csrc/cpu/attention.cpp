// Paged-attention decode: one query token per sequence, K/V gathered through block tables.
// Work item = (sequence, kv head): the H/Hkv query heads of a group share each K/V row read.
// fp32 with D % 16 == 0 on AVX-512 (attend_f32_avx512) and D % 8 == 0 on AVX2 (attend_f32_avx2) has
// its own path: work item = (sequence, run of kv heads), so each position's K/V row [Hkv, D] is read as
// one contiguous stream, and the softmax's exp runs on vectors (a polynomial, ~2e-7 relative).
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

SS_TARGET_AVX2 SS_INLINE float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

SS_TARGET_AVX2 SS_INLINE float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

void softmax_rows_avx512(float* sc, int64_t n, int64_t ctx, float* inv);
void softmax_rows_avx2(float* sc, int64_t n, int64_t ctx, float* inv);

// The fp32 fast path's vector operations, one struct per ISA (L lanes). Each is compiled for its ISA
// and inlined (flatten) into that ISA's softmax and attend functions, so one body of each serves both.
struct Avx512F {
  static constexpr int64_t L = 16;
  static constexpr float kExpMin = -104.f;  // exp is 0 in fp32 below; scalef underflows to it exactly
  using V = __m512;
  SS_TARGET_AVX512 static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  SS_TARGET_AVX512 static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  SS_TARGET_AVX512 static inline V set1(float f) { return _mm512_set1_ps(f); }
  SS_TARGET_AVX512 static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  SS_TARGET_AVX512 static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  SS_TARGET_AVX512 static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  SS_TARGET_AVX512 static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  SS_TARGET_AVX512 static inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  SS_TARGET_AVX512 static inline V round(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  SS_TARGET_AVX512 static inline V times_pow2(V y, V n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
  SS_TARGET_AVX512 static inline float sum(V v) { return _mm512_reduce_add_ps(v); }
  static void softmax(float* sc, int64_t n, int64_t ctx, float* inv) { softmax_rows_avx512(sc, n, ctx, inv); }
};

struct Avx2F {
  static constexpr int64_t L = 8;
  static constexpr float kExpMin = -87.33654f;  // ln(FLT_MIN): n >= -126 keeps 2^n a normal float
  using V = __m256;
  SS_TARGET_AVX2 static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  SS_TARGET_AVX2 static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  SS_TARGET_AVX2 static inline V set1(float f) { return _mm256_set1_ps(f); }
  SS_TARGET_AVX2 static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  SS_TARGET_AVX2 static inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  SS_TARGET_AVX2 static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  SS_TARGET_AVX2 static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  SS_TARGET_AVX2 static inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  SS_TARGET_AVX2 static inline V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  SS_TARGET_AVX2 static inline V times_pow2(V y, V n) {  // y * 2^n, 2^n built in the exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  SS_TARGET_AVX2 static inline float sum(V v) { return hsum_avx2(v); }
  static void softmax(float* sc, int64_t n, int64_t ctx, float* inv) { softmax_rows_avx2(sc, n, ctx, inv); }
};

// exp(x) on a vector, x <= 0 (scores minus their row max): Cephes' expf (x = n ln2 + r, |r| <= ln2/2,
// degree-5 polynomial for (e^r - 1 - r) / r^2, then times 2^n); relative error ~2e-7, the order of
// libm's. Below S::kExpMin the result is 0 (AVX-512) or FLT_MIN-small (AVX2): nothing a softmax sees.
template <class S>
inline typename S::V exp_nonpos(typename S::V x) {
  x = S::max(x, S::set1(S::kExpMin));  // also no NaN from -inf
  const auto n = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  auto r = S::fnmadd(n, S::set1(0.693359375f), x);
  r = S::fnmadd(n, S::set1(-2.12194440e-4f), r);
  auto y = S::set1(1.9875691500e-4f);
  y = S::fmadd(y, r, S::set1(1.3981999507e-3f));
  y = S::fmadd(y, r, S::set1(8.3334519073e-3f));
  y = S::fmadd(y, r, S::set1(4.1665795894e-2f));
  y = S::fmadd(y, r, S::set1(1.6666665459e-1f));
  y = S::fmadd(y, r, S::set1(5.0000001201e-1f));
  y = S::fmadd(y, S::mul(r, r), S::add(r, S::set1(1.f)));
  return S::times_pow2(y, n);
}

// softmax_rows with 16 lanes: the same unnormalised exp(s - row max) in place and inv = 1 / row sum.
__attribute__((flatten)) SS_TARGET_AVX512 void softmax_rows_avx512(float* sc, int64_t n, int64_t ctx, float* inv) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; ++i) {
    float* s = sc + i * ctx;
    __m512 m = ninf;
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
    const __mmask16 tail = static_cast<__mmask16>((1u << (ctx - t)) - 1u);
    if (tail) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(ninf, tail, s + t));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= ctx; t += 16) {
      const __m512 e = exp_nonpos<Avx512F>(_mm512_sub_ps(_mm512_loadu_ps(s + t), mx));
      _mm512_storeu_ps(s + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = exp_nonpos<Avx512F>(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), mx));
      _mm512_mask_storeu_ps(s + t, tail, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    const float total = _mm512_reduce_add_ps(sum);
    inv[i] = total > 0.f ? 1.f / total : 0.f;
  }
}

// softmax_rows with 8 lanes (the tail of each row scalar, through the same exp).
__attribute__((flatten)) SS_TARGET_AVX2 void softmax_rows_avx2(float* sc, int64_t n, int64_t ctx, float* inv) {
  for (int64_t i = 0; i < n; ++i) {
    float* s = sc + i * ctx;
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 8 <= ctx; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    float mx = hmax_avx2(m);
    for (int64_t u = t; u < ctx; ++u) mx = s[u] > mx ? s[u] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= ctx; t += 8) {
      const __m256 e = exp_nonpos<Avx2F>(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
      _mm256_storeu_ps(s + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum_avx2(sum);
    for (; t < ctx; ++t) {
      alignas(32) float lane[8];
      _mm256_store_ps(lane, exp_nonpos<Avx2F>(_mm256_set1_ps(s[t] - mx)));
      s[t] = lane[0];
      total += lane[0];
    }
    inv[i] = total > 0.f ? 1.f / total : 0.f;
  }
}

// One sequence, kv heads [k0, k1): scores, softmax and the weighted V sum, fp32, D % S::L == 0.
// buf: qf[n*D] | acc[n*D] | scores[n*ctx] | inv[n] with n = (k1 - k0) * G query heads.
template <class S>
inline void attend_f32(const float* q, const float* kc, const float* vc, const int32_t* table, int64_t ctx,
                       const float* alibi, float* out, int64_t b, int64_t k0, int64_t k1, int64_t H,
                       int64_t Hkv, int64_t D, int64_t bs, float scale, std::vector<float>& buf) {
  constexpr int64_t L = S::L;
  const int64_t G = H / Hkv, n = (k1 - k0) * G, h0 = k0 * G, row = Hkv * D;
  buf.resize(static_cast<size_t>(2 * n * D + n * ctx + n));
  float* qf = buf.data();
  float* acc = qf + n * D;
  float* sc = acc + n * D;
  const auto vs = S::set1(scale);
  for (int64_t j = 0; j < n * D; j += L) {
    S::store(qf + j, S::mul(S::load(q + (b * H + h0) * D + j), vs));
    S::store(acc + j, S::set1(0.f));
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
        auto a = S::mul(S::load(qh), S::load(kh));
        for (int64_t d = L; d < D; d += L) a = S::fmadd(S::load(qh + d), S::load(kh + d), a);
        float sv = S::sum(a);
        if (alibi) sv += alibi[h0 + i] * static_cast<float>(t - (ctx - 1));
        sc[i * ctx + t] = sv;
      }
    }
  }
  float* inv = sc + n * ctx;
  S::softmax(sc, n, ctx, inv);
  // pass 2: weighted sum of V
  for (int64_t blk = 0, t = 0; blk < nblk; ++blk) {
    const float* vb = vc + static_cast<int64_t>(table[blk]) * bs * row + k0 * D;
    for (int64_t o = 0; o < bs && t < ctx; ++o, ++t) {
      const float* vr = vb + o * row;
      for (int64_t i = 0; i < n; ++i) {
        const float* vh = vr + (i / G) * D;
        float* ah = acc + i * D;
        const auto pw = S::set1(sc[i * ctx + t]);
        for (int64_t d = 0; d < D; d += L) S::store(ah + d, S::fmadd(pw, S::load(vh + d), S::load(ah + d)));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const auto w = S::set1(inv[i]);
    for (int64_t d = 0; d < D; d += L)
      S::store(out + (b * H + h0 + i) * D + d, S::mul(S::load(acc + i * D + d), w));
  }
}

#define SS_ATTEND_F32_ARGS                                                                                  \
  const float *q, const float *kc, const float *vc, const int32_t *table, int64_t ctx, const float *alibi, \
      float *out, int64_t b, int64_t k0, int64_t k1, int64_t H, int64_t Hkv, int64_t D, int64_t bs,        \
      float scale, std::vector<float> &buf
#define SS_ATTEND_F32_CALL(S) attend_f32<S>(q, kc, vc, table, ctx, alibi, out, b, k0, k1, H, Hkv, D, bs, scale, buf)

__attribute__((flatten)) SS_TARGET_AVX512 void attend_f32_avx512(SS_ATTEND_F32_ARGS) { SS_ATTEND_F32_CALL(Avx512F); }
__attribute__((flatten)) SS_TARGET_AVX2 void attend_f32_avx2(SS_ATTEND_F32_ARGS) { SS_ATTEND_F32_CALL(Avx2F); }

using AttendF32 = void (*)(const float*, const float*, const float*, const int32_t*, int64_t, const float*,
                           float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                           std::vector<float>&);

// The fp32 fast paths: work item = (sequence, run of kv heads), enough items to keep every thread
// busy, each as many whole kv heads as that allows.
void attention_f32_runs(AttendF32 attend, const float* q, const float* kc, const float* vc,
                        const int32_t* tables, const int32_t* lens, const float* alibi, float* out,
                        int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                        float scale) {
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
      attend(q, kc, vc, tables + b * max_blocks, lens[b], alibi, out, b, k0, k1, H, Hkv, D, bs, scale, buf);
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
        attention_f32_runs(attend_f32_avx512, static_cast<const float*>(q), static_cast<const float*>(k_cache),
                           static_cast<const float*>(v_cache), block_tables, context_lens, alibi,
                           static_cast<float*>(out), B, H, Hkv, D, block_size, max_blocks, scale);
        break;
      }
      attention_avx512(q, k_cache, v_cache, block_tables, context_lens, alibi, out, dt, B, H, Hkv,
                       D, block_size, max_blocks, scale);
      break;
    case Isa::Avx2:
      if (dt == DType::F32 && D % 8 == 0) {
        attention_f32_runs(attend_f32_avx2, static_cast<const float*>(q), static_cast<const float*>(k_cache),
                           static_cast<const float*>(v_cache), block_tables, context_lens, alibi,
                           static_cast<float*>(out), B, H, Hkv, D, block_size, max_blocks, scale);
        break;
      }
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
