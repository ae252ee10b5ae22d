"""The installed package's version (`advisor --version`, the OpenTelemetry resource)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("advisor")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
