// Paged attention for decode steps on the CPU: one query token per sequence, keys and values read
// in place from the paged cache.
//
// The torch path (attention.py) gathers every sequence's keys and values out of the cache into a
// padded copy, per layer and per step, then runs SDPA over the copy: the cache is read, written
// and read again. Here each (sequence, KV head) task reads its keys and values once, straight from
// their slots (prefetched a few rows ahead, since a sequence's blocks lie anywhere in the cache),
// for the query heads that share that KV head (GQA), and computes in float32.
//
// Shapes (all contiguous, on the CPU):
//   query        [S, H, D]       one query per sequence
//   key_cache    [slots, KV, D]  value_cache the same; H is a multiple of KV
//   key_slots    [S, K] int64    cache slot of each key position, K >= every length
//   key_lengths  [S] int64       keys of sequence s are positions 0 .. key_lengths[s]-1
//   sliding_window               0: none; else only the last `sliding_window` keys are attended
// Returns [S, H, D] in the query's dtype.

#include <ATen/Parallel.h>

#include "kernels.h"
#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace protoserve {
namespace {

constexpr int64_t kMaxHeadDim = 512;

constexpr int64_t kPrefetchRows = 16;

// Prefetch the `bytes` at `address` into the cache (a key or value row a few rows ahead).
inline void prefetch(const void* address, int64_t bytes) {
  const char* start = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset);
}

// HEAD_DIM > 0 fixes the head size at compile time (the loops unroll and the per-head accumulators
// stay in registers); 0 reads it at run time.
template <typename scalar_t, int HEAD_DIM>
void paged_decode_attention_impl(const scalar_t* query, const scalar_t* key_cache, const scalar_t* value_cache,
                                 const int64_t* key_slots, const int64_t* key_lengths, scalar_t* output,
                                 int64_t num_sequences, int64_t num_heads, int64_t num_kv_heads, int64_t runtime_dim,
                                 int64_t max_keys, int64_t sliding_window, float scale) {
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  at::parallel_for(0, num_sequences * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sequence = task / num_kv_heads;
      const int64_t kv_head = task % num_kv_heads;
      const int64_t length = key_lengths[sequence];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, length - sliding_window) : 0;
      const int64_t count = length - first;
      const int64_t* slots = key_slots + sequence * max_keys + first;
      auto key_row = [&](int64_t j) { return key_cache + (slots[j] * num_kv_heads + kv_head) * dim; };
      auto value_row = [&](int64_t j) { return value_cache + (slots[j] * num_kv_heads + kv_head) * dim; };
      scores.resize(group * count);
      // Scores, one query head at a time: the head's query stays in registers; the keys come from
      // memory for the first head (prefetched ahead) and from L1/L2 for the others.
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kv_head * group + g;
        const scalar_t* source = query + (sequence * num_heads + head) * dim;
        float q[HEAD_DIM > 0 ? HEAD_DIM : kMaxHeadDim];
        for (int64_t d = 0; d < dim; ++d) q[d] = static_cast<float>(source[d]) * scale;
        float* __restrict__ head_scores = scores.data() + g * count;
        for (int64_t j = 0; j < count; ++j) {
          if (g == 0 && j + kPrefetchRows < count) prefetch(key_row(j + kPrefetchRows), row_bytes);
          const scalar_t* __restrict__ key = key_row(j);
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += q[d] * static_cast<float>(key[d]);
          head_scores[j] = dot;
        }
        float highest = -INFINITY;
        for (int64_t j = 0; j < count; ++j) highest = std::max(highest, head_scores[j]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < count; ++j) {
          head_scores[j] = exp_clamped(head_scores[j] - highest);
          total += head_scores[j];
        }
        const float inverse = 1.f / total;
#pragma omp simd
        for (int64_t j = 0; j < count; ++j) head_scores[j] *= inverse;
      }
      // Weighted values, one query head at a time, the head's accumulator in registers.
      for (int64_t g = 0; g < group; ++g) {
        const float* __restrict__ weights = scores.data() + g * count;
        float accumulator[HEAD_DIM > 0 ? HEAD_DIM : kMaxHeadDim] = {};
        for (int64_t j = 0; j < count; ++j) {
          if (g == 0 && j + kPrefetchRows < count) prefetch(value_row(j + kPrefetchRows), row_bytes);
          const scalar_t* __restrict__ value = value_row(j);
          const float weight = weights[j];
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) accumulator[d] += weight * static_cast<float>(value[d]);
        }
        scalar_t* target = output + (sequence * num_heads + kv_head * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) target[d] = static_cast<scalar_t>(accumulator[d]);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& query, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& key_slots,
                                     const torch::Tensor& key_lengths, double scale, int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 3, "query [S, H, D] and caches [slots, KV, D] expected");
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_slots.is_contiguous() && key_lengths.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key and value caches differ in shape");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "query and caches differ in dtype");
  TORCH_CHECK(key_slots.scalar_type() == torch::kLong && key_lengths.scalar_type() == torch::kLong,
              "int64 slots and lengths expected");
  const int64_t num_sequences = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t num_kv_heads = key_cache.size(1);
  TORCH_CHECK(key_cache.size(2) == dim && dim <= kMaxHeadDim, "head size mismatch or above ", kMaxHeadDim);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(key_slots.dim() == 2 && key_slots.size(0) == num_sequences && key_lengths.numel() == num_sequences,
              "one row of slots and one length per sequence expected");
  const int64_t max_keys = key_slots.size(1);
  const int64_t num_slots = key_cache.size(0);
  const int64_t* lengths = key_lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_sequences; ++s) {
    TORCH_CHECK(lengths[s] >= 1 && lengths[s] <= max_keys, "key length out of range");
  }
  const int64_t* slots = key_slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < key_slots.numel(); ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "key slot out of range");
  }
  auto output = torch::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto head_dim) {
      paged_decode_attention_impl<scalar_t, decltype(head_dim)::value>(
          query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(), slots,
          lengths, output.data_ptr<scalar_t>(), num_sequences, num_heads, num_kv_heads, dim, max_keys,
          sliding_window, static_cast<float>(scale));
    };
    if (dim == 64) {
      run(std::integral_constant<int, 64>{});
    } else if (dim == 128) {
      run(std::integral_constant<int, 128>{});
    } else {
      run(std::integral_constant<int, 0>{});
    }
  });
  return output;
}

}  // namespace protoserve
