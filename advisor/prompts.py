"""Jinja2 prompt templates, shipped in the package (advisor/templates/)."""

from __future__ import annotations

from functools import cache

import jinja2


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("advisor", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render(name: str, **values: object) -> str:
    return _env().get_template(f"{name}.jinja").render(**values).strip()
