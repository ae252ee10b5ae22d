"""Step chat format: OpenAI-style messages (+ tools, effort) -> prompt text, and model output -> message.

Rendering goes through a Jinja2 template in a sandboxed environment: the checkpoint's own
(`tokenizer_config.json` `chat_template`, or `chat_template.jinja`) when it ships one, else
`engine/templates/step_chat.jinja`. The environment mirrors the one `transformers` uses for
`apply_chat_template` (trim/lstrip blocks, loop controls, a plain-JSON `tojson`), so a template renders
the same text here as there.

Parsing lives in `advisor.engine.text.chat_parse`; its public names are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from advisor.engine.text.chat_parse import (
    ChatDelta,
    ParsedOutput,
    ParseError,
    StreamingParser,
    ToolCall,
    parse_output,
)
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "EFFORTS",
    "IMAGE_PLACEHOLDER",
    "ChatDelta",
    "ChatTemplate",
    "ChatTemplateError",
    "ParseError",
    "ParsedOutput",
    "StreamingParser",
    "ToolCall",
    "encode_chat",
    "expand_image_placeholders",
    "image_token_layout",
    "normalize_messages",
    "parse_output",
    "render_chat",
]

EFFORTS = ("low", "medium", "high")
ROLES = ("system", "user", "assistant", "tool")
# One per image in the rendered text, as in transformers' Step3p7Processor; `expand_image_placeholders`
# turns each into that image's full token layout.
IMAGE_PLACEHOLDER = "<im_patch>"
DEFAULT_TEMPLATE_PATH = Path(__file__).parent / "templates" / "step_chat.jinja"

# Token counts of the released vision tower: a 728 px global view -> 13x13, a 504 px crop -> 9x9.
GLOBAL_VIEW_TOKENS = 169
LOCAL_CROP_TOKENS = 81


class ChatTemplateError(ValueError):
    """A message list or template that cannot be rendered; the message names what and where."""


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&', which would garble tool schemas in the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env


class ChatTemplate:
    """A compiled chat template; `source` is the Jinja2 text, `origin` says where it came from."""

    def __init__(self, source: str, origin: str = "<string>"):
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{origin}: chat template does not compile: {e}") from None

    @property
    def handles_effort(self) -> bool:
        """Whether the template reads `effort` / `reasoning_effort` itself; if not, `render` writes the
        effort line into the system message, so any checkpoint template gets it."""
        return _EFFORT_VAR.search(self.source) is not None

    @classmethod
    def default(cls) -> ChatTemplate:
        return _default_template()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate:
        """The checkpoint's own template when it ships one, else the engine's default."""
        source, origin = find_checkpoint_template(Path(path))
        return cls(source, origin) if source is not None else cls.default()

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        effort: str | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        msgs = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        if effort is not None and effort not in EFFORTS:
            raise ChatTemplateError(f"effort {effort!r}: expected one of {', '.join(EFFORTS)}")
        if effort is not None and not self.handles_effort:
            msgs = _with_effort_line(msgs, effort)
        try:
            return self._template.render(
                messages=msgs,
                tools=tool_list or None,
                effort=effort,
                reasoning_effort=effort,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except ChatTemplateError as e:  # the template's own raise_exception(...)
            raise ChatTemplateError(f"{self.origin}: the template refused the messages: {e}") from None
        except TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: rendering failed: {e}") from None


_EFFORT_VAR = re.compile(r"\b(?:reasoning_)?effort\b")


def _with_effort_line(msgs: list[dict[str, Any]], effort: str) -> list[dict[str, Any]]:
    line = f"Reasoning: {effort}"
    if msgs and msgs[0]["role"] == "system":
        first = dict(msgs[0])
        content = first["content"]
        if isinstance(content, str):
            first["content"] = f"{content}\n\n{line}" if content else line
        else:
            first["content"] = [*content, {"type": "text", "text": f"\n\n{line}" if content else line}]
        return [first, *msgs[1:]]
    return [{"role": "system", "content": line}, *msgs]


@lru_cache(maxsize=1)
def _default_template() -> ChatTemplate:
    return ChatTemplate(DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8"), str(DEFAULT_TEMPLATE_PATH))


def find_checkpoint_template(path: Path) -> tuple[str | None, str]:
    """(template source, origin) from `chat_template.jinja` or `tokenizer_config.json`; (None, "") if absent."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{cfg_file}: not valid JSON ({e})") from None
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str) and tpl.strip():
            return tpl, f"{cfg_file} chat_template"
    return None, ""


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    effort: str | None = None,
    add_generation_prompt: bool = True,
    template: ChatTemplate | str | Path | None = None,
) -> str:
    """Render messages in the Step chat format.

    `template`: a ChatTemplate, a checkpoint directory (its own template, else the default), Jinja2
    source text, or None for the default.
    """
    if template is None:
        tpl = ChatTemplate.default()
    elif isinstance(template, ChatTemplate):
        tpl = template
    elif isinstance(template, Path) or (
        isinstance(template, str) and "{" not in template and Path(template).is_dir()
    ):
        tpl = ChatTemplate.from_checkpoint(template)
    else:
        tpl = ChatTemplate(template)
    return tpl.render(messages, tools, effort=effort, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------------------- messages
def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages and bring them to the shape chat templates expect.

    Tool-call arguments become dicts (templates iterate them), an assistant's inline
    `<think>...</think>` moves to `reasoning_content`, `None` content becomes "".
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise ChatTemplateError(f"messages: expected a list of dicts, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"{where}: expected a dict, got {type(m).__name__}")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ChatTemplateError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        msg = dict(m)
        msg["role"] = role
        msg["content"] = _normalize_content(m.get("content"), where)
        if role == "assistant":
            _normalize_assistant(msg, where)
        out.append(msg)
    return out


def _normalize_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ChatTemplateError(f"{where}.content: expected a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image", "image_url"):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"{where}.content[{j}]: unsupported part {kind!r} (expected text, image or image_url)"
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{where}.content[{j}]: text part without a string 'text'")
        parts.append(dict(part))
    return parts


def _normalize_assistant(msg: dict[str, Any], where: str) -> None:
    content = msg["content"]
    if msg.get("reasoning_content") is None and isinstance(content, str) and "</think>" in content:
        reasoning, _, rest = content.partition("</think>")
        msg["reasoning_content"] = reasoning.replace("<think>", "", 1).strip("\n")
        msg["content"] = rest.lstrip("\n")
    calls = []
    for j, call in enumerate(msg.get("tool_calls") or []):
        cwhere = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise ChatTemplateError(f"{cwhere}: expected a dict")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatTemplateError(f"{cwhere}: missing function name")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ChatTemplateError(f"{cwhere}.function.arguments: not valid JSON ({e})") from None
        if not isinstance(args, Mapping):
            raise ChatTemplateError(f"{cwhere}.function.arguments: expected a JSON object")
        calls.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": dict(args)}})
    if calls:
        msg["tool_calls"] = calls
    else:
        msg.pop("tool_calls", None)


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI function schemas; a bare {"name", "parameters"} dict is wrapped as type=function."""
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}]: expected a dict")
        if "function" not in tool:
            tool = {"type": "function", "function": dict(tool)}
        fn = tool["function"]
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatTemplateError(f"tools[{i}]: missing function name")
        out.append(dict(tool))
    return out


# ------------------------------------------------------------------------------------------ images
def image_token_layout(
    num_local_patches: int = 0,
    patch_newline_mask: Sequence[bool] | None = None,
    *,
    global_tokens: int = GLOBAL_VIEW_TOKENS,
    local_tokens: int = LOCAL_CROP_TOKENS,
) -> str:
    """One image's token text: each local crop `<patch_start>` + N x `<im_patch>` + `<patch_end>`
    (+ `<patch_newline>` where the mask says a row ends), then the global view in `<im_start>...<im_end>`."""
    if patch_newline_mask is not None and len(patch_newline_mask) != num_local_patches:
        raise ValueError(
            f"patch_newline_mask has {len(patch_newline_mask)} entries for {num_local_patches} local patches"
        )
    from advisor.engine.text.image_plan import image_token_text

    return image_token_text(num_local_patches, patch_newline_mask or (), global_tokens, local_tokens)


def expand_image_placeholders(text: str, layouts: Sequence[str]) -> str:
    """Replace the i-th image placeholder in rendered chat text with `layouts[i]`."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(layouts):
        raise ValueError(
            f"chat text has {len(pieces) - 1} image placeholders but {len(layouts)} images were given"
        )
    out = [pieces[0]]
    for layout, piece in zip(layouts, pieces[1:], strict=True):
        out += [layout, piece]
    return "".join(out)


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    effort: str | None = None,
    image_layouts: Sequence[str] | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt ids for the embedded engine: render with the tokenizer's template, give each image its
    token layout (`image_token_layout(...)`, one per image in message order), encode.

    `tokenizer`: an `advisor.engine.text.tokenizer.StepTokenizer` (anything with `apply_chat_template(...,
    tokenize=False)` and `encode(text)`).
    """
    text = tokenizer.apply_chat_template(
        messages, tools, effort=effort, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return list(tokenizer.encode(expand_image_placeholders(text, image_layouts or [])))
