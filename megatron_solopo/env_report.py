"""`solopo env`: what this machine offers the project (never raises on a machine without a GPU)."""

from __future__ import annotations

import argparse
import platform
import sys

from megatron_solopo.model import backends


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
        "megatron_core": backends.package_version("megatron-core"),
        "transformer_engine": backends.package_version("transformer-engine")
        or backends.package_version("transformer_engine"),
        "transformer_engine_usable": backends.te_importable(),
        "flash_attn": backends.package_version("flash-attn") or backends.package_version("flash_attn"),
        "nvidia_apex": backends.nvidia_apex_importable(),
        "transformers": backends.package_version("transformers"),
        "datasets": backends.package_version("datasets"),
        "trl": backends.package_version("trl"),
        "vllm": backends.package_version("vllm"),
        "default_attention_backend": backends.resolve_attention_backend("auto"),
        "distributed_backend": "nccl" if torch.cuda.is_available() else "gloo (CPU shim)",
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                f"sm_{props.major}{props.minor}")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--presets", action="store_true", help="also list the model presets")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        import json

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
        from megatron_solopo.model.presets import get_preset, list_presets

        print("\nmodel presets:")
        for name in list_presets():
            preset = get_preset(name)
            print(f"  {name:<14} {preset.architecture:<8} {preset.num_parameters() / 1e6:>9.1f}M params, "
                  f"{preset.num_layers} layers, {preset.num_attention_heads}/{preset.num_query_groups} heads")
    return 0
