"""Planning: what a layout needs before anything runs on a GPU.

`solopo plan` (commands/plan.py): one rank's peak memory for a layout from a fake-tensor dry run of the real
training step (dry_run.py, memory.py; plain.py: the plain-PyTorch comparison) and the layout search with its
step-time projection (search.py); the FLOP formulas that projection and `solopo bench` share (flops.py); the
analytic per-GPU memory lower bound (lower_bound.py); a config's layout checked against a job and planned
(layout.py: `tools/plan_layout.py`, the SLURM scripts' `--dry-run`).

The names below are imported on first use (PEP 562), so the pure-arithmetic modules (flops, lower_bound)
import without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"PlanResult": "dry_run", "PlanSpec": "dry_run", "parse_tokens": "dry_run", "plan_step": "dry_run",
            "LiveBytesTracker": "memory", "MemoryBreakdown": "memory"}

__all__ = ["LiveBytesTracker", "MemoryBreakdown", "PlanResult", "PlanSpec", "parse_tokens", "plan_step"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_solopo.plan.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
