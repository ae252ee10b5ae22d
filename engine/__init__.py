"""Embedded Step 3.7 Flash inference engine (PyTorch, with Triton kernels on CUDA).

Public names are imported lazily so that light users of the package (e.g. `advisor.engine.text.chat`) do not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advisor.engine.llm import LLM
    from advisor.engine.model.config import ConfigError
    from advisor.engine.model.loader import CheckpointError

__all__ = ["LLM", "CheckpointError", "ConfigError"]

_LAZY = {"LLM": "advisor.engine.llm", "CheckpointError": "advisor.engine.model.loader", "ConfigError": "advisor.engine.model.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
