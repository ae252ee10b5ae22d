"""Every package imports on its own in a fresh interpreter (no import cycles between advisor and tools)."""

import subprocess
import sys

import pytest

MODULES = [
    "advisor",
    "advisor.messages",
    "advisor.cli",
    "advisor.tools.images",
    "advisor.tools.registry",
    "advisor.tools.profiles",
    "engine",
    "advisor.engine.text.chat",
    "advisor.engine.text.image_plan",
    "advisor.engine.model.config",
    "advisor.engine.serving",
    "advisor.evals.cli",
    "advisor.cluster",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]


def test_cluster_package_imports_ray_only_when_used():
    code = "import sys, advisor.cluster, advisor.runner, advisor.cli; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout.strip()
    assert out == "False"


def test_light_modules_do_not_import_torch():
    code = "import sys, advisor.task, advisor.tools.profiles, advisor.engine.text.image_plan; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout.strip()
    assert out == "False"
