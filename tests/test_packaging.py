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


def test_the_wheel_ships_what_a_run_needs(tmp_path):
    """Built from a copy of the tree (an in-tree build would leave build/ behind): one top-level package,
    and every file a run reads besides code. `.ci/wheel-smoke` installs it and runs the Quickstart."""
    import shutil
    import subprocess
    import sys
    import zipfile

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("advisor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"advisor", wheel.name.split("-py3")[0] + ".dist-info"}
    templates = {p.name for p in (ROOT / "advisor" / "templates").glob("*.jinja")}
    assert templates and {f"advisor/templates/{t}" for t in templates} <= names
    needed = {
        "advisor/data/prices.yaml",
        "advisor/engine/text/templates/step_chat.jinja",
        "advisor/engine/model/csrc/cpu_decode.cpp",
        "advisor/models/__init__.py",
        "advisor/models/embedded-pair.yaml",
        *(
            f"advisor/models/{m}/{f}"
            for m in ("step-nano", "step-nano-large")
            for f in (
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
            )
        ),
        *(
            f"advisor/engine/kernels/configs/{p.name}"
            for p in (ROOT / "engine" / "kernels" / "configs").glob("*.json")
        ),
    }
    assert needed <= names, sorted(needed - names)
    entry_points = (
        zipfile.ZipFile(wheel).read(wheel.name.split("-py3")[0] + ".dist-info/entry_points.txt").decode()
    )
    assert (
        "advisor.evals.cli:add_eval_parser" in entry_points and "advisor = advisor.cli:main" in entry_points
    )
