"""A scripted, local, OpenAI- and Anthropic-compatible model server for tests and demos.

`ScriptedServer` is a real HTTP server (starlette on uvicorn) bound to 127.0.0.1 on a free port, run in
a background thread, so sync and async tests can both talk to it over real sockets. What it answers
is scripted per model name: each request for a model takes the next turn of that model's script.

    from advisor.testing import HTTPError, Delay, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

    scripts = {
        "flash": [
            HTTPError(429, retry_after=0.01),                      # rate limited once
            Reply(tool_calls=[ScriptedToolCall("crop", {"box": [0, 0, 10, 10]})],
                  usage=ScriptedUsage(prompt_tokens=120, completion_tokens=30,
                                      cached_tokens=100, reasoning_tokens=12)),
            Reply(tool_calls=[ScriptedToolCall("crop", '{"box": [0, 0')]),   # malformed arguments
            Delay(5.0),                                            # hangs: lets a client time out
            "the total is 42.17",                                  # a str is Reply(text=...)
        ],
        # a callable turn sees the request JSON and returns a turn: reply depending on the messages
        "frontier": [lambda req: Reply(text="advice: crop the bottom third first")],
    }
    with ScriptedServer(scripts) as server:
        server.base_url            # "http://127.0.0.1:PORT/v1"  (OpenAI provider base_url)
        server.anthropic_base_url  # "http://127.0.0.1:PORT"     (Anthropic provider base_url)
        ...                        # run the code under test
        server.requests            # every request received, in order (RecordedRequest)
        server.requests_for("flash")[0].body["tools"]
        server.endpoint_config("flash")               # EndpointConfig(provider="openai", free=True, ...)
        server.endpoint_config("claude", "anthropic", price=Price(input=3, output=15))

Routes: `POST /v1/chat/completions` (OpenAI chat completions), `POST /v1/messages` (Anthropic
Messages), `GET /v1/models`. Both POST routes share the scripts; the reply is rendered in the route's
wire format (Anthropic: thinking/text/tool_use blocks, `stop_reason`, `input_tokens` etc.). A request
with `stream: true` is answered with server-sent events in its format (OpenAI chunks, usage last when
`stream_options.include_usage`; Anthropic's message_start ... message_stop events), each text,
reasoning and tool-argument string split over two deltas.

A script is either a list of turns (each request consumes one; when the list is used up the server
answers HTTP 400 with "script for model ... is exhausted", which endpoints do not retry) or a single
callable `fn(request_json) -> turn` that answers every request. A turn is:

- `Reply(text=..., tool_calls=[...], reasoning=..., usage=..., finish_reason=..., delay_s=...)`;
  `usage=None` omits usage from the response (clients must then estimate); the default usage is
  `ScriptedUsage(prompt_tokens=100, completion_tokens=20)`. Streamed, it is paced by
  `chunk_delay_s` (the wait before each event after the first), `hold` (a `threading.Event`: after
  the first delta the stream waits until a test sets it, at most `hold_s`, else it is cut off there:
  a test sets it once its client saw that delta, which proves the delta was passed on before the
  upstream finished) and `cut_after=N` (the stream ends unfinished after N deltas). How each stream
  ended is recorded: `RecordedRequest.stream_outcome` is "complete", "cut" or "client left" (the
  client closed the connection first), `deltas_sent` counts what went out.
- `ScriptedToolCall(name, arguments)`: `arguments` is a dict (sent as a JSON string), or a str sent
  verbatim (use it for malformed JSON). On the Anthropic route a str is parsed when it is valid JSON,
  else sent as the raw string in `input` (which a client must reject as not an object).
- `HTTPError(status, message="", retry_after=None)`: an error response in the provider's error JSON;
  `retry_after` (seconds, or a str such as an HTTP date) becomes the `Retry-After` header.
- `Delay(seconds, then=None)`: wait, then answer `then` (or, when None, HTTP 504). Use it to make a
  client time out; pending delays end at once when the server stops.
- a plain `str`: shorthand for `Reply(text=...)`; a callable: called (in one of 64 worker threads, so
  callables that wait on the test do not queue the others) with the request JSON, returns one of the
  above.

`server.script(model, script)` replaces a script, `server.add_turns(model, *turns)` appends, and
`server.remaining(model)` counts what is left (-1 for a callable script).
`server.in_flight(model)` counts the requests for a model being answered now (a streamed one until its
stream ends) and `server.peak_in_flight(model)` the most at once: what an endpoint's `max_concurrency`
test asserts.

The package: `script.py` (the turns, their usage, recorded requests: no wire format), `server.py`
(`ScriptedServer`: scripts, recording, lifecycle, the routes), and one module per wire format,
`openai.py` and `anthropic.py`, each rendering a scripted reply or error in its provider's JSON.

Secrets: request headers are recorded with `Authorization`, `x-api-key` and `api-key` replaced by
"<redacted>"; `RecordedRequest.auth_sha256` holds a SHA-256 of the credential so a test can check
`req.auth_is("sk-...")` without the server keeping the key. Nothing is logged (uvicorn access log off).
"""

from advisor.testing.script import (
    Delay,
    HTTPError,
    RecordedRequest,
    Reply,
    Script,
    ScriptedToolCall,
    ScriptedUsage,
    StreamEvent,
    Turn,
)
from advisor.testing.server import ScriptedServer

__all__ = [
    "Delay",
    "HTTPError",
    "RecordedRequest",
    "Reply",
    "Script",
    "ScriptedServer",
    "ScriptedToolCall",
    "ScriptedUsage",
    "StreamEvent",
    "Turn",
]
