"""Embedded Step 3.7 Flash inference engine (PyTorch, with Triton kernels on CUDA).

`engine.LLM` is imported lazily so that light users of the package (e.g. `engine.chat`) do not pay for
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM

__all__ = ["LLM"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
