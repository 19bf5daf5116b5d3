// Shared helpers for the CPU kernels. No torch headers here: these files compile in seconds.
// Every kernel computes in fp32 and converts at load/store, whatever the activation dtype.
#pragma once

#include <cstdint>
#include <cstring>

namespace shardserve {
namespace cpu {

// Activation / cache element type, as passed from the bindings.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Instruction sets we dispatch between at run time (never -march=native at build time).
enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

// Best ISA this CPU and this build can run; SHARDSERVE_ISA=generic|avx2|avx512 caps it.
Isa detect_isa();
const char* isa_name(Isa isa);

#define SS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define SS_INLINE inline __attribute__((always_inline))

SS_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
SS_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

SS_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN kept quiet (same as torch's c10::BFloat16 conversion).
SS_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float in software (fp16 on CPU is rare; correctness over speed).
SS_INLINE float f16_to_f32(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // subnormal half: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

SS_INLINE uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a < 0x38800000u) {  // result is subnormal (or zero) in half
    // add 0.5 as magic so the FPU rounds to nearest even at 2^-24 granularity
    float v = bits_to_f32(a) + 0.5f;
    return static_cast<uint16_t>(sign | (f32_to_bits(v) - 0x3f000000u));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (a >> 13));
}

// Typed load/store of one element as float.
template <DType DT>
SS_INLINE float load_f(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == DType::BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

template <DType DT>
SS_INLINE void store_f(void* p, int64_t i, float v) {
  if constexpr (DT == DType::F32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (DT == DType::BF16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  }
}

// Value after a round trip through DT (what torch stores for an fp32 result of dtype DT).
template <DType DT>
SS_INLINE float round_to(float v) {
  if constexpr (DT == DType::F32) {
    return v;
  } else if constexpr (DT == DType::BF16) {
    return bf16_to_f32(f32_to_bf16(v));
  } else {
    return f16_to_f32(f32_to_f16(v));
  }
}

// Runs the statement(s) with `DT` bound to the run-time dtype as a constant.
#define SS_DISPATCH_DTYPE(dt, ...)                                         \
  switch (dt) {                                                            \
    case ::shardserve::cpu::DType::F32: {                                  \
      constexpr ::shardserve::cpu::DType DT = ::shardserve::cpu::DType::F32; \
      __VA_ARGS__;                                                         \
    } break;                                                               \
    case ::shardserve::cpu::DType::BF16: {                                 \
      constexpr ::shardserve::cpu::DType DT = ::shardserve::cpu::DType::BF16; \
      __VA_ARGS__;                                                         \
    } break;                                                               \
    case ::shardserve::cpu::DType::F16: {                                  \
      constexpr ::shardserve::cpu::DType DT = ::shardserve::cpu::DType::F16; \
      __VA_ARGS__;                                                         \
    } break;                                                               \
  }

}  // namespace cpu
}  // namespace shardserve
