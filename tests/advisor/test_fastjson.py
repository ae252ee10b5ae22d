"""advisor.fastjson gives json's results (and errors) with orjson and without it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from advisor import fastjson


@pytest.fixture(params=["orjson", "json"])
def backend(request, monkeypatch):
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(fastjson, "orjson", None)
    return request.param


@dataclass
class Point:
    x: int


DOC = {"text": "héllo ✓ 日本", "n": [1, 2.5, -3, True, None], "nested": {"a": {"b": []}}}


def test_round_trips_are_jsons(backend):
    raw = fastjson.dumps(DOC)
    assert raw == json.dumps(DOC, ensure_ascii=False, separators=(",", ":")).encode()
    assert fastjson.loads(raw) == DOC and fastjson.loads(raw.decode()) == DOC


def test_what_orjson_refuses_json_still_handles(backend):
    assert fastjson.dumps({1: 2**70}) == b'{"1":1180591620717411303424}'
    assert fastjson.loads('{"x": NaN}')["x"] != fastjson.loads('{"x": NaN}')["x"]  # NaN, as json reads it
    assert fastjson.loads('"\\ud800"') == "\ud800"  # a lone surrogate, as json reads it
    with pytest.raises(json.JSONDecodeError) as err:
        fastjson.loads(b'{"a": 1,')
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(b'{"a": 1,')
    assert str(err.value) == str(expected.value)


def test_unknown_types_go_to_default_as_in_json(backend):
    when = datetime(2026, 1, 2, tzinfo=UTC)
    ev = {"p": Point(1), "t": when}
    assert fastjson.loads(fastjson.dumps(ev, default=str)) == {"p": "Point(x=1)", "t": str(when)}
    with pytest.raises(TypeError):
        fastjson.dumps({"p": Point(1)})
    with pytest.raises(TypeError):
        fastjson.dumps({"s": {1, 2}})


def test_dumps_finite_refuses_nan_and_infinity_wherever_they_are(backend):
    assert fastjson.dumps_finite(DOC) == json.dumps(DOC, ensure_ascii=False, separators=(",", ":")).encode()
    for bad in (float("nan"), float("inf"), -float("inf")):
        doc = {"content": None, "tools": [{"schema": {"minimum": (1, bad)}}]}
        with pytest.raises(ValueError, match="Out of range float"):
            fastjson.dumps_finite(doc)
    with pytest.raises(TypeError):
        fastjson.dumps_finite({"p": Point(1)})  # no default here: json's TypeError
