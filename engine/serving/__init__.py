"""Serving: the KV block pool with its prefix cache, the continuous-batching scheduler and the engine
loop over `engine.model` (with `engine.text` for the chat format in the HTTP server).

Modules, in the order data flows (nano-vllm's split):
- `sequence`: a request (`Sequence`, `SamplingParams`) and what each step reports (`TokenEvent`);
- `block_pool`: fixed-size KV blocks, reference counts, the hash-chained prefix cache with LRU eviction;
- `block_manager`: each sequence's block tables (one pool per attention type; sliding layers hand back
  blocks that leave their window), prefix hits;
- `scheduler`: which sequences run next and how many tokens each (chunked prefill, preemption);
- `paged_attention`: the paged KV tensors and attention over block tables;
- `model_runner`: one step on the model (flat batch in, sampled tokens out);
- `core`: the engine loop (`EngineCore`), thread-safe submission and cancellation, `AsyncLLM`.
"""

from engine.serving.core import AsyncLLM, EngineCore, ServingConfig
from engine.serving.sequence import SamplingParams, Sequence, TokenEvent

__all__ = ["AsyncLLM", "EngineCore", "SamplingParams", "Sequence", "ServingConfig", "TokenEvent"]
