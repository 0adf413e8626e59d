// Entry points of protoserve's CPU kernels; bindings.cpp exposes them to Python (cpu_kernels.py).
#pragma once

#include <torch/extension.h>

namespace protoserve {

// paged_decode_attention.cpp
torch::Tensor paged_decode_attention(const torch::Tensor& query, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& key_slots,
                                     const torch::Tensor& key_lengths, double scale, int64_t sliding_window);

// decoder_layer_ops.cpp
torch::Tensor rms_norm(const torch::Tensor& input, const torch::Tensor& weight, double epsilon);
torch::Tensor add_rms_norm(const torch::Tensor& hidden_states, const torch::Tensor& delta,
                           const torch::Tensor& weight, double epsilon);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor rotary_write_kv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                              const torch::Tensor& slot_mapping, int64_t num_heads);

}  // namespace protoserve
