"""Serving: the KV block pool with its prefix cache, the continuous-batching scheduler and the engine
loop over `advisor.engine.model` (with `advisor.engine.text` for the chat format in the HTTP server).

Modules, in the order data flows (nano-vllm's split):
- `sequence`: a request (`Sequence`, `SamplingParams`) and what each step reports (`TokenEvent`);
- `block_pool`: fixed-size KV blocks, reference counts, the hash-chained prefix cache with LRU eviction;
- `block_manager`: each sequence's block tables (one pool per attention type; sliding layers hand back
  blocks that leave their window), prefix hits;
- `scheduler`: which sequences run next and how many tokens each (chunked prefill, preemption);
- `paged_attention`: the paged KV tensors and attention over block tables;
- `model_runner`: one step on the model (flat batch in, sampled tokens out);
- `sampler`: the next token from a row of logits (penalties, logit bias, greedy or sampled, logprobs);
- `core`: the engine loop (`EngineCore`), thread-safe submission and cancellation, `AsyncLLM`;
- `server` (with `args`, `prompts`, `openai_request` for the request body, `outputs` for what the client
  sees of the tokens: stop strings, logprobs): `advisor serve`, the OpenAI-compatible HTTP server.

Public names are imported lazily (as `engine`'s): `advisor --help` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advisor.engine.serving.core import AsyncLLM, EngineCore, ServingConfig
    from advisor.engine.serving.sequence import SamplingParams, Sequence, TokenEvent, TokenLogprobs

__all__ = [
    "AsyncLLM",
    "EngineCore",
    "SamplingParams",
    "Sequence",
    "ServingConfig",
    "TokenEvent",
    "TokenLogprobs",
]

_LAZY = {
    "AsyncLLM": "advisor.engine.serving.core",
    "EngineCore": "advisor.engine.serving.core",
    "ServingConfig": "advisor.engine.serving.core",
    "SamplingParams": "advisor.engine.serving.sequence",
    "Sequence": "advisor.engine.serving.sequence",
    "TokenEvent": "advisor.engine.serving.sequence",
    "TokenLogprobs": "advisor.engine.serving.sequence",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'advisor.engine.serving' has no attribute {name!r}")
