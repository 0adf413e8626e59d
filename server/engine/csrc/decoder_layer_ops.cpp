// The small per-layer ops of a Llama-shaped decoder, each in one pass, for the lean forward
// (fast_decoder.py). In torch each is several ops (RMSNorm: to, pow, mean, add, rsqrt, mul, to, mul,
// after the residual add; rotary and the cache write: slices, neg, cat, mul, mul, add for q and for
// k, transposes, two index_copy_; the MLP's activation: empty, silu, mul), and at a few rows per
// step their dispatch costs more than their arithmetic.
//
// The library is built with -ffp-contract=off, so each float product and sum is rounded as torch
// rounds it: in float32 the rotary results equal torch's bit for bit; RMSNorm's sum of squares is
// added in another order, and SiLU's exponential is this file's own (vectorizable) one, so those
// agree to float rounding. Lower precisions are computed in float32 and rounded once.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "vector_math.h"

namespace protoserve {
namespace {

// Rows per parallel task: small batches stay on one thread, where a fork would cost more than the work.
int64_t grain_for(int64_t elements_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_row));
}

// One row of Llama's RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), rounded to the dtype before
// the weight, as transformers does.
template <typename scalar_t>
inline void normalize_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                          scalar_t* __restrict__ y, int64_t hidden, float epsilon) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < hidden; ++d) {
    const float value = static_cast<float>(x[d]);
    squares += value * value;
  }
  const float variance = squares / static_cast<float>(hidden);
  const float inverse = 1.f / std::sqrt(variance + epsilon);
#pragma omp simd
  for (int64_t d = 0; d < hidden; ++d) {
    const scalar_t normed = static_cast<scalar_t>(static_cast<float>(x[d]) * inverse);
    y[d] = static_cast<scalar_t>(static_cast<float>(weight[d]) * static_cast<float>(normed));
  }
}

template <typename scalar_t>
void add_rms_norm_impl(scalar_t* hidden_states, const scalar_t* delta, int64_t delta_row_stride,
                       int64_t delta_column_stride, const scalar_t* weight, scalar_t* output, int64_t rows,
                       int64_t hidden, float epsilon) {
  at::parallel_for(0, rows, grain_for(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* __restrict__ x = hidden_states + r * hidden;
      const scalar_t* row_delta = delta + r * delta_row_stride;
      for (int64_t d = 0; d < hidden; ++d) {
        x[d] = static_cast<scalar_t>(static_cast<float>(x[d]) + static_cast<float>(row_delta[d * delta_column_stride]));
      }
      normalize_row(x, weight, output + r * hidden, hidden, epsilon);
    }
  });
}

template <typename scalar_t>
void silu_mul_impl(const scalar_t* gate_up, int64_t row_stride, int64_t column_stride, scalar_t* output,
                   int64_t rows, int64_t intermediate) {
  auto activate = [](float gate, float up) {
    const float silu = gate / (1.f + exp_clamped(-gate));
    return static_cast<float>(static_cast<scalar_t>(silu)) * up;
  };
  if (column_stride == 1) {  // row-major: each row's gate half, then its up half
    at::parallel_for(0, rows, grain_for(2 * intermediate), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ gate = gate_up + r * row_stride;
        const scalar_t* __restrict__ up = gate + intermediate;
        scalar_t* __restrict__ target = output + r * intermediate;
#pragma omp simd
        for (int64_t i = 0; i < intermediate; ++i) {
          target[i] = static_cast<scalar_t>(activate(static_cast<float>(gate[i]), static_cast<float>(up[i])));
        }
      }
    });
    return;
  }
  // Any other layout (a transposed product): walk the columns, the rows contiguous where row_stride is 1.
  at::parallel_for(0, intermediate, grain_for(2 * rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* gate = gate_up + i * column_stride;
      const scalar_t* up = gate_up + (i + intermediate) * column_stride;
      for (int64_t r = 0; r < rows; ++r) {
        output[r * intermediate + i] = static_cast<scalar_t>(
            activate(static_cast<float>(gate[r * row_stride]), static_cast<float>(up[r * row_stride])));
      }
    }
  });
}

template <typename scalar_t>
void rms_norm_impl(const scalar_t* input, const scalar_t* weight, scalar_t* output, int64_t rows, int64_t hidden,
                   int64_t input_row_stride, float epsilon) {
  at::parallel_for(0, rows, grain_for(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      normalize_row(input + r * input_row_stride, weight, output + r * hidden, hidden, epsilon);
    }
  });
}

// target = source * cos + rotate_half(source) * sin, rotate_half(x) = cat(-x[half:], x[:half]).
template <typename scalar_t>
inline void rotate(const scalar_t* __restrict__ source, const scalar_t* __restrict__ cos,
                   const scalar_t* __restrict__ sin, scalar_t* __restrict__ target, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    const float product = static_cast<float>(source[d]) * static_cast<float>(cos[d]);
    const float rotated = -static_cast<float>(source[d + half]) * static_cast<float>(sin[d]);
    target[d] = static_cast<scalar_t>(product + rotated);
  }
#pragma omp simd
  for (int64_t d = half; d < dim; ++d) {
    const float product = static_cast<float>(source[d]) * static_cast<float>(cos[d]);
    const float rotated = static_cast<float>(source[d - half]) * static_cast<float>(sin[d]);
    target[d] = static_cast<scalar_t>(product + rotated);
  }
}

template <typename scalar_t>
void rotary_write_kv_impl(const scalar_t* qkv, int64_t qkv_row_stride, const scalar_t* cos, const scalar_t* sin,
                          scalar_t* key_cache, scalar_t* value_cache, const int64_t* slots, scalar_t* query,
                          int64_t tokens, int64_t num_heads, int64_t num_kv_heads, int64_t dim) {
  const int64_t width = (num_heads + 2 * num_kv_heads) * dim;
  at::parallel_for(0, tokens, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = qkv + t * qkv_row_stride;
      const scalar_t* token_cos = cos + t * dim;
      const scalar_t* token_sin = sin + t * dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        rotate(row + h * dim, token_cos, token_sin, query + (t * num_heads + h) * dim, dim);
      }
      const int64_t slot = slots[t];
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        rotate(row + (num_heads + h) * dim, token_cos, token_sin, key_cache + (slot * num_kv_heads + h) * dim, dim);
        std::copy_n(row + (num_heads + num_kv_heads + h) * dim, dim, value_cache + (slot * num_kv_heads + h) * dim);
      }
    }
  });
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& input, const torch::Tensor& weight, double epsilon) {
  TORCH_CHECK(input.dim() == 2 && input.stride(1) == 1, "input [rows, hidden] with unit column stride expected");
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(1) && weight.is_contiguous(),
              "weight [hidden] expected");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "input and weight differ in dtype");
  auto output = torch::empty(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                            input.size(0), input.size(1), input.stride(0), static_cast<float>(epsilon));
  });
  return output;
}

torch::Tensor add_rms_norm(const torch::Tensor& hidden_states, const torch::Tensor& delta,
                           const torch::Tensor& weight, double epsilon) {
  TORCH_CHECK(hidden_states.dim() == 2 && hidden_states.is_contiguous(),
              "contiguous hidden states [rows, hidden] expected");
  TORCH_CHECK(delta.sizes() == hidden_states.sizes(), "delta and hidden states differ in shape");
  TORCH_CHECK(hidden_states.device().is_cpu() && delta.device().is_cpu() && weight.device().is_cpu(),
              "CPU tensors expected");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden_states.size(1) && weight.is_contiguous(),
              "weight [hidden] expected");
  TORCH_CHECK(weight.scalar_type() == hidden_states.scalar_type() && delta.scalar_type() == hidden_states.scalar_type(),
              "hidden states, delta and weight differ in dtype");
  auto output = torch::empty(hidden_states.sizes(), hidden_states.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden_states.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(hidden_states.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), delta.stride(0),
                                delta.stride(1), weight.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                                hidden_states.size(0), hidden_states.size(1), static_cast<float>(epsilon));
  });
  return output;
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [rows, 2 x intermediate] expected");
  TORCH_CHECK(gate_up.device().is_cpu(), "a CPU tensor expected");
  const int64_t rows = gate_up.size(0), intermediate = gate_up.size(1) / 2;
  auto output = torch::empty({rows, intermediate}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), gate_up.stride(0), gate_up.stride(1),
                            output.data_ptr<scalar_t>(), rows, intermediate);
  });
  return output;
}

torch::Tensor rotary_write_kv(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                              const torch::Tensor& slot_mapping, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv [tokens, width] with unit column stride expected");
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.sizes() == value_cache.sizes() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous(),
              "contiguous caches [slots, KV, D] of one shape expected");
  TORCH_CHECK(qkv.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu() &&
                  cos.device().is_cpu() && sin.device().is_cpu() && slot_mapping.device().is_cpu(),
              "CPU tensors expected");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype && key_cache.scalar_type() == dtype &&
                  value_cache.scalar_type() == dtype,
              "qkv, cos, sin and the caches differ in dtype");
  const int64_t tokens = qkv.size(0), num_kv_heads = key_cache.size(1), dim = key_cache.size(2);
  TORCH_CHECK(dim % 2 == 0, "odd head size");
  TORCH_CHECK(num_heads > 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * dim,
              "qkv width is not (heads + 2 x KV heads) x head size");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == dim &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "contiguous cos and sin [tokens, head size] expected");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == tokens,
              "one int64 slot per token expected");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = key_cache.size(0);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range");
  }
  auto query = torch::empty({tokens, num_heads, dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rotary_write_kv", [&] {
    rotary_write_kv_impl<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0), cos.data_ptr<scalar_t>(),
                                   sin.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
                                   value_cache.data_ptr<scalar_t>(), slots, query.data_ptr<scalar_t>(), tokens,
                                   num_heads, num_kv_heads, dim);
  });
  return query;
}

}  // namespace protoserve
