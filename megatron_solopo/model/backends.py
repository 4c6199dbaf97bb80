"""Run-time detection of optional accelerators and kernels (Transformer Engine, flash-attn, apex)."""

from __future__ import annotations

import functools
import importlib

import torch
from megatron_solopo.parallel.device import cuda_in_use


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


def resolve_attention_backend(requested: str, params_dtype: str | None = None) -> str:
    """Maps `auto` to `te` (CUDA in use + TE) or `sdpa`; rejects `te` where TE cannot run, with the reason.

    `auto` with `params_dtype="fp32"` on a GPU with TE is refused: Transformer Engine has no fused
    attention kernel for fp32 (and no backend at all with context parallelism or packing), so the
    default fp32 would silently fall to TE's unfused O(s^2) path or fail. The message says to train in
    bf16 on the GPU (or to pick sdpa explicitly). `params_dtype=None` skips that check (reports).
    """
    on_cuda = cuda_in_use()
    if requested == "auto":
        if not (on_cuda and te_importable()):
            return "sdpa"
        if params_dtype == "fp32":
            raise ValueError("model.attention_backend=auto picks Transformer Engine on this GPU, but "
                             "model.params_dtype=fp32 has no fused TE attention (none at all with context "
                             "parallelism or packing): set model.params_dtype=bf16 (the GPU setting), or "
                             "model.attention_backend=sdpa to train in fp32")
        return "te"
    if requested == "te":
        if not on_cuda:
            raise ValueError("model.attention_backend=te needs a CUDA GPU (and SOLOPO_DEVICE not cpu); "
                             "use sdpa (or auto) on CPU")
        if not te_importable():
            raise ValueError("model.attention_backend=te but transformer_engine.pytorch does not import; "
                             "install it (pip install -e .[te]) or use sdpa")
    return requested


# Oldest GPU architecture (compute capability) each TE FP8 recipe runs on (Transformer Engine 2.20:
# per-tensor FP8 from Ada/Hopper, 1x128/128x128 block scaling from Hopper, MXFP8 only on Blackwell).
FP8_RECIPE_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def check_fp8_recipe(fp8: str | None, fp8_recipe: str, capability: tuple[int, int] | None = None) -> None:
    """Refuses an FP8 recipe this GPU cannot run (e.g. mxfp8 on Hopper sm_90), naming the alternatives.

    `capability` defaults to the current CUDA device's; nothing is checked without FP8 or without CUDA.
    """
    if fp8 is None:
        return
    if capability is None:
        if not cuda_in_use():
            return
        capability = tuple(torch.cuda.get_device_capability())
    need = FP8_RECIPE_MIN_CAPABILITY.get(fp8_recipe)
    if need is None:
        raise ValueError(f"model.fp8_recipe={fp8_recipe!r} is not one of {', '.join(FP8_RECIPE_MIN_CAPABILITY)}")
    if tuple(capability) < need:
        runnable = [r for r, c in FP8_RECIPE_MIN_CAPABILITY.items() if tuple(capability) >= c]
        raise ValueError(f"model.fp8_recipe={fp8_recipe} needs a GPU of compute capability >= sm_{need[0]}{need[1]}, "
                         f"this one is sm_{capability[0]}{capability[1]}; use "
                         f"{' or '.join(runnable) if runnable else 'fp8=null (no FP8 on this GPU)'}")
