"""An OpenAI request body, checked, as what the engine runs: the prompt's ids (and images), one
`SamplingParams` per choice, the stop strings and the log-probability and streaming options.

Every parameter the body may carry is either honoured, ignored because it cannot change the reply
(`user`, `metadata`, ...), or refused with a 400 that names it; nothing is silently dropped.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 1024
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions), vLLM's default limit
MAX_N = 128  # OpenAI's limit on choices

# Parameters each route honours; `IGNORED` change nothing in the reply (ids and labels for the caller's
# own bookkeeping); anything else is a 400.
COMMON = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
}  # fmt: skip
CHAT = COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "reasoning_effort", "response_format", "modalities", "store",
}  # fmt: skip
COMPLETIONS = COMMON | {"prompt", "echo", "suffix", "best_of"}
IGNORED = {"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class RequestOptions:
    params: list[Any]  # one advisor.engine.serving.SamplingParams per choice
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top tokens reported per position; None: no logprobs
    stream: bool = False
    include_usage: bool = False
    parallel_tool_calls: bool = True

    @property
    def n(self) -> int:
        return len(self.params)


def _number(body: dict, key: str, kind, lo=None, hi=None, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = (
            f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"between {lo} and {hi}"
        )
        raise BadRequest(f"'{key}' must be {bound}, got {v}", key)
    return kind(v)


def check_parameters(body: dict, route: str) -> None:
    """A 400 naming the first parameter this server does not honour (or honours only in part)."""
    known = CHAT if route == "chat" else COMPLETIONS
    for key in body:
        if key not in known and key not in IGNORED:
            raise BadRequest(f"unsupported parameter '{key}'", key, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("only response_format {type: text} is supported", "response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise BadRequest("only the text modality is supported", "modalities")
    if body.get("store"):
        raise BadRequest("this server stores no completions (store must be false)", "store")
    if body.get("echo"):
        raise BadRequest("echo is not supported", "echo")
    if body.get("suffix") is not None:
        raise BadRequest("suffix is not supported", "suffix")
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise BadRequest("best_of is not supported (other than equal to n)", "best_of")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    return tuple(stop)


def _logprobs(body: dict, route: str) -> int | None:
    if route == "completions":
        return _number(body, "logprobs", int, 0, MAX_LOGPROBS, None)
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise BadRequest(f"'logprobs' must be a boolean, got {want!r}", "logprobs")
    top = _number(body, "top_logprobs", int, 0, MAX_LOGPROBS, None)
    if top is not None and not want:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must map token ids to biases", "logit_bias")
    out = []
    for k, v in bias.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: {k!r} is not a token id", "logit_bias") from None
        if not 0 <= t < vocab:
            raise BadRequest(f"logit_bias: token id {t} is not in [0, {vocab})", "logit_bias")
        out.append((t, _number({"logit_bias": v}, "logit_bias", float, -100, 100)))
    return tuple(out)


def request_options(body: dict, served, prompt_len: int, route: str) -> RequestOptions:
    """The engine's view of the body; a prompt too long for the context is a 400 naming both lengths."""
    from advisor.engine.serving import SamplingParams

    n = _number(body, "n", int, 1, MAX_N, 1)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, None, None)
    room = served.max_model_len - prompt_len
    if room < 1:
        raise BadRequest(
            f"the prompt is {prompt_len} tokens, longer than this model's context length of "
            f"{served.max_model_len} tokens",
            "messages" if route == "chat" else "prompt",
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
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadRequest(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, got {stream!r}", "stream")
    logprobs = _logprobs(body, route)
    seed = _number(body, "seed", int, None, None, None)
    speculative = getattr(served.llm, "speculative_tokens", 0)
    common = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", float, 0.0, 1.0, 1.0) or 1e-9,
        stop_token_ids=served.stops,
        presence_penalty=_number(body, "presence_penalty", float, -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", float, -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body, served.llm.config.text.vocab_size),
        logprobs=logprobs,
        num_speculative_tokens=speculative,
    )
    if speculative:  # a verify step accepts drafts on the raw logits: none of these would apply to them
        for key in ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"):
            if body.get(key):
                raise BadRequest(f"'{key}' is not supported while the server speculates (--speculative)", key)
    # Choice i draws from seed + i (as vLLM seeds its parallel samples): n different, reproducible choices.
    params = [SamplingParams(seed=None if seed is None else seed + i, **common) for i in range(n)]
    return RequestOptions(
        params,
        _stop(body),
        logprobs,
        stream,
        bool((body.get("stream_options") or {}).get("include_usage")),
        parallel,
    )


# ------------------------------------------------------------------------------------ prompts
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


def chat_prompt(served, body: dict) -> tuple[list[int], dict | None, list[dict] | None, bool]:
    """Prompt ids, image inputs, the tools offered and whether the prompt ends inside `<think>`."""
    from advisor.engine.serving.prompts import image_inputs
    from advisor.engine.text.chat import ChatTemplateError

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


def completion_prompt(served, body: dict) -> list[int]:
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
    return ids
