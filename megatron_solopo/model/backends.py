"""Run-time detection of optional accelerators and kernels (Transformer Engine, flash-attn, apex)."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata

import torch


def package_version(dist_name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def te_importable() -> bool:
    """Transformer Engine's PyTorch extension imports (it needs CUDA libraries)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False


@functools.cache
def nvidia_apex_importable() -> bool:
    """NVIDIA apex (not on PyPI; the PyPI 'apex' is unrelated, so check for apex's own modules)."""
    try:
        importlib.import_module("apex.normalization")
        return True
    except Exception:  # noqa: BLE001
        return False


@functools.cache
def flash_attn_importable() -> bool:
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:  # noqa: BLE001
        return False


def resolve_attention_backend(requested: str) -> str:
    """Maps `auto` to `te` (CUDA + TE) or `sdpa`; rejects `te` where TE cannot run, with the reason."""
    if requested == "auto":
        return "te" if torch.cuda.is_available() and te_importable() else "sdpa"
    if requested == "te":
        if not torch.cuda.is_available():
            raise ValueError("model.attention_backend=te needs a CUDA GPU; use sdpa (or auto) on CPU")
        if not te_importable():
            raise ValueError("model.attention_backend=te but transformer_engine.pytorch does not import; "
                             "install it (pip install -e .[te]) or use sdpa")
    return requested
