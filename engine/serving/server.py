"""`advisor serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one `AsyncLLM`.

Routes: `POST /v1/chat/completions` (stream and not; tools and tool_choice; tool calls parsed from the
Step format into `tool_calls`, one delta per call as soon as it closes when streaming; reasoning in
`reasoning_content`, as vLLM and SGLang send it; `reasoning_effort`; `image_url` parts as data URLs;
`usage` with `prompt_tokens_details.cached_tokens`, also in a last chunk with
`stream_options.include_usage`), `POST /v1/completions`, `GET /v1/models`, `GET /health`.

Bad input is an OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`) with a 400. A
client that goes away cancels its request, streamed or not: a stream's generator is closed, a reply still
being computed has its task cancelled when the connection's `http.disconnect` arrives; either way the
sequence is aborted and its blocks are freed at the next step. Nothing one request does stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1024


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Served:
    """The model behind the server: the engine, its tokenizer and the names it answers to."""

    llm: Any
    engine: Any  # engine.serving.AsyncLLM
    tokenizer: Any
    name: str
    max_model_len: int
    stops: tuple[int, ...]
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------- parsing
def _number(body: dict, key: str, kind, lo=None, hi=None, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return kind(v)


def sampling_options(body: dict, served: Served, prompt_len: int):
    """SamplingParams from an OpenAI body; a prompt too long for the context is a 400 naming both lengths."""
    from engine.serving import SamplingParams

    if _number(body, "n", int, 1, 1, 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, int, 1, None, None)
    room = served.max_model_len - prompt_len
    if room < 1:
        raise BadRequest(
            f"the prompt is {prompt_len} tokens, longer than this model's context length of "
            f"{served.max_model_len} tokens",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif prompt_len + max_tokens > served.max_model_len:
        raise BadRequest(
            f"the prompt ({prompt_len} tokens) plus {key} ({max_tokens}) exceeds this model's context "
            f"length of {served.max_model_len} tokens",
            key,
            "context_length_exceeded",
        )
    if body.get("logprobs") or body.get("top_logprobs"):
        raise BadRequest("logprobs are not supported", "logprobs")
    if body.get("stop"):
        raise BadRequest("stop sequences are not supported (the model stops at its end-of-turn)", "stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0, 1.0) or 1e-9,
        seed=_number(body, "seed", int, None, None, None),
        stop_token_ids=served.stops,
        num_speculative_tokens=getattr(served.llm, "speculative_tokens", 0),
    )


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise BadRequest("'tools' must be a list of {type: function, function: {name, parameters}}", "tools")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        picked = [t for t in tools if t["function"]["name"] == name]
        if not picked:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return picked
    if choice not in ("auto", "required"):
        raise BadRequest(
            f"tool_choice must be none, auto, required or a function, got {choice!r}", "tool_choice"
        )
    return tools


def _images(messages: list) -> list[bytes]:
    """The bytes of every image_url part (data URLs only: the server fetches nothing), in order."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:") or ";base64," not in url:
                    raise BadRequest(
                        f"messages[{i}].content[{j}]: only base64 data URLs are accepted", "messages"
                    )
                try:
                    out.append(base64.b64decode(url.split(";base64,", 1)[1], validate=True))
                except ValueError as e:
                    raise BadRequest(f"messages[{i}].content[{j}]: bad base64 ({e})", "messages") from None
    return out


def chat_prompt(served: Served, body: dict) -> tuple[list[int], dict | None, list[dict] | None, bool]:
    """Prompt ids, image inputs, the tools offered and whether the prompt ends inside `<think>`."""
    from engine.serving.prompts import image_inputs
    from engine.text.chat import ChatTemplateError

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    tools = _tools(body)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in ("low", "medium", "high"):
        raise BadRequest(f"reasoning_effort must be low, medium or high, got {effort!r}", "reasoning_effort")
    schemas = tools or None
    try:
        text = served.tokenizer.apply_chat_template(messages, schemas, effort=effort, tokenize=False)
    except (ChatTemplateError, ValueError, TypeError, KeyError) as e:
        raise BadRequest(f"messages: {e}", "messages") from None
    try:
        text, images = image_inputs(served.llm, served.tokenizer, _images(messages), text)
    except ValueError as e:
        raise BadRequest(str(e), "messages") from None
    return served.tokenizer.encode(text), images, schemas, text.rstrip().endswith("<think>")


# ---------------------------------------------------------------------------------------- decoding
class Detokenizer:
    """Text deltas from a growing list of ids (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


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


# ---------------------------------------------------------------------------------------- the app
def build_app(served: Served):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def read_body(request: Request) -> dict:
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
        body = await read_body(request)
        ids, images, schemas, in_reasoning = await asyncio.to_thread(chat_prompt, served, body)
        params = sampling_options(body, served, len(ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            gen = _chat_stream(
                served, ids, images, params, schemas, in_reasoning, rid, created, include_usage
            )
            return StreamingResponse(gen, media_type="text/event-stream")
        return await _unless_disconnected(
            request, _chat_once(served, ids, images, params, schemas, in_reasoning, rid, created)
        )

    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = served.tokenizer.encode(prompt)
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            ids = list(prompt)
            vocab = served.llm.config.text.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
        params = sampling_options(body, served, len(ids))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _completion_stream(served, ids, params, rid, created, include_usage),
                media_type="text/event-stream",
            )
        return await _unless_disconnected(request, _completion_once(served, ids, params, rid, created))

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

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={
            BadRequest: bad_request,
            404: not_found,
            405: not_allowed,
            Exception: server_error,
        },
    )


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


def _raise_engine_error(seq) -> None:
    if seq is not None and seq.finish_reason == "error":
        raise BadRequest(f"the engine refused the request: {seq.error}")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chat_once(served, ids, images, params, schemas, in_reasoning, rid, created) -> dict:
    from engine.text.chat_parse import parse_output

    stream = served.engine.generate(ids, params, images)
    async for _ in stream:
        pass
    seq = stream.seq
    _raise_engine_error(seq)
    out = seq.output
    body = out[:-1] if out and out[-1] in params.stop_token_ids else out
    parsed = parse_output(served.tokenizer.decode(body), schemas, in_reasoning=in_reasoning)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
    finish = "tool_calls" if parsed.tool_calls else ("length" if seq.finish_reason == "length" else "stop")
    reasoning = _reasoning_count(out, served.tokenizer.token_to_id("</think>"), in_reasoning)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": served.name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _usage(len(ids), seq.num_cached_prompt, len(out), reasoning),
    }


async def _completion_once(served, ids, params, rid, created) -> dict:
    detok, finish, text = Detokenizer(served.tokenizer), None, ""
    stream = served.engine.generate(ids, params)
    async for ev in stream:
        if ev.token is not None and ev.token not in params.stop_token_ids:
            text += detok.add(ev.token)
        finish = ev.finish_reason
    seq = stream.seq
    _raise_engine_error(seq)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": served.name,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(len(ids), seq.num_cached_prompt, len(seq.output), 0),
    }


async def _chat_stream(served, ids, images, params, schemas, in_reasoning, rid, created, include_usage):
    from engine.text.chat_parse import StreamingParser

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        choices = (
            [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        )
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
        obj["choices"] = choices
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    parser = StreamingParser(schemas, in_reasoning=in_reasoning)
    detok = Detokenizer(served.tokenizer)
    calls = 0
    yield chunk({"role": "assistant", "content": ""})

    def deltas(d) -> list[dict]:
        nonlocal calls
        out = []
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        if d.content:
            out.append({"content": d.content})
        for c in d.tool_calls:
            entry = c.to_openai()
            entry["index"] = calls
            calls += 1
            out.append({"tool_calls": [entry]})
        return out

    stream = served.engine.generate(ids, params, images)
    async for ev in stream:
        if ev.token is not None and ev.token not in params.stop_token_ids:
            text = detok.add(ev.token)
            if text:
                for d in deltas(parser.feed(text)):
                    yield chunk(d)
    seq = stream.seq
    if seq.finish_reason == "error":
        yield _sse(error_body(f"the engine failed the request: {seq.error}", kind="server_error"))
        return
    for d in deltas(parser.finish()):
        yield chunk(d)
    finish = "tool_calls" if calls else ("length" if seq.finish_reason == "length" else "stop")
    yield chunk({}, finish)
    if include_usage:
        reasoning = _reasoning_count(seq.output, served.tokenizer.token_to_id("</think>"), in_reasoning)
        yield chunk(None, usage=_usage(len(ids), seq.num_cached_prompt, len(seq.output), reasoning))
    yield "data: [DONE]\n\n"


async def _completion_stream(served, ids, params, rid, created, include_usage):
    detok = Detokenizer(served.tokenizer)

    def chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> str:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
        obj["choices"] = (
            [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        )
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    stream = served.engine.generate(ids, params)
    async for ev in stream:
        if ev.token is not None and ev.token not in params.stop_token_ids:
            text = detok.add(ev.token)
            if text:
                yield chunk(text)
    seq = stream.seq
    if seq.finish_reason == "error":
        yield _sse(error_body(f"the engine failed the request: {seq.error}", kind="server_error"))
        return
    yield chunk("", seq.finish_reason if seq.finish_reason in ("stop", "length") else "stop")
    if include_usage:
        yield chunk(None, usage=_usage(len(ids), seq.num_cached_prompt, len(seq.output), 0))
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
    from engine import LLM
    from engine.model_paths import resolve_model
    from engine.serving import AsyncLLM, EngineCore, ServingConfig
    from engine.text.tokenizer import StepTokenizer, load_tokenizer

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

    from engine.model.loader import CheckpointError

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
        print(f"advisor serve: {e}", file=sys.stderr)
        return 2
    print(f"advisor serve: {served.name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(build_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


@contextlib.contextmanager
def running(served: Served, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread (for tests and embedding); yields the base URL (`.../v1` appended
    by the caller). Port 0 picks a free one."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(build_app(served), host=host, port=port, log_level="warning"))
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
    from engine.serving.args import add_serve_arguments

    p = argparse.ArgumentParser(
        prog="advisor serve", description="OpenAI-compatible server for a Step checkpoint"
    )
    add_serve_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
