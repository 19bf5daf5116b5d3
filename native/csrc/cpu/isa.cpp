// Run-time ISA choice: the build targets a plain x86-64 baseline; faster paths are picked here.
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace shardserve {
namespace cpu {

static Isa detect_uncached() {
  Isa best = Isa::Generic;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
#endif
  const char* cap = std::getenv("SHARDSERVE_ISA");
  if (cap != nullptr) {
    Isa want = best;
    if (std::strcmp(cap, "generic") == 0) want = Isa::Generic;
    if (std::strcmp(cap, "avx2") == 0) want = Isa::Avx2;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa detect_isa() {
  static const Isa isa = detect_uncached();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace shardserve
