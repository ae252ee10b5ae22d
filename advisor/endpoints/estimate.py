"""Token estimates for providers that send no usage, so a call is never silently free.

Text: about 4 characters per token. Images: width*height/750 tokens (Anthropic's published rule, close
to OpenAI's tile rule for the sizes we send), capped at 1600, from the image header; 1000 when the
header cannot be read. Each message adds a few tokens of chat-format overhead. The result is marked
`Usage.estimated = True`, and the ledger shows it as an estimate.
"""

from __future__ import annotations

import io
import json
import math

from PIL import Image, UnidentifiedImageError

from advisor.messages import ImagePart, Message, TextPart, Usage

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
IMAGE_TOKENS_CAP = 1600
IMAGE_TOKENS_UNKNOWN = 1000


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def image_tokens(image: ImagePart) -> int:
    try:
        with Image.open(io.BytesIO(image.data)) as im:  # reads the header only
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError):
        return IMAGE_TOKENS_UNKNOWN
    return max(1, min(IMAGE_TOKENS_CAP, math.ceil(w * h / 750)))


def message_tokens(message: Message) -> int:
    n = MESSAGE_OVERHEAD
    for part in message.content:
        n += text_tokens(part.text) if isinstance(part, TextPart) else image_tokens(part)
    for call in message.tool_calls:
        n += text_tokens(call.name) + text_tokens(call.raw_arguments or json.dumps(call.arguments or {}))
    return n


def estimate_usage(messages: list[Message], tool_schemas: list[dict], reply: Message) -> Usage:
    """Estimated usage of one call: prompt = messages + tool schemas; output = the reply."""
    prompt = sum(message_tokens(m) for m in messages)
    if tool_schemas:
        prompt += text_tokens(json.dumps(tool_schemas))
    output = text_tokens(reply.text)
    for call in reply.tool_calls:
        output += text_tokens(call.name) + text_tokens(call.raw_arguments)
    reasoning = text_tokens(reply.reasoning or "")
    return Usage(
        input=prompt, output=max(1, output) if not reasoning else output, reasoning=reasoning, estimated=True
    )
