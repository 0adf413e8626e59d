"""The inference engine: continuous batching over a paged KV cache, driving unmodified transformers models.

Modules, one concept each:

- `api`: the contract (requests, sampling parameters, outputs, stats, config); `errors`: what callers see.
- `sequence`: request and per-choice sequence state, the status enum (after PREEMPTED = finished).
- `block_manager`: fixed-size KV blocks, reference counts, chained prefix hashes, LRU eviction.
- `scheduler`: waiting queue and running list, token budget, chunked prefill, preemption.
- `attention`: the paged attention function registered with transformers' AttentionInterface.
- `model_runner`: owns the model and KV tensors; packs a step into one forward; logits out.
- `multimodal`: vision features merged into the prompt embeddings once, at prefill.
- `engine`: `LLMEngine.step()` = schedule, run, sample, postprocess (synchronous).
- `async_engine`: `AsyncEngine`, one engine thread and per-request asyncio queues.
- `loader`: `load_model(LoadOptions) -> LoadedModel` from local folders and the hub cache.
- `sampler`, `output_processor`, `detokenizer`, `stop_strings`, `constraints/`: choosing tokens and
  turning them into text deltas.
"""
