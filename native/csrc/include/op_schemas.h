// Schemas of the torch.ops.shardserve operators, defined once (TORCH_LIBRARY in
// ../cpu/bindings.cpp); the CPU and CUDA libraries register implementations of these names.
// Keep in step with native/reference.py and native/ops.py.
#pragma once

namespace shardserve {
namespace schema {

constexpr const char* kPagedAttentionDecode =
    "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor context_lens, float scale, Tensor? alibi_slopes) -> Tensor";
constexpr const char* kFusedAddRmsNorm =
    "fused_add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)";
constexpr const char* kFusedAddLayerNorm =
    "fused_add_layer_norm(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) -> "
    "(Tensor, Tensor)";
constexpr const char* kRotaryCacheWrite =
    "rotary_cache_write(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, bool is_neox, int rot_dim) -> "
    "(Tensor, Tensor)";
constexpr const char* kInt8Linear = "int8_linear(Tensor x, Tensor qw, Tensor scales, Tensor? bias) -> Tensor";
constexpr const char* kInt4Linear =
    "int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size) -> Tensor";
constexpr const char* kW8A8Linear = "w8a8_linear(Tensor x, Tensor qw, Tensor scales, Tensor? bias) -> Tensor";
constexpr const char* kQuantizeRowsInt8 = "quantize_rows_int8(Tensor x) -> (Tensor, Tensor)";
constexpr const char* kInt8Gemm = "int8_gemm(Tensor qx, Tensor qw) -> Tensor";
constexpr const char* kSampleTopKTopP =
    "sample_top_k_top_p(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
    "Tensor uniforms) -> Tensor";
constexpr const char* kIsa = "isa() -> str";  // CPU ISA in use; no tensors, so not dispatched

// Every operator with a per-device implementation (the w8a8 three: CPU only so far).
constexpr const char* kDeviceOps[] = {kPagedAttentionDecode, kFusedAddRmsNorm, kFusedAddLayerNorm,
                                      kRotaryCacheWrite,     kInt8Linear,      kInt4Linear,
                                      kW8A8Linear,           kQuantizeRowsInt8, kInt8Gemm,
                                      kSampleTopKTopP};

}  // namespace schema
}  // namespace shardserve
