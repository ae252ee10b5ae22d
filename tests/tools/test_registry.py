import json

import pytest
from advisor.tools.registry import BUILTIN, resolve

NAMES = [
    "crop",
    "zoom",
    "bbox",
    "find_regions",
    "python",
    "web_search",
    "fetch_page",
    "read_file",
    "write_file",
    "list_files",
    "shell",
    "edit_file",
    "view_file",
    "search",
]


def test_builtin_names_and_resolve_order():
    assert list(BUILTIN) == NAMES
    assert [s.name for s in resolve(["python", "crop", "zoom"])] == ["python", "crop", "zoom"]
    assert resolve([]) == []


def test_unknown_tool_names_it_and_the_known_ones():
    with pytest.raises(KeyError) as e:
        resolve(["crop", "ocr"])
    assert str(e.value) == "unknown tool 'ocr'; known tools: " + ", ".join(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_schemas_are_complete_for_both_providers(name):
    spec = BUILTIN[name]
    oa, an = spec.openai_schema(), spec.anthropic_schema()
    assert oa["function"]["name"] == an["name"] == name
    params = an["input_schema"]
    assert params["type"] == "object" and "ctx" not in params["properties"]
    assert len(an["description"]) > 20 and an["description"][0].isupper()
    for pname, prop in params["properties"].items():
        assert prop.get("description"), f"{name}.{pname} has no description"
    json.dumps(oa)
    assert spec.context_param == "ctx"
