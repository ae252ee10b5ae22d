"""The built-in tools by name, and `resolve` for task files and callers that name tools."""

from __future__ import annotations

from advisor.tools.edit import edit_file, search, view_file
from advisor.tools.image_tools import crop_image, draw_boxes, find_regions_tool, zoom_image
from advisor.tools.sandbox import python_tool
from advisor.tools.shell import shell_tool
from advisor.tools.spec import ToolSpec
from advisor.tools.web import fetch_page, web_search
from advisor.tools.workspace import list_files, read_file, write_file

BUILTIN: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        crop_image,
        zoom_image,
        draw_boxes,
        find_regions_tool,
        python_tool,
        web_search,
        fetch_page,
        read_file,
        write_file,
        list_files,
        shell_tool,
        edit_file,
        view_file,
        search,
    )
}


class UnknownToolError(KeyError):
    """A KeyError whose message reads cleanly (KeyError would show it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resolve(names: list[str]) -> list[ToolSpec]:
    """The ToolSpecs for `names`, in order; an unknown name raises naming it and the known ones."""
    specs = []
    for name in names:
        if name not in BUILTIN:
            raise UnknownToolError(f"unknown tool {name!r}; known tools: {', '.join(BUILTIN)}")
        specs.append(BUILTIN[name])
    return specs
