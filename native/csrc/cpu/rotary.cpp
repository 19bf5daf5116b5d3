// Rotary embedding on q and k, fused with writing k and v into their paged-cache slots.
#include <type_traits>

#include "kernels.h"

namespace shardserve {
namespace cpu {
namespace {

// Rotates one head (D values at src+off) into dst; dims >= rot_dim are copied unchanged.
template <DType DT, DType CS>
SS_INLINE void rotate_head(const void* src, void* dst, int64_t off, const void* cs, int64_t cs_off,
                           int64_t D, int64_t rot, bool neox) {
  const int64_t half = rot / 2;
  if (neox) {  // pairs (i, i + half)
    for (int64_t i = 0; i < half; ++i) {
      const float c = load_f<CS>(cs, cs_off + i), s = load_f<CS>(cs, cs_off + half + i);
      const float x1 = load_f<DT>(src, off + i), x2 = load_f<DT>(src, off + half + i);
      store_f<DT>(dst, off + i, x1 * c - x2 * s);
      store_f<DT>(dst, off + half + i, x2 * c + x1 * s);
    }
  } else {  // interleaved pairs (2i, 2i + 1), GPT-J
    for (int64_t i = 0; i < half; ++i) {
      const float c = load_f<CS>(cs, cs_off + i), s = load_f<CS>(cs, cs_off + half + i);
      const float x1 = load_f<DT>(src, off + 2 * i), x2 = load_f<DT>(src, off + 2 * i + 1);
      store_f<DT>(dst, off + 2 * i, x1 * c - x2 * s);
      store_f<DT>(dst, off + 2 * i + 1, x2 * c + x1 * s);
    }
  }
  for (int64_t d = rot; d < D; ++d) store_f<DT>(dst, off + d, load_f<DT>(src, off + d));
}

template <DType DT, DType CS>
SS_INLINE void rotary_all(const void* q, const void* k, const void* v, const int64_t* pos,
                          const void* cs, void* q_out, void* k_out, void* kc, void* vc,
                          const int64_t* slots, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                          int64_t rot, bool neox) {
  using E = typename std::conditional<DT == DType::F32, float, uint16_t>::type;
#pragma omp parallel for schedule(static) if (T * (H + Hkv) * D >= (1 << 16))
  for (int64_t t = 0; t < T; ++t) {
    const int64_t cs_off = pos[t] * rot;
    for (int64_t h = 0; h < H; ++h) rotate_head<DT, CS>(q, q_out, (t * H + h) * D, cs, cs_off, D, rot, neox);
    for (int64_t h = 0; h < Hkv; ++h) rotate_head<DT, CS>(k, k_out, (t * Hkv + h) * D, cs, cs_off, D, rot, neox);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const E* ko = static_cast<const E*>(k_out) + t * Hkv * D;
    const E* vi = static_cast<const E*>(v) + t * Hkv * D;
    E* kd = static_cast<E*>(kc) + slot * Hkv * D;
    E* vd = static_cast<E*>(vc) + slot * Hkv * D;
    for (int64_t i = 0; i < Hkv * D; ++i) {
      kd[i] = ko[i];
      vd[i] = vi[i];
    }
  }
}

#define SS_ROT_ARGS                                                                            \
  const void *q, const void *k, const void *v, const int64_t *pos, const void *cs, DType cs_dt, \
      void *q_out, void *k_out, void *kc, void *vc, const int64_t *slots, DType dt, int64_t T,  \
      int64_t H, int64_t Hkv, int64_t D, int64_t rot, bool neox
#define SS_ROT_CALL                                                                          \
  if (cs_dt == DType::F32) {                                                                 \
    SS_DISPATCH_DTYPE(dt, rotary_all<DT, DType::F32>(q, k, v, pos, cs, q_out, k_out, kc, vc,   \
                                                     slots, T, H, Hkv, D, rot, neox))        \
  } else {                                                                                   \
    SS_DISPATCH_DTYPE(dt, rotary_all<DT, DT>(q, k, v, pos, cs, q_out, k_out, kc, vc, slots, T, \
                                             H, Hkv, D, rot, neox))                          \
  }
SS_TARGET_AVX512 void rot_avx512(SS_ROT_ARGS) { SS_ROT_CALL }
SS_TARGET_AVX2 void rot_avx2(SS_ROT_ARGS) { SS_ROT_CALL }
void rot_generic(SS_ROT_ARGS) { SS_ROT_CALL }

}  // namespace

void rotary_cache_write(const void* q, const void* k, const void* v, const int64_t* positions,
                        const void* cos_sin, DType cs_dt, void* q_out, void* k_out, void* k_cache,
                        void* v_cache, const int64_t* slot_mapping, DType dt, int64_t T,
                        int64_t H, int64_t Hkv, int64_t D, int64_t rot_dim, bool is_neox) {
  switch (detect_isa()) {
    case Isa::Avx512:
      rot_avx512(q, k, v, positions, cos_sin, cs_dt, q_out, k_out, k_cache, v_cache, slot_mapping,
                 dt, T, H, Hkv, D, rot_dim, is_neox);
      break;
    case Isa::Avx2:
      rot_avx2(q, k, v, positions, cos_sin, cs_dt, q_out, k_out, k_cache, v_cache, slot_mapping, dt,
               T, H, Hkv, D, rot_dim, is_neox);
      break;
    default:
      rot_generic(q, k, v, positions, cos_sin, cs_dt, q_out, k_out, k_cache, v_cache, slot_mapping,
                  dt, T, H, Hkv, D, rot_dim, is_neox);
  }
}

}  // namespace cpu
}  // namespace shardserve
