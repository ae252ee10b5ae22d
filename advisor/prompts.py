"""Jinja2 prompt templates from the repository's prompts/ folder."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(PROMPTS_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render(name: str, **values: object) -> str:
    return _env().get_template(f"{name}.jinja").render(**values).strip()
