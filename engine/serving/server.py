"""`advisor serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one `AsyncLLM`.

Routes: `POST /v1/chat/completions` (stream and not; tools and tool_choice; tool calls parsed from the
Step format into `tool_calls`, one delta per call as soon as it closes when streaming; reasoning in
`reasoning_content`, as vLLM and SGLang send it; `reasoning_effort`; `image_url` parts as data URLs;
`usage` with `prompt_tokens_details.cached_tokens`, also in a last chunk with
`stream_options.include_usage`), `POST /v1/completions`, `POST /v1/responses` (the OpenAI Responses
API, translated to the chat route by `responses`, with `previous_response_id` over the last 1000
responses in memory), `GET /v1/models`, `GET /health`. Both
completion routes take `n` choices (the later ones read the prompt from the prefix cache), `stop`
strings (the text ends before the first, and the sequence ends in the core), `logprobs`, `seed`, the
presence and frequency penalties and `logit_bias` (`openai_request` lists what else is honoured,
ignored or refused).

Bad input is an OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`) with a 400. A
client that goes away cancels its request, streamed or not: a stream's generator is closed, a reply still
being computed has its task cancelled when the connection's `http.disconnect` arrives; either way the
sequences are aborted and their blocks are freed at the next step. Nothing one request does stops the
server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.engine.serving.auth import ENV_API_KEY, BearerAuth, open_host_refusal
from advisor.engine.serving.openai_request import (
    BadRequest,
    RequestOptions,
    chat_prompt,
    check_parameters,
    completion_prompt,
    error_body,
    request_options,
)
from advisor.engine.serving.outputs import CompletionLogprobs, TextOutput, chat_logprobs
from advisor.engine.serving.responses import (
    ResponsesError,
    ResponseStore,
    ResponseStream,
    finished,
    new_id,
    output_items,
    response_object,
    stored_turn,
    to_chat,
    usage_of_chat,
)

log = logging.getLogger(__name__)


@dataclass
class Served:
    """The model behind the server: the engine, its tokenizer and the names it answers to."""

    llm: Any
    engine: Any  # advisor.engine.serving.AsyncLLM
    tokenizer: Any
    name: str
    max_model_len: int
    stops: tuple[int, ...]
    created: int = field(default_factory=lambda: int(time.time()))
    # the Responses API's recent responses, for previous_response_id
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(1000))


def _usage(prompt_len: int, cached: int, completion: int, reasoning: int) -> dict:
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _reasoning_count(ids: list[int], think_close: int | None, in_reasoning: bool) -> int:
    if think_close is not None and think_close in ids:
        return ids.index(think_close) + 1
    return len(ids) if in_reasoning else 0


# ---------------------------------------------------------------------------------------- the choices
class EngineFailed(Exception):
    pass


class Choice:
    """One of a request's n choices as it is generated: its visible text so far, the log-probabilities
    not yet sent, and once it ends, why."""

    def __init__(self, index: int, served: Served, opts: RequestOptions):
        self.index, self.seq = index, None
        self.out = TextOutput(served.tokenizer, served.stops, opts.stop)
        self.logprobs: list = []  # (token, TokenLogprobs) not yet sent
        self.finish: str | None = None

    def take_logprobs(self) -> list:
        items, self.logprobs = self.logprobs, []
        return items

    @property
    def tokens(self) -> list[int]:
        """The completion tokens (up to a stop string, not the few generated after it)."""
        return self.seq.output[: self.out.num_tokens]


async def _choice_events(engine, ids, images, params) -> AsyncIterator[tuple[int, Any, Any]]:
    """(choice index, TokenEvent, Sequence) for every choice, as they come. With n > 1 the first choice
    runs alone until its prompt is computed (its first event); then the others are submitted and read
    the prompt's full blocks from the prefix cache instead of computing it again (none are, if the first
    failed). Leaving early aborts every choice still running."""
    events: asyncio.Queue = asyncio.Queue()
    streams, tasks = [], []

    async def pump(i: int, stream) -> None:
        async for ev in stream:  # cancelling this task aborts the sequence (RequestStream's finally)
            events.put_nowait((i, ev))

    def start(i: int) -> None:
        streams.append(engine.generate(ids, params[i], images))
        tasks.append(asyncio.ensure_future(pump(i, streams[i])))

    start(0)
    ended = 0
    try:
        while ended < len(streams):
            i, ev = await events.get()
            if len(streams) < len(params) and ev.finish_reason != "error":
                while len(streams) < len(params):
                    start(len(streams))
            ended += ev.finished
            yield i, ev, streams[i].seq
    finally:
        for s in streams:  # also those whose task never ran (so never reached RequestStream's finally)
            engine.abort(s.seq)  # a finished one stays as it is
        for t in tasks:
            t.cancel()


async def _choice_deltas(served: Served, ids, images, opts: RequestOptions):
    """(choice, text delta, ended) as tokens arrive. A choice that reaches a stop string ends in the core
    at once (its blocks go back), and nothing after the stop string is ever released."""
    choices = [Choice(i, served, opts) for i in range(opts.n)]
    async with aclosing(_choice_events(served.engine, ids, images, opts.params)) as events:
        async for i, ev, seq in events:
            c = choices[i]
            c.seq = seq
            if ev.token is not None and not c.out.stopped:
                text = c.out.add(ev.token)
                if ev.logprobs is not None:
                    c.logprobs.append((ev.token, ev.logprobs))
                if c.out.stopped:
                    served.engine.abort(seq, "stop")
                yield c, text, False
            if ev.finished:
                if seq.finish_reason == "error":
                    raise EngineFailed(seq.error)
                c.finish = "stop" if c.out.stopped else seq.finish_reason
                yield c, c.out.flush(), True


# ---------------------------------------------------------------------------------------- the app
def build_app(served: Served, api_key: str | None = None):
    """The ASGI app; with `api_key`, every route but /health needs it (`advisor.engine.serving.auth`)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def read_body(request: Request, route: str | None) -> dict:
        """The JSON body, for this server's model; `route` None: unknown fields are left to the caller (the
        Responses route ignores them, as OpenAI's does)."""
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model not in (served.name, None):
            raise BadRequest(
                f"unknown model {model!r}; this server serves {served.name!r}", "model", "model_not_found"
            )
        if route is not None:
            check_parameters(body, route)
        return body

    async def health(request: Request):
        core = served.llm.core
        pools = core.blocks.pools.values()
        return JSONResponse(
            {
                "status": "ok",
                "running": len(core.scheduler.running),
                "waiting": len(core.scheduler.waiting),
                "kv_blocks_in_use": sum(p.num_in_use for p in pools),
                "kv_blocks": sum(p.num_blocks for p in pools),
                "prefix_cache_blocks": sum(p.num_cached() for p in pools),
            }
        )

    async def models(request: Request):
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "advisor"}
        card["max_model_len"] = served.max_model_len
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(request: Request):
        body = await read_body(request, "chat")
        ids, images, schemas, in_reasoning = await asyncio.to_thread(chat_prompt, served, body)
        opts = request_options(body, served, len(ids), "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        args = (served, ids, images, opts, schemas, in_reasoning, rid, created)
        if opts.stream:
            return StreamingResponse(_chat_stream(*args), media_type="text/event-stream")
        return await _unless_disconnected(request, _chat_once(*args))

    async def completions(request: Request):
        body = await read_body(request, "completions")
        ids = completion_prompt(served, body)
        opts = request_options(body, served, len(ids), "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if opts.stream:
            return StreamingResponse(
                _completion_stream(served, ids, opts, rid, created), media_type="text/event-stream"
            )
        return await _unless_disconnected(request, _completion_once(served, ids, opts, rid, created))

    async def responses(request: Request):
        body = await read_body(request, None)
        try:
            chat_body, conversation = to_chat(body, served.responses.history(body))
            check_parameters(chat_body, "chat")
            ids, images, schemas, in_reasoning = await asyncio.to_thread(chat_prompt, served, chat_body)
            opts = request_options(chat_body, served, len(ids), "chat")
        except ResponsesError as e:
            raise BadRequest(str(e), e.param) from None
        except BadRequest as e:  # named by its chat-completions field: say the Responses one
            param = _RESPONSES_PARAM.get(e.param or "", e.param)
            message = re.sub(rf"\b{re.escape(e.param)}\b", param, str(e)) if e.param else str(e)
            raise BadRequest(message, param, e.code) from None

        def keep(final: dict) -> None:
            if body.get("store", True):
                served.responses.put(final["id"], [*conversation, stored_turn(final["output"])])

        response = response_object(body, new_id("resp"), served.name, "in_progress")
        args = (served, ids, images, opts, schemas, in_reasoning, response, keep)
        if opts.stream:
            return StreamingResponse(_responses_stream(*args), media_type="text/event-stream")
        return await _unless_disconnected(request, _responses_once(*args))

    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=400)

    async def server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", kind="server_error"), status_code=500)

    async def not_found(request: Request, exc: Exception):
        return JSONResponse(
            error_body(f"no route {request.method} {request.url.path}", code="not_found"), 404
        )

    async def not_allowed(request: Request, exc: Exception):
        return JSONResponse(error_body(f"{request.method} not allowed on {request.url.path}"), 405)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
        ],
        exception_handlers={
            BadRequest: bad_request,
            404: not_found,
            405: not_allowed,
            Exception: server_error,
        },
    )
    return BearerAuth(app, api_key) if api_key else app


async def _unless_disconnected(request, work):
    """The JSON reply of `work` (a coroutine), or nothing if the client disconnects first: then `work` is
    cancelled, which aborts its sequences (their blocks go back at the next step) instead of computing a
    reply nobody will read."""
    from starlette.responses import JSONResponse, Response

    async def gone() -> None:
        # The body has been read, so the next message is the disconnect (or the end of the response).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
    return JSONResponse(task.result())


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _engine_error(e: EngineFailed) -> str:
    return _sse(error_body(f"the engine failed the request: {e}", kind="server_error"))


def _chat_finish(c: Choice, calls: int) -> str:
    return "tool_calls" if calls else ("length" if c.finish == "length" else "stop")


def _chat_usage(served: Served, ids, choices: list[Choice], in_reasoning: bool) -> dict:
    close = served.tokenizer.token_to_id("</think>")
    return _usage(
        len(ids),
        choices[0].seq.num_cached_prompt,  # the prompt as the request sent it: its first choice's
        sum(len(c.tokens) for c in choices),
        sum(_reasoning_count(c.tokens, close, in_reasoning) for c in choices),
    )


async def _collect(served: Served, ids, images, opts: RequestOptions) -> list[tuple[Choice, str]]:
    """Every choice to its end, with its whole visible text, in index order."""
    texts: dict[int, str] = {}
    ended: dict[int, Choice] = {}
    try:
        async with aclosing(_choice_deltas(served, ids, images, opts)) as deltas:
            async for c, text, done in deltas:
                texts[c.index] = texts.get(c.index, "") + text
                if done:
                    ended[c.index] = c
    except EngineFailed as e:
        raise BadRequest(f"the engine refused the request: {e}") from None
    return [(ended[i], texts[i]) for i in range(opts.n)]


async def _chat_once(served, ids, images, opts, schemas, in_reasoning, rid, created) -> dict:
    from advisor.engine.text.chat_parse import parse_output

    done = await _collect(served, ids, images, opts)
    choices = []
    for c, text in done:
        parsed = parse_output(text, schemas, in_reasoning=in_reasoning)
        calls = parsed.tool_calls if opts.parallel_tool_calls else parsed.tool_calls[:1]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if calls:
            message["tool_calls"] = [t.to_openai() for t in calls]
        logprobs = None
        if opts.logprobs is not None:
            logprobs = {"content": chat_logprobs(served.tokenizer, c.take_logprobs()), "refusal": None}
        choices.append(
            {
                "index": c.index,
                "message": message,
                "finish_reason": _chat_finish(c, len(calls)),
                "logprobs": logprobs,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": served.name,
        "choices": choices,
        "usage": _chat_usage(served, ids, [c for c, _ in done], in_reasoning),
    }


async def _chat_stream(served, ids, images, opts, schemas, in_reasoning, rid, created):
    from advisor.engine.text.chat_parse import StreamingParser

    def chunk(c: Choice | None, delta: dict | None, finish: str | None = None, usage: dict | None = None):
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
        obj["choices"] = []
        if c is not None:
            logprobs = None
            if opts.logprobs is not None:
                logprobs = {"content": chat_logprobs(served.tokenizer, c.take_logprobs()), "refusal": None}
            obj["choices"] = [
                {"index": c.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            ]
        if opts.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    parsers = [StreamingParser(schemas, in_reasoning=in_reasoning) for _ in range(opts.n)]
    calls = [0] * opts.n
    for i in range(opts.n):
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
        obj["choices"] = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
                "logprobs": None,
            }
        ]
        if opts.include_usage:
            obj["usage"] = None
        yield _sse(obj)

    def deltas(i: int, d) -> list[dict]:
        out = []
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        if d.content:
            out.append({"content": d.content})
        for call in d.tool_calls:
            if calls[i] and not opts.parallel_tool_calls:
                continue  # only the first call is kept
            entry = call.to_openai()
            entry["index"] = calls[i]
            calls[i] += 1
            out.append({"tool_calls": [entry]})
        return out

    ended: list[Choice] = []
    try:
        async with aclosing(_choice_deltas(served, ids, images, opts)) as stream:
            async for c, text, done in stream:
                parts = deltas(c.index, parsers[c.index].feed(text)) if text else []
                if done:
                    parts += deltas(c.index, parsers[c.index].finish())
                for d in parts:
                    yield chunk(c, d)
                if done:
                    ended.append(c)
                    yield chunk(c, {}, _chat_finish(c, calls[c.index]))
    except EngineFailed as e:
        yield _engine_error(e)
        return
    if opts.include_usage:
        ended.sort(key=lambda c: c.index)
        yield chunk(None, None, usage=_chat_usage(served, ids, ended, in_reasoning))
    yield "data: [DONE]\n\n"


_RESPONSES_PARAM = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "reasoning_effort": "reasoning.effort",
}


async def _responses_once(served, ids, images, opts, schemas, in_reasoning, response, keep) -> dict:
    """A Responses reply: the chat completion's one choice as output items."""
    chat = await _chat_once(served, ids, images, opts, schemas, in_reasoning, "", 0)
    choice = chat["choices"][0]
    output = output_items(choice["message"])
    final = finished(response, output, choice["finish_reason"], usage_of_chat(chat["usage"]))
    keep(final)
    return final


async def _responses_stream(served, ids, images, opts, schemas, in_reasoning, response, keep):
    """A Responses stream: `response.created` first, then each item's events as the text parses into
    reasoning, text and tool calls, then `response.completed` (or `.incomplete`, or `.failed` when the
    engine fails the request)."""
    from advisor.engine.text.chat_parse import StreamingParser

    stream, parser = ResponseStream(response), StreamingParser(schemas, in_reasoning=in_reasoning)
    calls = 0

    def sse(events: list[dict]) -> str:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events)

    def feed(d) -> list[dict]:
        nonlocal calls
        out = []
        if d.reasoning:
            out += stream.reasoning(d.reasoning)
        if d.content:
            out += stream.text(d.content)
        for call in d.tool_calls:
            if calls and not opts.parallel_tool_calls:
                continue  # only the first call is kept
            fn = call.to_openai()
            out += stream.call(calls, fn["id"], fn["function"]["name"], fn["function"]["arguments"])
            calls += 1
        return out

    yield sse(stream.start())
    ended = None
    try:
        async with aclosing(_choice_deltas(served, ids, images, opts)) as deltas:
            async for c, text, done in deltas:
                events = feed(parser.feed(text)) if text else []
                if done:
                    events += feed(parser.finish())
                    ended = c
                if events:
                    yield sse(events)
    except EngineFailed as e:
        yield sse(stream.fail("server_error", f"the engine failed the request: {e}"))
        return
    assert ended is not None
    usage = usage_of_chat(_chat_usage(served, ids, [ended], in_reasoning))
    events, final = stream.end(_chat_finish(ended, calls), usage)
    keep(final)
    yield sse(events)


def _completion_finish(c: Choice) -> str:
    return c.finish if c.finish in ("stop", "length") else "stop"


def _completion_usage(ids, choices: list[Choice]) -> dict:
    return _usage(len(ids), choices[0].seq.num_cached_prompt, sum(len(c.tokens) for c in choices), 0)


async def _completion_once(served, ids, opts, rid, created) -> dict:
    done = await _collect(served, ids, None, opts)
    choices = []
    for c, text in done:
        logprobs = None
        if opts.logprobs is not None:
            logprobs = CompletionLogprobs(served.tokenizer).take(c.take_logprobs())
        choices.append(
            {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": _completion_finish(c)}
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": served.name,
        "choices": choices,
        "usage": _completion_usage(ids, [c for c, _ in done]),
    }


async def _completion_stream(served, ids, opts, rid, created):
    offsets = [CompletionLogprobs(served.tokenizer) for _ in range(opts.n)]

    def chunk(c: Choice | None, text: str, finish: str | None = None, usage: dict | None = None) -> str:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
        obj["choices"] = []
        if c is not None:
            logprobs = offsets[c.index].take(c.take_logprobs()) if opts.logprobs is not None else None
            obj["choices"] = [{"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        if opts.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    ended: list[Choice] = []
    try:
        async with aclosing(_choice_deltas(served, ids, None, opts)) as stream:
            async for c, text, done in stream:
                if text:  # a held-back token's logprobs go with the text it becomes part of
                    yield chunk(c, text)
                if done:
                    ended.append(c)
                    yield chunk(c, "", _completion_finish(c))
    except EngineFailed as e:
        yield _engine_error(e)
        return
    if opts.include_usage:
        ended.sort(key=lambda c: c.index)
        yield chunk(None, "", usage=_completion_usage(ids, ended))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------- start-up
def load_served(
    model: str,
    device: str = "cpu",
    dtype: str | None = None,
    max_num_seqs: int = 64,
    kv_blocks: int | None = None,
    max_model_len: int | None = None,
    name: str | None = None,
    speculative: str | None = None,
    num_speculative_tokens: int | None = None,
) -> Served:
    """Load a checkpoint directory (or a shipped model name) and start its serving core (speculating with
    the MTP layers when speculative="mtp": every request drafts `num_speculative_tokens` per step)."""
    from advisor.engine import LLM
    from advisor.engine.model_paths import resolve_model
    from advisor.engine.serving import AsyncLLM, EngineCore, ServingConfig
    from advisor.engine.text.tokenizer import StepTokenizer, load_tokenizer

    path = resolve_model(model)
    llm = LLM.from_pretrained(
        path,
        device=device,
        dtype=dtype,
        max_batch_size=max_num_seqs,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
    )
    tok = llm.tokenizer if isinstance(llm.tokenizer, StepTokenizer) else None
    if tok is None:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no tokenizer.json")
        tok = load_tokenizer(path)
    length = max_model_len or _context_length(path)
    llm.core = EngineCore(
        llm, ServingConfig(num_blocks=kv_blocks, max_num_seqs=max_num_seqs, max_model_len=length)
    )
    stops = tuple(sorted(set(tok.eos_token_ids) | set(llm.eos_token_ids)))
    return Served(llm, AsyncLLM(llm.core), tok, name or model, length, stops)


def _context_length(path: Path) -> int:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 8192
    text = raw.get("text_config", raw)
    return int(text.get("max_position_embeddings") or raw.get("max_position_embeddings") or 8192)


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from advisor.engine.listen import ListenError, listen
    from advisor.engine.model.loader import CheckpointError

    api_key = getattr(args, "api_key", None) or os.environ.get(ENV_API_KEY) or None
    refusal = open_host_refusal(
        "advisor serve",
        args.host,
        api_key is not None,
        getattr(args, "allow_unauthenticated", False),
        f"give --api-key KEY (or set {ENV_API_KEY})",
    )
    if refusal:  # before the model loads: nothing to wait for to learn it will not start
        print(refusal, file=sys.stderr)
        return 2
    try:  # the port first: a taken one is said before the model loads, and no address is printed
        sock = listen(args.host, args.port)
    except ListenError as e:
        print(f"advisor serve: {e}", file=sys.stderr)
        return 2
    try:
        served = load_served(
            args.model,
            args.device,
            args.dtype,
            args.max_num_seqs,
            args.kv_blocks,
            args.max_model_len,
            args.served_model_name,
            getattr(args, "speculative", None),
            getattr(args, "num_speculative_tokens", None),
        )
    except (ValueError, CheckpointError, FileNotFoundError) as e:  # a bad model or option: one line
        sock.close()
        print(f"advisor serve: {e}", file=sys.stderr)
        return 2
    auth = "API key required" if api_key else "no API key"
    print(f"advisor serve: {served.name} on http://{args.host}:{args.port}/v1 ({auth})", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(served, api_key), log_level="warning")).run(sockets=[sock])
    return 0


@contextlib.contextmanager
def running(served: Served, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
    """Serve in a background thread (for tests and embedding); yields the base URL (`.../v1` appended
    by the caller). Port 0 picks a free one."""
    import uvicorn

    app = build_app(served, api_key)
    srv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="advisor-serve", daemon=True)
    thread.start()
    try:
        while not srv.started:
            if not thread.is_alive():
                raise RuntimeError(f"advisor serve could not start on {host}:{port}")
            time.sleep(0.02)
        bound = srv.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        srv.should_exit = True
        thread.join(10)


def main(argv: list[str] | None = None) -> int:
    from advisor.engine.serving.args import add_serve_arguments

    p = argparse.ArgumentParser(
        prog="advisor serve", description="OpenAI-compatible server for a Step checkpoint"
    )
    add_serve_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
