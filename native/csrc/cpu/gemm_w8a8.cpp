// w8a8 linear layer: dynamic per-token int8 activations x per-output-channel int8 weights, int32
// accumulation, dequantised by row scale x column scale (spec: native/reference.py, w8a8_linear).
//
// Exact integer maths: each product of two int8 values in [-127, 127] is summed in int32. The AVX2
// path sign-extends both operands to int16 and uses _mm256_madd_epi16 (pairs of int16 products into
// int32: |2 * 127 * 127| = 32258 fits, nothing saturates; _mm256_maddubs_epi16 with an unsigned
// offset would saturate its int16 pair sums at 2 * 255 * 127). Activations are quantized once per
// call into an int16 buffer (rows padded to a multiple of 16 with zeros); weights stay int8 [O, I]
// and are widened in registers, so batch-1 decode reads one byte per weight. No AVX-512 / VNNI
// path yet (none can run on this project's CI machines): those CPUs run the AVX2 code.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

constexpr int64_t kBlockRows = 16;  // weight rows per work item (reused from L1 by every token tile)
// Tokens per register tile. AVX2 has 16 registers: 2 rows x 4 tokens = 8 accumulators + 2 weight
// vectors + 1 input keeps everything in registers (2 x 6 spilled 16 accumulator loads/stores per
// step of 16 inputs in GCC's code).
constexpr int kTileTokens = 4;

SS_INLINE int64_t padded(int64_t I) { return (I + 15) / 16 * 16; }

// ---------------------------------------------------------------- activation quantization
// s = max(amax / 127, 1e-12); q = round_half_even(x / s) clamped to [-127, 127]: true division and
// rounding in fp32, as torch does, so the codes are bit-identical to the reference's.
SS_INLINE float row_scale(float amax) { return std::max(amax / 127.0f, 1e-12f); }

SS_INLINE int16_t quant_one(float x, float s) {
  float q = std::nearbyint(x / s);  // default rounding mode: to nearest, ties to even
  q = std::min(127.0f, std::max(-127.0f, q));
  return static_cast<int16_t>(q);
}

void quantize_rows_generic(const float* x, int16_t* q, float* s, int64_t T, int64_t I, int64_t Ip) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * I;
    float amax = 0.f;
    for (int64_t i = 0; i < I; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float sc = row_scale(amax);
    s[t] = sc;
    int16_t* qr = q + t * Ip;
    for (int64_t i = 0; i < I; ++i) qr[i] = quant_one(xr[i], sc);
    for (int64_t i = I; i < Ip; ++i) qr[i] = 0;
  }
}

SS_TARGET_AVX2 void quantize_rows_avx2(const float* x, int16_t* q, float* s, int64_t T, int64_t I,
                                       int64_t Ip) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * I;
    __m256 m = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    for (; i < I; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float sc = row_scale(amax);
    s[t] = sc;
    const __m256 sv = _mm256_set1_ps(sc);
    int16_t* qr = q + t * Ip;
    i = 0;
    for (; i + 8 <= I; i += 8) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(xr + i), sv);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
      const __m256i w = _mm256_cvtps_epi32(v);  // exact: v is already an integer
      const __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), p);
    }
    for (; i < I; ++i) qr[i] = quant_one(xr[i], sc);
    for (; i < Ip; ++i) qr[i] = 0;
  }
}

void quantize_rows(const float* x, int16_t* q, float* s, int64_t T, int64_t I, int64_t Ip, Isa isa) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(I, 1));
#pragma omp parallel for schedule(static) if (T * I >= (1 << 16))
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    if (isa != Isa::Generic)
      quantize_rows_avx2(x + t0 * I, q + t0 * Ip, s + t0, n, I, Ip);
    else
      quantize_rows_generic(x + t0 * I, q + t0 * Ip, s + t0, n, I, Ip);
  }
}

// ---------------------------------------------------------------- int32 dot products
// acc[r * NT + t] = sum_i xq[t, i] * w[r, i] over i < I. xq rows have Ip (= I rounded up to 16)
// int16 entries, zero beyond I; w rows have I int8 entries.
template <int R, int NT>
SS_TARGET_AVX2 void dot_tile_avx2(const int16_t* xq, int64_t Ip, const int8_t* w, int64_t I,
                                  int32_t* acc) {
  __m256i a[R][NT];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 6
    for (int t = 0; t < NT; ++t) a[r][t] = _mm256_setzero_si256();
  const int64_t I16 = I / 16 * 16;
  for (int64_t i = 0; i < I16; i += 16) {
    __m256i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * I + i)));
#pragma GCC unroll 6
    for (int t = 0; t < NT; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * Ip + i));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r][t] = _mm256_add_epi32(a[r][t], _mm256_madd_epi16(xv, wv[r]));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 6
    for (int t = 0; t < NT; ++t) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a[r][t]), _mm256_extracti128_si256(a[r][t], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
      int32_t v = _mm_cvtsi128_si32(s);
      for (int64_t j = I16; j < I; ++j) v += static_cast<int32_t>(xq[t * Ip + j]) * w[r * I + j];
      acc[r * NT + t] = v;
    }
}

// One token, one row: a single sequential weight stream (batch-1 decode is bound by that read),
// two accumulators over alternating 16-wide steps.
SS_TARGET_AVX2 int32_t dot_row_avx2(const int16_t* xq, const int8_t* w, int64_t I) {
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16)));
    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i)), w0));
    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i + 16)), w1));
  }
  for (; i + 16 <= I; i += 16) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i)), w0));
  }
  a0 = _mm256_add_epi32(a0, a1);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  int32_t v = _mm_cvtsi128_si32(s);
  for (; i < I; ++i) v += static_cast<int32_t>(xq[i]) * w[i];
  return v;
}

SS_INLINE void dot_generic(const int16_t* xq, int64_t Ip, const int8_t* w, int64_t I, int64_t rows,
                           int64_t nt, int32_t* acc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < nt; ++t) {
      int32_t v = 0;
      const int16_t* xr = xq + t * Ip;
      const int8_t* wr = w + r * I;
      for (int64_t i = 0; i < I; ++i) v += static_cast<int32_t>(xr[i]) * wr[i];
      acc[r * nt + t] = v;
    }
}

// rows (<= 4) x nt (<= kTileTokens) dot products: acc[r * nt + t].
SS_TARGET_AVX2 void dot_avx2(const int16_t* xq, int64_t Ip, const int8_t* w, int64_t I, int64_t rows,
                             int64_t nt, int32_t* acc) {
  if (nt == 1) {
    for (int64_t r = 0; r < rows; ++r) acc[r] = dot_row_avx2(xq, w + r * I, I);
    return;
  }
  if (rows == 4 && nt == 2) return dot_tile_avx2<4, 2>(xq, Ip, w, I, acc);
  if (rows >= 2 && rows % 2 == 0) {
    int32_t tmp[2 * kTileTokens];
    for (int64_t r0 = 0; r0 < rows; r0 += 2) {
      switch (nt) {
#define SS_W8_CASE(N) case N: dot_tile_avx2<2, N>(xq, Ip, w + r0 * I, I, tmp); break;
        SS_W8_CASE(1) SS_W8_CASE(2) SS_W8_CASE(3) SS_W8_CASE(4)
#undef SS_W8_CASE
      }
      for (int64_t r = 0; r < 2; ++r)
        for (int64_t t = 0; t < nt; ++t) acc[(r0 + r) * nt + t] = tmp[r * nt + t];
    }
    return;
  }
  int32_t tmp[kTileTokens];
  for (int64_t r = 0; r < rows; ++r) {
    switch (nt) {
#define SS_W8_CASE(N) case N: dot_tile_avx2<1, N>(xq, Ip, w + r * I, I, tmp); break;
      SS_W8_CASE(1) SS_W8_CASE(2) SS_W8_CASE(3) SS_W8_CASE(4)
#undef SS_W8_CASE
    }
    for (int64_t t = 0; t < nt; ++t) acc[r * nt + t] = tmp[t];
  }
}

// y = (float(acc) * xs) * ws + b, rounded step by step as the reference (no fused multiply-add).
__attribute__((noinline, optimize("fp-contract=off"))) void dequant_store(
    const int32_t* acc, const float* xs, const float* ws, const float* bias, float* y, int64_t O,
    int64_t o0, int64_t rows, int64_t t0, int64_t nt) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < nt; ++t) {
      float v = static_cast<float>(acc[r * nt + t]) * xs[t0 + t];
      v = v * ws[o0 + r];
      if (bias) v = v + bias[o0 + r];
      y[(t0 + t) * O + o0 + r] = v;
    }
}

// For every block of kBlockRows weight rows (in parallel): every token tile, 4 (or 2) rows at a
// time; `sink(acc, o0, rows, t0, nt)` receives acc[r * nt + t].
template <typename Sink>
void gemm_blocks(const int16_t* xq, int64_t Ip, const int8_t* qw, int64_t T, int64_t O, int64_t I,
                 Isa isa, Sink&& sink) {
  const int64_t nblk = (O + kBlockRows - 1) / kBlockRows;
#pragma omp parallel for schedule(static) if (O * I * std::max<int64_t>(T, 4) >= (1 << 18))
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t b0 = b * kBlockRows, b1 = std::min(O, b0 + kBlockRows);
    int32_t acc[4 * kTileTokens];
    for (int64_t t0 = 0; t0 < T; t0 += kTileTokens) {
      const int64_t nt = std::min<int64_t>(kTileTokens, T - t0);
      for (int64_t o0 = b0; o0 < b1; o0 += 4) {
        const int64_t rows = std::min<int64_t>(4, b1 - o0);
        if (isa != Isa::Generic)
          dot_avx2(xq + t0 * Ip, Ip, qw + o0 * I, I, rows, nt, acc);
        else
          dot_generic(xq + t0 * Ip, Ip, qw + o0 * I, I, rows, nt, acc);
        sink(acc, o0, rows, t0, nt);
      }
    }
  }
}

}  // namespace

void quantize_rows_int8(const float* x, int8_t* q, float* scales, int64_t T, int64_t I) {
  const int64_t Ip = padded(I);
  std::vector<int16_t> buf(static_cast<size_t>(T * Ip));
  quantize_rows(x, buf.data(), scales, T, I, Ip, detect_isa());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) q[t * I + i] = static_cast<int8_t>(buf[t * Ip + i]);
}

void int8_gemm(const int8_t* qx, const int8_t* qw, int32_t* out, int64_t T, int64_t O, int64_t I) {
  const int64_t Ip = padded(I);
  std::vector<int16_t> xq(static_cast<size_t>(T * Ip), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) xq[t * Ip + i] = qx[t * I + i];
  gemm_blocks(xq.data(), Ip, qw, T, O, I, detect_isa(),
              [&](const int32_t* acc, int64_t o0, int64_t rows, int64_t t0, int64_t nt) {
                for (int64_t r = 0; r < rows; ++r)
                  for (int64_t t = 0; t < nt; ++t) out[(t0 + t) * O + o0 + r] = acc[r * nt + t];
              });
}

void w8a8_linear(const float* x, const int8_t* qw, const float* scales, const float* bias, float* y,
                 int64_t T, int64_t O, int64_t I) {
  const Isa isa = detect_isa();
  const int64_t Ip = padded(I);
  std::vector<int16_t> xq(static_cast<size_t>(T * Ip));
  std::vector<float> xs(static_cast<size_t>(T));
  quantize_rows(x, xq.data(), xs.data(), T, I, Ip, isa);
  gemm_blocks(xq.data(), Ip, qw, T, O, I, isa,
              [&](const int32_t* acc, int64_t o0, int64_t rows, int64_t t0, int64_t nt) {
                dequant_store(acc, xs.data(), scales, bias, y, O, o0, rows, t0, nt);
              });
}

}  // namespace cpu
}  // namespace shardserve
