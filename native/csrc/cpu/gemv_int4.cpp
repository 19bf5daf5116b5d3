// Weight-only int4 linear layer with group-wise scales and zero points (layout: kernels.h). Same
// row-block / token-tile structure as gemv_int8.cpp; nibbles are widened to fp32 in registers.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

#ifndef SS_INT4_ROWS
#define SS_INT4_ROWS 1
#endif
// Weight rows per kernel call: consecutive rows, read as one sequential stream.
constexpr int64_t kRows = SS_INT4_ROWS;
constexpr int64_t kTokens = 4;  // tokens per pass over a row block (held in registers)

// ---------------------------------------------------------------- int4
// Per token and group: xsum[t, g] = sum of x over the group, so that
// sum_i x_i (q_i - z) s = s * (sum_i x_i q_i - z * xsum).

SS_INLINE float int4_at(const uint8_t* row, int64_t i) {
  const int64_t c = i >> 5, j = i & 31;
  const uint8_t b = row[c * 16 + (j & 15)];
  return static_cast<float>(j < 16 ? (b & 15) : (b >> 4));
}

SS_INLINE void int4_row_generic(const float* x, const float* xsum, const uint8_t* row,
                                const float* s, const float* z, int64_t I, int64_t gs,
                                float* out) {
  const int64_t G = I / gs;
  float total = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    float d = 0.f;
    for (int64_t i = g * gs; i < (g + 1) * gs; ++i) d += x[i] * int4_at(row, i);
    total += s[g] * (d - (z ? z[g] : 8.f) * xsum[g]);
  }
  *out = total;
}

template <int NT>
SS_TARGET_AVX512 void int4_block_avx512(const float* x, const float* xsum, const uint8_t* w,
                                        const float* s, const float* z, int64_t I, int64_t gs,
                                        float* acc) {
  // w: kRows rows of I/2 bytes; s, z: kRows rows of G. acc[r*NT + t].
  const int64_t G = I / gs;
  const __m512i lo_mask = _mm512_set1_epi32(0x0f);
  __m512 a[kRows][NT];
  float corr[kRows][NT];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      a[r][t] = _mm512_setzero_ps();
      corr[r][t] = 0.f;
    }
  for (int64_t g = 0; g < G; ++g) {
    // four independent chains per (row, token): low / high nibbles of two consecutive runs
    __m512 d[4][kRows][NT];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) d[c][r][t] = _mm512_setzero_ps();
    const float* xg = x + g * gs;
    const uint8_t* wg = w + g * gs / 2;
    int64_t i = 0;
    for (; i < gs; i += 64) {  // gs is a multiple of 32; a trailing single run is handled below
      const bool two = i + 64 <= gs;
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* wr = wg + r * (I / 2) + i / 2;
        const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr)));
        const __m512 w00 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, lo_mask));
        const __m512 w01 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4));
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          d[0][r][t] = _mm512_fmadd_ps(w00, _mm512_loadu_ps(xg + t * I + i), d[0][r][t]);
          d[1][r][t] = _mm512_fmadd_ps(w01, _mm512_loadu_ps(xg + t * I + i + 16), d[1][r][t]);
        }
        if (two) {
          const __m512i v1 =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 16)));
          const __m512 w10 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, lo_mask));
          const __m512 w11 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4));
#pragma GCC unroll 4
          for (int t = 0; t < NT; ++t) {
            d[2][r][t] = _mm512_fmadd_ps(w10, _mm512_loadu_ps(xg + t * I + i + 32), d[2][r][t]);
            d[3][r][t] = _mm512_fmadd_ps(w11, _mm512_loadu_ps(xg + t * I + i + 48), d[3][r][t]);
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const float sg = s[r * G + g];
      const float zg = z ? z[r * G + g] : 8.f;
      const __m512 sv = _mm512_set1_ps(sg);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m512 dd = _mm512_add_ps(_mm512_add_ps(d[0][r][t], d[1][r][t]), _mm512_add_ps(d[2][r][t], d[3][r][t]));
        a[r][t] = _mm512_fmadd_ps(dd, sv, a[r][t]);
        corr[r][t] += sg * zg * xsum[t * G + g];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[r * NT + t] = _mm512_reduce_add_ps(a[r][t]) - corr[r][t];
}

template <int NT>
SS_TARGET_AVX2 void int4_block_avx2(const float* x, const float* xsum,
                                              const uint8_t* w, const float* s, const float* z,
                                              int64_t I, int64_t gs, float* acc) {
  const int64_t G = I / gs;
  const __m256i lo_mask = _mm256_set1_epi32(0x0f);
  __m256 a[kRows][NT];
  float corr[kRows][NT];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      a[r][t] = _mm256_setzero_ps();
      corr[r][t] = 0.f;
    }
  for (int64_t g = 0; g < G; ++g) {
    __m256 d0[kRows][NT], d1[kRows][NT];  // low / high nibble halves: independent FMA chains
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) d0[r][t] = d1[r][t] = _mm256_setzero_ps();
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 32) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // bytes [8h, 8h+8): weights 8h.. (low) and 16+8h.. (high)
        __m256 x0[NT], x1[NT];
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          x0[t] = _mm256_loadu_ps(x + t * I + i + 8 * h);
          x1[t] = _mm256_loadu_ps(x + t * I + i + 16 + 8 * h);
        }
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          __m128i b = _mm_loadl_epi64(
              reinterpret_cast<const __m128i*>(w + r * (I / 2) + i / 2 + 8 * h));
          __m256i v = _mm256_cvtepu8_epi32(b);
          __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, lo_mask));
          __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#pragma GCC unroll 4
          for (int t = 0; t < NT; ++t) {
            d0[r][t] = _mm256_fmadd_ps(w0, x0[t], d0[r][t]);
            d1[r][t] = _mm256_fmadd_ps(w1, x1[t], d1[r][t]);
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const float sg = s[r * G + g];
      const float zg = z ? z[r * G + g] : 8.f;
      const __m256 sv = _mm256_set1_ps(sg);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        a[r][t] = _mm256_fmadd_ps(_mm256_add_ps(d0[r][t], d1[r][t]), sv, a[r][t]);
        corr[r][t] += sg * zg * xsum[t * G + g];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a[r][t]), _mm256_extractf128_ps(a[r][t], 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
      acc[r * NT + t] = _mm_cvtss_f32(s4) - corr[r][t];
    }
}

template <Isa ISA>
SS_INLINE void int4_tile(const float* xt, const float* xst, const uint8_t* w, const float* s,
                         const float* z, int64_t I, int64_t gs, float* acc, int64_t nt,
                         int64_t rows) {
  const int64_t G = I / gs;
  if constexpr (ISA != Isa::Generic) {
    if (rows == kRows) {
#define SS_I4_CASE(N)                                                                    \
  case N:                                                                                \
    if constexpr (ISA == Isa::Avx512) int4_block_avx512<N>(xt, xst, w, s, z, I, gs, acc); \
    else int4_block_avx2<N>(xt, xst, w, s, z, I, gs, acc);                               \
    return;
      switch (nt) {
        SS_I4_CASE(1)
        SS_I4_CASE(2)
        SS_I4_CASE(3)
        SS_I4_CASE(4)
      }
#undef SS_I4_CASE
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < nt; ++t)
      int4_row_generic(xt + t * I, xst + t * G, w + r * (I / 2), s + r * G,
                       z ? z + r * G : nullptr, I, gs, &acc[r * nt + t]);
}

template <Isa ISA>
SS_INLINE void int4_all(const float* x, const uint8_t* packed, const float* scales,
                        const float* zeros, const float* bias, float* y, int64_t T, int64_t O,
                        int64_t I, int64_t gs) {
  const int64_t G = I / gs;
  std::vector<float> xsum(static_cast<size_t>(T * G));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) s += x[t * I + i];
      xsum[t * G + g] = s;
    }
  const float* xs = xsum.data();
  const int64_t nblk = (O + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (O * I >= (1 << 17))
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t o0 = b * kRows;
    const int64_t rows = std::min(kRows, O - o0);
    const uint8_t* w = packed + o0 * (I / 2);
    const float* s = scales + o0 * G;
    const float* z = zeros ? zeros + o0 * G : nullptr;
    float acc[kRows * kTokens];
    for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
      const int64_t nt = std::min(kTokens, T - t0);
      const float* xt = x + t0 * I;
      const float* xst = xs + t0 * G;
      int4_tile<ISA>(xt, xst, w, s, z, I, gs, acc, nt, rows);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < nt; ++t)
          y[(t0 + t) * O + o0 + r] = acc[r * nt + t] + (bias ? bias[o0 + r] : 0.f);
    }
  }
}

SS_TARGET_AVX512 void int4_avx512(const float* x, const uint8_t* p, const float* s,
                                  const float* z, const float* b, float* y, int64_t T, int64_t O,
                                  int64_t I, int64_t gs) {
  int4_all<Isa::Avx512>(x, p, s, z, b, y, T, O, I, gs);
}
SS_TARGET_AVX2 void int4_avx2(const float* x, const uint8_t* p, const float* s, const float* z,
                              const float* b, float* y, int64_t T, int64_t O, int64_t I,
                              int64_t gs) {
  int4_all<Isa::Avx2>(x, p, s, z, b, y, T, O, I, gs);
}
void int4_generic(const float* x, const uint8_t* p, const float* s, const float* z,
                  const float* b, float* y, int64_t T, int64_t O, int64_t I, int64_t gs) {
  int4_all<Isa::Generic>(x, p, s, z, b, y, T, O, I, gs);
}
}  // namespace

void int4_linear(const float* x, const uint8_t* packed, const float* scales, const float* zeros,
                 const float* bias, float* y, int64_t T, int64_t O, int64_t I,
                 int64_t group_size) {
  switch (detect_isa()) {
    case Isa::Avx512: int4_avx512(x, packed, scales, zeros, bias, y, T, O, I, group_size); break;
    case Isa::Avx2: int4_avx2(x, packed, scales, zeros, bias, y, T, O, I, group_size); break;
    default: int4_generic(x, packed, scales, zeros, bias, y, T, O, I, group_size);
  }
}
void int4_dequant(const uint8_t* packed, const float* scales, const float* zeros, float* w,
                  int64_t o0, int64_t o1, int64_t I, int64_t group_size) {
  const int64_t G = I / group_size;
#pragma omp parallel for schedule(static)
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = packed + o * (I / 2);
    float* dst = w + (o - o0) * I;
    for (int64_t run = 0; run < I / 32; ++run) {  // a run never straddles a group
      const int64_t g = run * 32 / group_size;
      const float s = scales[o * G + g];
      const float m = -(zeros ? zeros[o * G + g] : 8.f) * s;  // w = q * s + m
      const uint8_t* b = row + run * 16;
      float* d = dst + run * 32;
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        d[j] = static_cast<float>(b[j] & 15) * s + m;
        d[j + 16] = static_cast<float>(b[j] >> 4) * s + m;
      }
    }
  }
}
}  // namespace cpu
}  // namespace shardserve
