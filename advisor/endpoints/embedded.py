"""The embedded endpoint: Step chat turns served in-process by `engine.LLM`.

`model` in the endpoint config is a checkpoint directory (HF layout: config.json, safetensors,
tokenizer.json, tokenizer_config.json with the chat template), given as a path (absolute, `~`, or
relative to the working directory), or the name of a directory under `$ADVISOR_MODELS_DIR`
(default `~/.cache/advisor/models`) or of a model shipped in the repository's `models/` folder. `device` picks the torch device (default cpu).

`extra_body` takes the engine's sampling and loading options: temperature (default 0: greedy),
top_p, seed, dtype, max_batch_size (sequences per step), kv_blocks (KV pool size, blocks of 16 tokens),
and speculative decoding with the checkpoint's MTP layers (`speculative: mtp`, `num_speculative_tokens:
k`, default all of them; off unless asked, a one-line error for a checkpoint without MTP layers; such
calls speculate inside the serving core, batched with the others).
Anything else there is an error, since no request body exists.

A call renders the neutral messages with the checkpoint's own chat template (else the engine's default
Step template), generates in a worker thread (the engine's own pool), and parses the output back into reasoning, content and
tool calls; malformed tool-call markup becomes a ToolCall with `arguments=None` and `parse_error` set.
Concurrent calls share one loaded model per (checkpoint, device, dtype) and its serving core
(`advisor.engine.serving`): a call joins the running batch at the next step, and the prompt tokens its longest
cached prefix covers (the previous steps of the same conversation, in whole blocks) are not recomputed
and come back as `cached_input`, billed at the endpoint's cached price like a hosted API's cache hits. Image parts are preprocessed for the
checkpoint's vision tower (global view plus local crops) and expanded to its image-token layout; a
checkpoint without a vision tower refuses them with a one-line error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.endpoints.base import AttemptHook, ChatRequest, Endpoint, EndpointConfig, EndpointError
from advisor.endpoints.openai import to_openai_messages
from advisor.engine.model_paths import MODELS_DIR_ENV, SHIPPED_MODELS, models_dir, resolve_model
from advisor.messages import Attempt, Effort, Message, ModelResponse, ToolCall, Usage

__all__ = [
    "MODELS_DIR_ENV",
    "SHIPPED_MODELS",
    "EmbeddedEndpoint",
    "Generation",
    "models_dir",
    "resolve_model",
]

DEFAULT_MAX_TOKENS = 2048
_OPTIONS = {
    "temperature",
    "top_p",
    "seed",
    "dtype",
    "max_batch_size",
    "kv_blocks",
    "speculative",
    "num_speculative_tokens",
}
_FUNCTION_NAME = re.compile(r"<function=([^>\n]*)>")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the engine
@dataclass
class Generation:
    tokens: list[int]  # new tokens (a stop token, when hit, is the last)
    cached: int  # prompt tokens served from the prefix cache


@dataclass
class _Engine:
    """One loaded model and its serving core, shared by every endpoint naming it. Calls run in worker
    threads: each submits its request to the core and drives it until its own sequence is done, so
    concurrent calls join the running batch between decode steps instead of waiting for one."""

    llm: Any
    tokenizer: Any
    path: Path
    # Own worker threads, one per batch slot: the default pool (cpu + 4 threads) would cap how many
    # concurrent calls can be in the running batch.
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.llm.max_batch_size + 2, thread_name_prefix="advisor-embedded")

    def generate(
        self,
        prompt: list[int],
        max_new: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stops: tuple[int, ...],
        images: dict | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Blocking: the request's new tokens and how many of its prompt tokens were prefix-cache hits.
        Setting `cancel` (the caller's task was cancelled) aborts the request and frees its blocks."""
        from advisor.engine.serving import SamplingParams

        k = getattr(self.llm, "speculative_tokens", 0)  # MTP drafts per verify step (the LLM's option)
        core = self.llm.core
        seq = core.submit(prompt, SamplingParams(max_new, temperature, top_p, seed, tuple(stops), k), images)
        core.drive(lambda: seq.finished or (cancel is not None and cancel.is_set()))
        if not seq.finished:
            core.abort(seq)
            core.drive(lambda: seq.finished)
        if seq.finish_reason == "error":
            raise RuntimeError(seq.error)
        return Generation(seq.output, seq.num_cached_prompt)


_ENGINES: dict[tuple, _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _load_engine(
    path: Path,
    device: str,
    dtype: str | None,
    max_batch_size: int | None,
    kv_blocks: int | None = None,
    speculative: str | None = None,
    num_speculative_tokens: int | None = None,
) -> _Engine:
    key = (str(path), device, dtype, max_batch_size, kv_blocks, speculative, num_speculative_tokens)
    with _ENGINES_LOCK:  # one load per model, however many endpoints and tasks ask at once
        engine = _ENGINES.get(key)
        if engine is not None:
            return engine
        from advisor.engine import LLM
        from advisor.engine.text.tokenizer import StepTokenizer, load_tokenizer

        kwargs: dict = {"max_batch_size": max_batch_size} if max_batch_size else {}
        if speculative:
            kwargs.update(speculative=speculative, num_speculative_tokens=num_speculative_tokens)
        start = time.perf_counter()
        log.info("loading model %s on %s (embedded engine)", path.name, device)
        llm = LLM.from_pretrained(path, device=device, dtype=dtype, **kwargs)
        if kv_blocks:
            from advisor.engine.serving import EngineCore, ServingConfig

            llm.core = EngineCore(llm, ServingConfig(num_blocks=kv_blocks, max_num_seqs=llm.max_batch_size))
        tok = llm.tokenizer if isinstance(llm.tokenizer, StepTokenizer) else None
        if tok is None:
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{path}: the checkpoint has no tokenizer.json")
            tok = load_tokenizer(path)
        engine = _Engine(llm, tok, path)
        _ENGINES[key] = engine
        log.info("loaded model %s in %.1f s", path.name, time.perf_counter() - start)
        return engine


# -------------------------------------------------------------------------------------- endpoint
class EmbeddedEndpoint(Endpoint):
    def __init__(self, name: str, config: EndpointConfig):
        super().__init__(name, config)
        unknown = sorted(set(config.extra_body) - _OPTIONS)
        if unknown:
            raise EndpointError(
                name, f"extra_body keys {unknown} are not embedded options ({', '.join(sorted(_OPTIONS))})"
            )
        opts = config.extra_body
        self.temperature = float(opts.get("temperature", 0.0))
        self.top_p = float(opts.get("top_p", 1.0))
        self.seed = opts.get("seed")
        self.dtype = opts.get("dtype")
        self.max_batch_size = opts.get("max_batch_size")
        self.kv_blocks = opts.get("kv_blocks")
        self.speculative = opts.get("speculative")
        self.num_speculative_tokens = opts.get("num_speculative_tokens")
        self.device = config.device or "cpu"
        self._engine: _Engine | None = None
        self._load_lock: asyncio.Lock | None = None

    async def _get_engine(self) -> _Engine:
        if self._engine is None:
            if self._load_lock is None:
                self._load_lock = asyncio.Lock()
            async with self._load_lock:
                if self._engine is None:
                    path = resolve_model(self.config.model)
                    self._engine = await asyncio.to_thread(
                        _load_engine,
                        path,
                        self.device,
                        self.dtype,
                        self.max_batch_size,
                        self.kv_blocks,
                        self.speculative,
                        self.num_speculative_tokens,
                    )
        return self._engine

    async def send(self, request: ChatRequest, on_attempt: AttemptHook | None) -> ModelResponse:
        start = time.perf_counter()
        attempt = Attempt(number=1, ok=False)
        try:
            engine = await self._get_engine()
            schemas = (
                [t.openai_schema() for t in request.tools or []] if request.tool_choice != "none" else []
            )
            cancel = threading.Event()
            call = functools.partial(
                self._complete_sync,
                engine,
                request.messages,
                schemas,
                request.effort,
                request.max_tokens or self.config.max_tokens or DEFAULT_MAX_TOKENS,
                cancel,
            )
            try:
                response = await asyncio.get_running_loop().run_in_executor(engine.executor, call)
            except asyncio.CancelledError:  # the task went away: its request leaves the batch
                cancel.set()
                raise
        except Exception as e:
            attempt.error = _one_line(e)
            attempt.latency_s = time.perf_counter() - start
            if on_attempt:
                on_attempt(attempt)
            raise EndpointError(self.name, attempt.error, [attempt]) from None
        attempt.ok = True
        attempt.usage = response.usage
        attempt.latency_s = response.latency_s = time.perf_counter() - start
        response.attempts = [attempt]
        if on_attempt:
            on_attempt(attempt)
        return response

    def _complete_sync(
        self,
        engine: _Engine,
        messages: list[Message],
        schemas: list[dict],
        effort: Effort | None,
        max_new: int,
        cancel: threading.Event | None = None,
    ) -> ModelResponse:
        """Render -> tokens -> generate -> parse; runs in a worker thread."""
        from advisor.engine.text.chat import parse_output

        tok = engine.tokenizer
        text = tok.apply_chat_template(
            to_openai_messages(messages), schemas or None, effort=effort, tokenize=False
        )
        text, images = _image_inputs(engine, messages, text)
        prompt = tok.encode(text)
        stops = tuple(sorted(set(tok.eos_token_ids) | set(engine.llm.eos_token_ids)))
        gen = engine.generate(prompt, max_new, self.temperature, self.top_p, self.seed, stops, images, cancel)
        new = gen.tokens

        stopped = bool(new) and new[-1] in stops
        body = new[:-1] if stopped else new
        in_reasoning = text.rstrip().endswith("<think>")
        parsed = parse_output(tok.decode(body), schemas or None, in_reasoning=in_reasoning)
        think_close = tok.token_to_id("</think>")
        if think_close is not None:
            reasoning_tokens = _reasoning_tokens(body, think_close, in_reasoning)
        else:  # a vocabulary without a single </think> id: count the reasoning text's own tokens
            reasoning_tokens = min(len(new), tok.count(parsed.reasoning))

        calls = [
            ToolCall(id=c.id, name=c.name, arguments=c.arguments, raw_arguments=_json(c.arguments))
            for c in parsed.tool_calls
        ]
        for err in parsed.errors:
            m = _FUNCTION_NAME.search(err.raw)
            calls.append(
                ToolCall(
                    id=f"call_err_{len(calls)}",
                    name=(m.group(1).strip() if m else ""),
                    arguments=None,
                    raw_arguments=err.raw,
                    parse_error=str(err),
                )
            )
        message = Message.assistant(parsed.content, calls, reasoning=parsed.reasoning or None)
        usage = Usage(
            input=len(prompt) - gen.cached,
            cached_input=gen.cached,
            output=len(new) - reasoning_tokens,
            reasoning=reasoning_tokens,
        )
        finish = "tool_calls" if calls else ("stop" if stopped else "length")
        return ModelResponse(message=message, usage=usage, model=self.config.model, finish_reason=finish)


def _image_inputs(engine: _Engine, messages: list[Message], text: str) -> tuple[str, dict | None]:
    """Expands each image placeholder to the checkpoint's image-token layout; the pixel inputs."""
    from advisor.engine.serving.prompts import image_inputs

    parts = [p for m in messages for p in m.images]
    return image_inputs(engine.llm, engine.tokenizer, [p.data for p in parts], text, engine.path)


def _reasoning_tokens(ids: list[int], think_close: int | None, in_reasoning: bool) -> int:
    """Tokens up to and including `</think>`; all of them when the reasoning never closed."""
    if think_close is not None and think_close in ids:
        return ids.index(think_close) + 1
    return len(ids) if in_reasoning else 0


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
