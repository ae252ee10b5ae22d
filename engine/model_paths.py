"""Where checkpoints are found by name: a path, a directory under `$ADVISOR_MODELS_DIR` (default
`~/.cache/advisor/models`), or one of the models shipped with the package (`advisor.models`: the repository's
`models/` folder). Shared by the embedded endpoint, `advisor serve` and the benchmarks (torch-free)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

MODELS_DIR_ENV = "ADVISOR_MODELS_DIR"
# the project's own small checkpoints (models/step-nano, ...), found by name without any set-up: package
# data, so a wheel install has them too
SHIPPED_MODELS = Path(str(files("advisor.models")))


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV) or Path.home() / ".cache" / "advisor" / "models").expanduser()


def resolve_model(model: str) -> Path:
    """A checkpoint directory from a path or a shipped model name; one-line error when neither exists."""
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return as_path.resolve()
    if "/" not in model:
        for root in (models_dir(), SHIPPED_MODELS):
            if (root / model).is_dir():
                return (root / model).resolve()
    raise FileNotFoundError(
        f"model {model!r}: no checkpoint directory at that path, under {models_dir()} or among the shipped "
        f"models in {SHIPPED_MODELS} (give a path, or set {MODELS_DIR_ENV})"
    )
