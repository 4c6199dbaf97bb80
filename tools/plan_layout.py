#!/usr/bin/env python
"""Dry run: print the TP/PP/CP/DP layout and the per-GPU memory of one training step for a config, launch nothing.

    python tools/plan_layout.py --config examples/configs/recipes/llama3.1-8b-128k/solo-orpo.yaml \
        --nodes 2 --gpus-per-node 8 [--gpu-memory-gib 80] [--preset llama3.1-8b] [section.key=value ...]

The memory is `solopo plan`'s: the real training step of rank 0 of the layout, run on fake tensors in this
one CPU process at 2 and 4 layers and extrapolated to the model's depth (megatron_solopo/plan/, exact:
docs/scaling.md). A layout fits when that peak is at most 90% of --gpu-memory-gib (the rest is kept for what
the dry run does not count: CUDA context, NCCL, allocator fragmentation). With pipeline parallelism both
the first stage (which holds the most micro-batches in flight) and the last (which holds the LM head) are
planned, and the larger peak decides. Where the dry run cannot plan a config (padded layout, another
objective mode) only the analytical lower bound (plan/lower_bound.py) is printed, labelled as such.
Exit status 0 when it fits, 3 when it does not, 2 for a config error (message on stderr).
Needs only the package's Python dependencies (no GPU, no process group), so it runs on a login node
(~20-40 s for an 8B model). A thin script: the code is megatron_solopo/plan/layout.py and
commands/plan.py's `PlanLayout`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from megatron_solopo.console import mute_dependency_warnings

    mute_dependency_warnings()  # as `solopo` does: SOLOPO_SHOW_WARNINGS=1 shows them
    from megatron_solopo.commands.plan import PlanLayout

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    PlanLayout.add_arguments(parser)
    return PlanLayout.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
