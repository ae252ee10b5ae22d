"""JSON on the hot paths (the proxy's bodies, the endpoints' requests and replies, trace lines), through
orjson when it is installed (`advisor[proxy]`), else the standard library, with json's results.

What orjson refuses and json accepts (non-string keys it cannot write, integers past 64 bits, NaN or
lone surrogates in a document read) goes through json, so results and error messages are json's. One
difference stays: NaN and infinities written become null with orjson (json writes NaN, which is not
JSON); where a NaN must be refused (a request body), use json.dumps with allow_nan=False.
"""

from __future__ import annotations

import json
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
