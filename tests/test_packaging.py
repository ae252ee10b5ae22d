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


def test_one_stepfun_base_url_everywhere():
    # StepFun's global platform, whose USD prices the price data carries; the preset is the reference
    import re

    from advisor.scaffold import STEPFUN_BASE_URL

    assert STEPFUN_BASE_URL == "https://api.stepfun.ai/v1"
    seen = {}
    for folder in ("examples", "docs", "advisor", "evals"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".yaml", ".md", ".py") and path.is_file():
                for url in re.findall(r"https://api\.stepfun\.[a-z]+/v1", path.read_text(encoding="utf-8")):
                    seen.setdefault(url, []).append(str(path.relative_to(ROOT)))
    assert set(seen) == {STEPFUN_BASE_URL}, seen
