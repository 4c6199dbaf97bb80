"""Which device this process computes on: the CUDA GPU when one is visible, unless the CPU is requested.

A CPU run on a GPU host (the CPU test suite, `solopo bench --device cpu`) must not drift onto the GPU:
`default_backend()`, the CPU shim, the model builder, the attention-backend choice and the training step
all ask `cuda_in_use()` instead of `torch.cuda.is_available()`. The request is the environment variable
`SOLOPO_DEVICE` (cpu | cuda), so processes spawned by a run (gloo ranks, torchrun workers) inherit it.
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "SOLOPO_DEVICE"
DEVICES = ("cpu", "cuda")


def requested_device() -> str | None:
    """The device requested through SOLOPO_DEVICE (cpu | cuda), or None (auto: CUDA when visible)."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in DEVICES:
        raise ValueError(f"{DEVICE_ENV}={value!r} is not one of cpu, cuda (or unset/auto)")
    return value


def request_device(device: str | None) -> None:
    """Requests `device` (cpu | cuda | None = auto) for this process and the processes it spawns.

    Call it before torch.distributed and the model are built (the CPU shim is installed at that point).
    """
    if device is None or device == "auto":
        os.environ.pop(DEVICE_ENV, None)
        return
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of cpu, cuda")
    os.environ[DEVICE_ENV] = device


def cuda_in_use() -> bool:
    """True when this process computes on CUDA: a GPU is visible and the CPU was not requested.

    Raises when CUDA is requested but torch sees no GPU.
    """
    requested = requested_device()
    if requested == "cpu":
        return False
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError(f"{DEVICE_ENV}=cuda but torch sees no CUDA GPU; unset it or use cpu")
    return available


def compute_device() -> torch.device:
    """torch.device of this process's compute: cuda:<current> or cpu."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_in_use() else torch.device("cpu")


def setting_device(value: str, setting: str) -> torch.device:
    """The torch.device a device setting names (eval.device, data.sampling_device): "auto" -> CUDA when in use,
    else the CPU; a CUDA device on a machine where torch sees none is a ValueError naming `setting`."""
    if value == "auto":
        return torch.device("cuda" if cuda_in_use() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{setting}={value} but torch sees no CUDA GPU on this machine; use {setting}=auto or cpu")
    return torch.device(value)
