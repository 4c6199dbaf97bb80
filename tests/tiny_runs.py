"""`solopo train` subprocesses of the tiny CPU config: the settings of the session's shared finished run
(tests/conftest.py `finished_tiny_run`) and the environment every such subprocess gets."""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_RUN_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
TINY_RUN_OVERRIDES = ("train.global_batch_pairs=2", "train.micro_batch_pairs=1", "train.steps=3",
                      "train.warmup_steps=0", "train.save_every=1", "train.keep_last=0")
"""The shared finished run's settings (besides train.output_dir and data.cache_dir): 3 steps of 2 pairs,
a checkpoint after every step, all kept."""


def tiny_run_command(out_dir, cache_dir, *overrides: str) -> list[str]:
    """`solopo train` of the tiny CPU config into `out_dir` with the shared run's settings, then `overrides`."""
    return [sys.executable, "-m", "megatron_solopo.cli", "train", "--config", str(TINY_RUN_CONFIG),
            f"train.output_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY_RUN_OVERRIDES, *overrides]


def tiny_run_env() -> dict[str, str]:
    """The environment of a `solopo train` subprocess: no launcher variables or stop files of the caller,
    one thread (bitwise-reproducible CPU reductions), this checkout first on the path."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SOLOPO_STOP_FILE", "SOLOPO_EXIT_STATUS_FILE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env
