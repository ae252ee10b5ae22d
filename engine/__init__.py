"""Embedded Step 3.7 Flash inference engine (PyTorch, with Triton kernels on CUDA).

Public names are imported lazily so that light users of the package (e.g. `engine.text.chat`) do not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.model.config import ConfigError
    from engine.model.loader import CheckpointError

__all__ = ["LLM", "CheckpointError", "ConfigError"]

_LAZY = {"LLM": "engine.llm", "CheckpointError": "engine.model.loader", "ConfigError": "engine.model.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
