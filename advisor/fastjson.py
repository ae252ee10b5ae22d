"""JSON on the hot paths (the proxy's bodies, the endpoints' requests and replies, trace lines), through
orjson when it is installed (`advisor[proxy]`), else the standard library, with json's results.

What orjson refuses and json accepts (non-string keys it cannot write, integers past 64 bits, NaN or
lone surrogates in a document read) goes through json, so results and error messages are json's. One
difference stays: NaN and infinities written become null with orjson (json writes NaN, which is not
JSON); where a NaN must be refused (a request body), use `dumps_finite`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is not installed
    orjson = None  # type: ignore[assignment]

# dataclasses, datetimes and str/int subclasses go to `default`, as json.dumps would send them
_OPTS = (
    (orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME)
    if orjson is not None
    else 0
)


def loads(data: bytes | str) -> Any:
    """json.loads(data)."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json's verdict and message: it may read it (NaN), else it says where it broke
    return json.loads(data)


def dumps(obj: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON: json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=default)
    .encode() (NaN aside, see above); TypeError as json raises it."""
    if orjson is not None:
        try:
            return orjson.dumps(obj, default=default, option=_OPTS)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=default).encode()


def _finite(obj: Any) -> bool:
    """No NaN or infinity anywhere in `obj` (dicts, lists, tuples)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, float):
            if not math.isfinite(x):
                return False
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return True


def dumps_finite(obj: Any) -> bytes:
    """Compact UTF-8 JSON that refuses NaN and infinities: json.dumps(obj, ensure_ascii=False,
    separators=(",", ":"), allow_nan=False).encode(); ValueError or TypeError as json raises them."""
    if orjson is not None:
        try:
            out = orjson.dumps(obj, option=_OPTS)
        except orjson.JSONEncodeError:
            pass  # json's verdict and message
        else:
            # orjson writes a NaN as null: only a document with a null can hide one
            if b"null" not in out or _finite(obj):
                return out
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
