"""The engine loop: requests in from any thread, one scheduler and one model step at a time.

`EngineCore.submit` and `abort` only queue (they never wait for a step, so an event loop may call them);
whoever drives the core (`drive`, from `LLM.generate` in the caller's thread or `AsyncLLM`'s
background thread) takes the queued work in at the start of each step. Every step reports to each
sequence's `on_event` (a new token; the end, and why), from the thread that ran the step.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
from advisor.engine.serving.block_manager import BlockManager
from advisor.engine.serving.model_runner import ModelRunner
from advisor.engine.serving.paged_attention import PagedKVCache
from advisor.engine.serving.scheduler import Scheduler
from advisor.engine.serving.sequence import SamplingParams, Sequence, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class ServingConfig:
    block_size: int = 16
    num_blocks: int | None = None  # KV blocks per attention type; None: a share of free memory
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens per step: the prefill chunk and the decodes beside it
    kv_memory_fraction: float = 0.25  # of the free memory, when num_blocks is None
    max_model_len: int | None = None  # longest prompt + output; None: the checkpoint's, if it says


def default_num_blocks(
    cfg, block_size: int, dtype: torch.dtype, device: torch.device, fraction: float
) -> int:
    """Blocks for `fraction` of the free memory (device memory on CUDA), at least 64 and at most 8192 on
    CUDA, 2048 on the CPU (the pool is allocated, zeroed, up front: pass num_blocks for more)."""
    per_block = PagedKVCache.bytes_per_block(cfg, block_size, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    return int(min(8192 if device.type == "cuda" else 2048, max(64, fraction * free // max(1, per_block))))


class EngineCore:
    def __init__(self, llm, config: ServingConfig | None = None):
        self.llm = llm
        self.config = config = config or ServingConfig()
        tc = llm.config.text
        n = config.num_blocks or default_num_blocks(
            tc, config.block_size, llm.dtype, llm.device, config.kv_memory_fraction
        )
        self.cache = PagedKVCache(tc, n, config.block_size, llm.dtype, llm.device)
        self.blocks = BlockManager(self.cache.windows(), n, config.block_size, llm.config.image_token_id)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(llm, self.cache)
        self.max_model_len = config.max_model_len
        self._lock = threading.Lock()
        self._incoming: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[tuple[Sequence, str]] = queue.SimpleQueue()
        self._pending = 0  # submitted and not yet finished
        self._count = threading.Lock()  # guards _pending (submit runs in any thread, _end in the driver)
        self.stats = CoreStats()

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: Seq[int],
        params: SamplingParams,
        images: dict[str, Any] | None = None,
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> Sequence:
        """Queue a request; a bad prompt is a ValueError here, before anything runs."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        vocab = self.llm.config.text.vocab_size
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id out of range [0, {vocab}): min {lo}, max {hi}")
        if self.max_model_len is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} exceeds the context "
                f"length {self.max_model_len}"
            )
        if images and self.llm.vision is None:
            raise ValueError("image inputs given, but this checkpoint has no vision tower loaded")
        k, n_mtp = params.num_speculative_tokens, len(self.llm.model.mtp)
        if k and not n_mtp:
            raise ValueError("speculative decoding with MTP: this checkpoint has no MTP layers")
        if k > n_mtp:
            raise ValueError(
                f"num_speculative_tokens must be between 1 and the checkpoint's {n_mtp}, got {k}"
            )
        seq = Sequence(prompt, params, images, on_event)
        with self._count:
            self._pending += 1
        self._incoming.put(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a request early: at the next step it finishes with `reason` (a cancelled one "abort", one
        the server saw reach a stop string "stop") and its blocks go back."""
        self._aborts.put((seq, reason))

    def has_work(self) -> bool:
        return self._pending > 0

    # ------------------------------------------------------------------ the loop
    def drive(self, until: Callable[[], bool]) -> None:
        """Run steps in this thread until `until()` holds (other drivers may run some of them)."""
        while True:
            with self._lock:
                self._take_queued()
                if until() or not self.scheduler.has_work():
                    return
                self._step()

    def step(self) -> None:
        with self._lock:
            self._take_queued()
            self._step()

    def _take_queued(self) -> None:
        while True:
            try:
                seq = self._incoming.get_nowait()
            except queue.Empty:
                break
            if seq.params.max_tokens == 0:
                self._end(seq, "length")
            else:
                self.scheduler.add(seq)
        while True:
            try:
                seq, reason = self._aborts.get_nowait()
            except queue.Empty:
                break
            if not seq.finished:
                self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(seq, reason)
        seq.error = error or seq.error
        with self._count:
            self._pending -= 1
        self.stats.finished(seq)
        if seq.on_event:
            seq.on_event(TokenEvent(None, True, reason, seq.error))

    def _step(self) -> None:
        chunks = self.scheduler.schedule()
        for seq in self.scheduler.rejected:
            with self._count:
                self._pending -= 1
            if seq.on_event:
                seq.on_event(TokenEvent(None, True, "error", seq.error))
        self.scheduler.rejected.clear()
        for c in list(chunks):
            if c.seq.images and c.seq.image_features is None:
                try:
                    self.runner.prepare_images(c.seq)
                except Exception as e:  # this request's images are bad; the others go on
                    chunks.remove(c)
                    self._end(c.seq, "error", f"{type(e).__name__}: {e}")
        if not chunks:
            return
        self.stats.step(chunks)
        try:
            tokens = self.runner.run(chunks)
        except Exception as e:  # a failed step fails its sequences, never the loop
            log.exception("engine step failed")
            for c in chunks:
                self._end(c.seq, "error", f"{type(e).__name__}: {e}")
            return
        drafting = []
        for c in chunks:
            seq = c.seq
            new = tokens.get(seq.id, [])
            if c.drafts:  # a verify step: x_m and the accepted drafts are computed, the rest handed back
                seq.num_computed += len(new)
                self.blocks.truncate(seq)
            else:
                seq.num_computed += c.n
            self.blocks.commit(seq)
            reason = None
            # logprobs come with a sampled token (a verify step's accepted drafts carry none)
            logprobs, seq.next_logprobs = seq.next_logprobs, None
            for tok in new:
                seq.output.append(tok)
                p = seq.params
                if tok in p.stop_token_ids:
                    reason = "stop"
                elif len(seq.output) >= p.max_tokens:
                    reason = "length"
                elif self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
                    reason = "length"
                if seq.on_event:
                    seq.on_event(TokenEvent(tok, logprobs=logprobs if len(new) == 1 else None))
                if reason:
                    break
            if reason:
                self._end(seq, reason)
            elif seq.spec is not None and new:
                drafting.append(seq)
        if drafting:
            try:
                self.runner.drafter.draft(drafting, self.max_model_len)
            except Exception as e:  # as a failed step: these sequences fail, the loop goes on
                log.exception("MTP drafting failed")
                for seq in drafting:
                    self._end(seq, "error", f"{type(e).__name__}: {e}")
                return
            for seq in drafting:  # their MTP entries are firm further now: cache and release by them
                self.blocks.commit(seq)

    def fail_all(self, error: str) -> None:
        """End every sequence with an error (after an unexpected failure in the loop)."""
        with self._lock:
            self._take_queued()
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._end(seq, "error", error)

    # ------------------------------------------------------------------ blocking helper
    def generate(
        self, prompts: Seq[Seq[int]], params: Seq[SamplingParams], images: Seq[dict | None] | None = None
    ) -> list[Sequence]:
        """Submit every prompt, drive until all are done, return the finished sequences (in order)."""
        seqs = [
            self.submit(p, sp, images[i] if images is not None else None)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        self.drive(lambda: all(s.finished for s in seqs))
        for s in seqs:
            if s.finish_reason == "error":
                raise RuntimeError(s.error)
        return seqs


class CoreStats:
    """Counters for benchmarks and logs: prompt tokens sent, served from the cache, computed."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.computed_tokens = 0
        self.steps = 0

    def step(self, chunks) -> None:
        self.steps += 1
        self.computed_tokens += sum(c.n for c in chunks)

    def finished(self, seq: Sequence) -> None:
        self.prompt_tokens += len(seq.prompt)
        self.cached_prompt_tokens += seq.num_cached_prompt


class AsyncLLM:
    """Async front of one `EngineCore`: `generate` returns a request's stream of TokenEvents.

    One background thread drives the core while any request is pending; leaving the iterator early
    (a cancelled task, a closed stream) aborts the request and frees its blocks.
    """

    def __init__(self, core: EngineCore):
        self.core = core
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="advisor-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.core.drive(lambda: False)
            except Exception:  # a bug in scheduling must not leave every later request hanging
                log.exception("engine loop failed; failing the running requests")
                self.core.fail_all("the engine loop failed (see the server log)")

    def generate(self, prompt: Seq[int], params: SamplingParams, images: dict | None = None) -> RequestStream:
        """Submit a request (call from a coroutine); iterate the result for its TokenEvents."""
        import asyncio

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = self.core.submit(
            prompt, params, images, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        )
        self._ensure_thread()
        self._wake.set()
        return RequestStream(self, seq, events)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a request early (callable from the event loop): see `EngineCore.abort`."""
        self.core.abort(seq, reason)
        self._wake.set()


class RequestStream:
    """One request's events, in order; `seq` is its Sequence (output, num_cached_prompt, finish_reason)."""

    def __init__(self, engine: AsyncLLM, seq: Sequence, events):
        self.engine, self.seq, self._events = engine, seq, events

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        done = False
        try:
            while not done:
                ev = await self._events.get()
                done = ev.finished
                yield ev
        finally:
            if not done:  # the consumer left early (cancelled, disconnected): free the blocks now
                self.engine.abort(self.seq)
