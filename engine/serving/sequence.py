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
    """How one sequence picks its tokens. The penalties and `logit_bias` change the logits before
    greedy or sampled choice (as vLLM applies them: the penalties count the output tokens only);
    `logprobs` (None: off) asks for the sampled token's log-probability and the `logprobs` most likely
    tokens', from the raw model logits before any of that, reported on each TokenEvent."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    num_speculative_tokens: int = 0  # MTP drafts per verify step (0: plain decoding)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 or None, got {self.logprobs}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the most likely tokens' at its position (log_softmax of the
    raw logits), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenEvent:
    """What a step produced for one sequence: a new token, and whether (and why) the sequence ended."""

    token: int | None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    logprobs: TokenLogprobs | None = None  # only when the sequence's params ask for them


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


@dataclass
class SpecState:
    """A speculating sequence's MTP drafting state (`advisor.engine.serving.speculation`).

    Layer j (1-based) reads, at hidden position p, the previous depth's stream there and token x_{p+j};
    its KV entry at p (kept in the paged cache at p's slot) is firm once x_{p+j} is no draft.
    firm[0]: positions whose main-model stream h^0 has been handed over; firm[j]: layer j's firm entries.
    carry[j]: layer j's input rows for positions [firm[j], firm[j-1]) (for j = 1, h^0 not yet consumed).
    """

    k: int
    firm: list[int] = field(default_factory=list)
    carry: list[torch.Tensor | None] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # this step's drafts, d_1..d_k
    q: torch.Tensor | None = None  # [k, vocab]: the distributions the drafts were drawn from (sampling)
    steps: int = 0  # verify steps
    accepted: int = 0  # drafts accepted, all steps

    def reset(self, computed: int) -> None:
        """Start over from `computed` positions whose MTP entries are in the cache (0, or a prefix hit)."""
        self.firm = [computed] * (self.k + 1)
        self.carry = [None] * (self.k + 1)
        self.drafts, self.q = [], None

    @property
    def horizon(self) -> int:
        """Positions whose every KV entry (main and MTP layers) is final."""
        return min(self.firm) if self.firm else 0


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
    spec: SpecState | None = None  # set when the request speculates
    next_logprobs: TokenLogprobs | None = None  # set by the sampler with the token, taken by the core

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        self.image_key = image_digest(self.images)
        if self.params.num_speculative_tokens:
            self.spec = SpecState(self.params.num_speculative_tokens)
            self.spec.reset(0)

    @property
    def computed_horizon(self) -> int:
        """Positions whose cache entries are final: every computed one, or for a speculating sequence
        those its MTP layers have also made firm (what may be cached and what sliding layers may drop)."""
        return self.num_computed if self.spec is None else min(self.num_computed, self.spec.horizon)

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
