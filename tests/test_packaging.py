"""The distribution's layout: one top-level package (`advisor`), with the repository's engine/, tools/,
evals/ and models/ folders mapped under it, and every subpackage on disk listed in pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_only_advisor_is_installed_at_the_top_level():
    packages = _setuptools()["packages"]
    assert {p.split(".")[0] for p in packages} == {"advisor"}


def test_every_package_folder_is_listed():
    conf = _setuptools()
    package_dir = conf["package-dir"]
    on_disk = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "suites" in rel.parts:  # eval suites' task repositories: data, not part of the package
                continue
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk == set(conf["packages"])
