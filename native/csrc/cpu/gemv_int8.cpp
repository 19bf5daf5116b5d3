// Weight-only int8 linear layer: y = (x . qw^T) * scale + bias. Batch-1 decode is bound by reading
// the weight once, so each thread streams its rows once, sequentially, and serves up to kTokens
// tokens from registers; AVX-512 / AVX2 / portable versions are chosen at run time.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

#ifndef SS_INT8_ROWS
#define SS_INT8_ROWS 1
#endif
// Weight rows per kernel call: consecutive rows, read as one sequential stream.
constexpr int64_t kRows = SS_INT8_ROWS;
constexpr int64_t kPrefetch = 1024;  // bytes ahead of the weight read (AVX-512 path)
constexpr int64_t kTokens = 8;  // tokens per pass over a row block (held in registers; AVX2: 4)

// ---------------------------------------------------------------- int8, generic
template <int NT>
SS_INLINE void int8_block_generic(const float* x, const int8_t* w, float* acc, int64_t rows,
                                  int64_t I) {
  // acc[r*NT + t] = sum_i x[t,i] * w[r,i]
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* wr = w + r * I;
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * I;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < I; ++i) s += xt[i] * static_cast<float>(wr[i]);
      acc[r * NT + t] = s;
    }
  }
}

// ---------------------------------------------------------------- int8, AVX2 / AVX-512
// R rows (consecutive, so the weight read is one sequential stream) x NT tokens, two accumulator
// sets over alternating vectors so that FMA latency never limits the stream.
template <int R, int NT>
SS_TARGET_AVX2 void int8_block_avx2(const float* x, const int8_t* w, float* acc, int64_t I) {
  __m256 a[2][R][NT];
#pragma GCC unroll 2
  for (int u = 0; u < 2; ++u)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[u][r][t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      __m256 xv[NT];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * I + i + 8 * u);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * I + i + 8 * u));
        __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) a[u][r][t] = _mm256_fmadd_ps(wv, xv[t], a[u][r][t]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const __m256 v = _mm256_add_ps(a[0][r][t], a[1][r][t]);
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
      float s = _mm_cvtss_f32(s4);
      for (int64_t j = i; j < I; ++j) s += x[t * I + j] * static_cast<float>(w[r * I + j]);
      acc[r * NT + t] = s;
    }
  }
}

template <int R, int NT>
SS_TARGET_AVX512 void int8_block_avx512(const float* x, const int8_t* w, float* acc, int64_t I) {
  // accumulator sets over consecutive 16-wide vectors: U * R * NT of the 32 registers
  constexpr int U = NT <= 4 ? 4 : 1;
  __m512 a[U][R][NT];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[u][r][t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= I; i += 16 * U) {
    // software prefetch a kPrefetch bytes ahead on each row stream: the hardware prefetcher alone
    // left batch-1 decode at ~12 GB/s of the ~21 GB/s these machines read (17 GB/s with it)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * I + i) + kPrefetch, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * I + i + 16 * u));
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t)
          a[u][r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * I + i + 16 * u), a[u][r][t]);
      }
    }
  }
  for (; i + 16 <= I; i += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * I + i));
      __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[0][r][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * I + i), a[0][r][t]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      __m512 v = a[0][r][t];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) v = _mm512_add_ps(v, a[u][r][t]);
      float s = _mm512_reduce_add_ps(v);
      for (int64_t j = i; j < I; ++j) s += x[t * I + j] * static_cast<float>(w[r * I + j]);
      acc[r * NT + t] = s;
    }
  }
}

// Dot products of one row block against up to kTokens tokens: acc[r*nt + t].
template <Isa ISA>
SS_INLINE void int8_tile(const float* xt, const int8_t* w, float* acc, int64_t nt, int64_t rows,
                         int64_t I) {
  if constexpr (ISA != Isa::Generic) {
    if (rows == kRows) {
      if constexpr (ISA == Isa::Avx512) {
        switch (nt) {
#define SS_I8_CASE(N) case N: int8_block_avx512<kRows, N>(xt, w, acc, I); return;
          SS_I8_CASE(1) SS_I8_CASE(2) SS_I8_CASE(3) SS_I8_CASE(4)
          SS_I8_CASE(5) SS_I8_CASE(6) SS_I8_CASE(7) SS_I8_CASE(8)
#undef SS_I8_CASE
        }
      } else {
        // AVX2 has 16 registers: up to 4 tokens per pass, so 5-8 tokens take two passes
        auto pass = [&](const float* xp, float* out, int64_t n) {
          switch (n) {
#define SS_I8_CASE(N) case N: int8_block_avx2<kRows, N>(xp, w, out, I); break;
            SS_I8_CASE(1) SS_I8_CASE(2) SS_I8_CASE(3) SS_I8_CASE(4)
#undef SS_I8_CASE
          }
        };
        if (nt <= 4) {
          pass(xt, acc, nt);
          return;
        }
        float lo[kRows * 4], hi[kRows * 4];
        pass(xt, lo, 4);
        pass(xt + 4 * I, hi, nt - 4);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t t = 0; t < nt; ++t)
            acc[r * nt + t] = t < 4 ? lo[r * 4 + t] : hi[r * (nt - 4) + t - 4];
        return;
      }
    }
  }
  float tmp[kRows];
  for (int64_t t = 0; t < nt; ++t) {
    int8_block_generic<1>(xt + t * I, w, tmp, rows, I);
    for (int64_t r = 0; r < rows; ++r) acc[r * nt + t] = tmp[r];
  }
}

// One row block [o0, o0+rows) against all T tokens, writing y.
template <Isa ISA>
SS_INLINE void int8_rows(const float* x, const int8_t* qw, const float* scales, const float* bias,
                         float* y, int64_t T, int64_t O, int64_t I, int64_t o0, int64_t rows) {
  float acc[kRows * kTokens];
  for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
    const int64_t nt = std::min(kTokens, T - t0);
    int8_tile<ISA>(x + t0 * I, qw + o0 * I, acc, nt, rows, I);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < nt; ++t)
        y[(t0 + t) * O + o0 + r] = acc[r * nt + t] * scales[o0 + r] + (bias ? bias[o0 + r] : 0.f);
  }
}

template <Isa ISA>
SS_INLINE void int8_all(const float* x, const int8_t* qw, const float* scales, const float* bias,
                        float* y, int64_t T, int64_t O, int64_t I) {
  const int64_t nblk = (O + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (O * I >= (1 << 16))
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t o0 = b * kRows;
    int8_rows<ISA>(x, qw, scales, bias, y, T, O, I, o0, std::min(kRows, O - o0));
  }
}

SS_TARGET_AVX512 void int8_avx512(const float* x, const int8_t* qw, const float* scales,
                                  const float* bias, float* y, int64_t T, int64_t O, int64_t I) {
  int8_all<Isa::Avx512>(x, qw, scales, bias, y, T, O, I);
}
SS_TARGET_AVX2 void int8_avx2(const float* x, const int8_t* qw, const float* scales,
                              const float* bias, float* y, int64_t T, int64_t O, int64_t I) {
  int8_all<Isa::Avx2>(x, qw, scales, bias, y, T, O, I);
}
void int8_generic(const float* x, const int8_t* qw, const float* scales, const float* bias,
                  float* y, int64_t T, int64_t O, int64_t I) {
  int8_all<Isa::Generic>(x, qw, scales, bias, y, T, O, I);
}
}  // namespace

void int8_linear(const float* x, const int8_t* qw, const float* scales, const float* bias,
                 float* y, int64_t T, int64_t O, int64_t I) {
  switch (detect_isa()) {
    case Isa::Avx512: int8_avx512(x, qw, scales, bias, y, T, O, I); break;
    case Isa::Avx2: int8_avx2(x, qw, scales, bias, y, T, O, I); break;
    default: int8_generic(x, qw, scales, bias, y, T, O, I);
  }
}
void int8_dequant(const int8_t* qw, const float* scales, float* w, int64_t o0, int64_t o1,
                  int64_t I) {
#pragma omp parallel for schedule(static)
  for (int64_t o = o0; o < o1; ++o) {
    const float s = scales[o];
    const int8_t* q = qw + o * I;
    float* dst = w + (o - o0) * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) dst[i] = static_cast<float>(q[i]) * s;
  }
}
}  // namespace cpu
}  // namespace shardserve
