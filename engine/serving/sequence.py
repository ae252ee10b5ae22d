"""A request as the scheduler sees it: its tokens, sampling settings, block tables and progress."""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """What a step produced for one sequence: a new token, and whether (and why) the sequence ended."""

    token: int | None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None


_ids = itertools.count()


def image_digest(images: dict[str, Any] | None) -> bytes:
    """A digest of a prompt's pixel inputs: part of the prefix-cache key from its first image token on."""
    if not images:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for name in ("pixel_values", "pixel_values_local", "num_local_patches"):
        v = images.get(name)
        if v is None:
            continue
        h.update(name.encode())
        t = torch.as_tensor(v).detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


@dataclass(eq=False)  # by identity: equal prompts are still different requests
class Sequence:
    prompt: list[int]
    params: SamplingParams
    images: dict[str, Any] | None = None
    on_event: Callable[[TokenEvent], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    tables: dict[str, list[int | None]] = field(default_factory=dict)  # per attention type; None: freed
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks so far
    registered: int = 0  # leading blocks already offered to the prefix cache
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    image_features: torch.Tensor | None = None  # computed once, reused by every chunk and after preemption
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        self.image_key = image_digest(self.images)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]
