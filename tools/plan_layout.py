#!/usr/bin/env python
"""Dry run: print the TP/PP/CP/DP layout and a per-GPU memory estimate for a config, launch nothing.

    python tools/plan_layout.py --config examples/configs/recipes/llama3.1-8b-128k/solo-orpo.yaml \
        --nodes 2 --gpus-per-node 8 [--gpu-memory-gib 80] [--preset llama3.1-8b] [section.key=value ...]

Exit status 0 when the estimate fits, 3 when it does not, 2 for a config error (message on stderr).
The memory model and its assumptions: megatron_solopo/training/memory_estimate.py (docs/slurm.md).
Needs only the package's Python dependencies (no GPU, no process group), so it runs on a login node.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import TYPE_CHECKING

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig


def _preset_for(config: ExperimentConfig, name: str | None):
    """--preset, else what the trainer would use (model.hf_model's config.json, model.checkpoint's
    marker, else model.preset)."""
    from megatron_solopo.checkpoint.loader import resolve_preset
    from megatron_solopo.model.presets import get_preset

    if name:
        return get_preset(name)
    hf_model = config.model.hf_model
    if hf_model and not (pathlib.Path(hf_model) / "config.json").is_file():
        raise ValueError(f"model.hf_model={hf_model} has no config.json here; pass --preset NAME "
                         "(e.g. smollm2-135m, qwen2.5-7b, llama3.1-8b) to plan without the checkpoint")
    return resolve_preset(config.model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (a recipe)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--preset", help="model preset to plan with (default: from the config)")
    parser.add_argument("--json", action="store_true", help="also print the estimate as JSON (GiB)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)

    from megatron_solopo.config import load_config
    from megatron_solopo.training.memory_estimate import plan_layout

    try:
        config = load_config(args.config, args.overrides)
        preset = _preset_for(config, args.preset)
        plan = plan_layout(config, preset, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
    except (ValueError, FileNotFoundError) as err:
        print(f"plan_layout: {err}", file=sys.stderr)
        return 2
    print(f"config: {args.config}")
    print("\n".join(plan.lines))
    if args.json:
        print(json.dumps({"tp": plan.parallel.tp, "pp": plan.parallel.pp, "cp": plan.parallel.cp, "dp": plan.dp,
                          "fits": plan.fits, "gib": plan.estimate.as_gib()}))
    return 0 if plan.fits else 3


if __name__ == "__main__":
    sys.exit(main())
