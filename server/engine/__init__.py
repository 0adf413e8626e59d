"""The inference engine: continuous batching over a paged KV cache, driving unmodified transformers models."""
