"""Installed versions of distributions, read from their metadata (standard library only: the GPU session's
light modules and every report read them without importing torch)."""

from __future__ import annotations

import importlib.metadata


def package_version(dist_name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
