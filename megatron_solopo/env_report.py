"""`solopo env`: what this machine offers the project (never raises on a machine without a GPU)."""

from __future__ import annotations

import argparse
import platform
import sys

from megatron_solopo.model import backends
from megatron_solopo.model.presets import get_preset, list_presets
from megatron_solopo.parallel.device import cuda_in_use, requested_device
from megatron_solopo.versions import package_version


def collect() -> dict:
    """A dict describing Python, torch/CUDA, Megatron-Core, TE, flash-attn, apex and the GPUs."""
    import torch


    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
        "megatron_core": package_version("megatron-core"),
        "transformer_engine": package_version("transformer-engine")
        or package_version("transformer_engine"),
        "transformer_engine_usable": backends.te_importable(),
        "flash_attn": package_version("flash-attn") or package_version("flash_attn"),
        "nvidia_apex": backends.nvidia_apex_importable(),
        "transformers": package_version("transformers"),
        "datasets": package_version("datasets"),
        "trl": package_version("trl"),
        "vllm": package_version("vllm"),
        "default_attention_backend": backends.resolve_attention_backend("auto"),
        "distributed_backend": "nccl" if cuda_in_use() else "gloo (CPU shim)",
        "requested_device": requested_device() or "auto (SOLOPO_DEVICE unset)",
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                f"sm_{props.major}{props.minor}")
    info["missing_optional"] = missing_optional(info)
    return info


def missing_optional(info: dict) -> str:
    """One line: which optional accelerations are absent and what falls back (solopo mutes the
    import-time warnings Megatron-Core and torch print about them, console.DEPENDENCY_WARNINGS)."""
    missing = []
    if not info["transformer_engine_usable"]:
        missing.append("Transformer Engine (attention falls back to PyTorch SDPA; no FP8)")
    if not info["nvidia_apex"]:
        missing.append("apex (Megatron uses torch optimizers and norms)")
    if not info["flash_attn"]:
        missing.append("flash-attn")
    if not info["cuda_available"]:
        missing.append("CUDA (CPU only)")
    return "none" if not missing else "; ".join(missing) + " - SOLOPO_SHOW_WARNINGS=1 shows the import warnings"


def measure_matmul_gflops(size: int = 2048, repeats: int = 5, device: str | None = None) -> dict:
    """This machine's dense fp32 matmul throughput: the best and median GFLOP/s of `repeats` timed
    [size x size] @ [size x size] products (2 * size^3 FLOPs each) after one warm-up, on `device`
    (default: cuda when in use, else cpu). The yardstick for "fraction of peak" figures."""
    import statistics
    import time

    import torch

    if device is None:
        device = "cuda" if cuda_in_use() else "cpu"
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    rates = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first product warms up the kernels and the allocator
            rates.append(2.0 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return {"matmul_size": size, "matmul_device": device, "matmul_threads": torch.get_num_threads(),
            "matmul_gflops": round(max(rates), 1), "matmul_gflops_median": round(statistics.median(rates), 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--presets", action="store_true", help="also list the model presets")
    parser.add_argument("--measure-matmul", action="store_true",
                        help="also time a 2048^3 fp32 matmul (GFLOP/s): the machine's compute yardstick")


def run(args: argparse.Namespace) -> int:
    import json

    info = collect()
    if args.measure_matmul:
        info.update(measure_matmul_gflops())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if key == "gpus":
            value = "none (CPU only: gloo + the CPU shim)" if not value else "; ".join(value)
        elif value is None:
            value = "not installed"
        print(f"{key:<{width}}  {value}")
    if args.presets:
        print("\nmodel presets:")
        for name in list_presets():
            preset = get_preset(name)
            print(f"  {name:<14} {preset.architecture:<8} {preset.num_parameters() / 1e6:>9.1f}M params, "
                  f"{preset.num_layers} layers, {preset.num_attention_heads}/{preset.num_query_groups} heads")
    return 0
