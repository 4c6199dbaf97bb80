"""`solopo train --config X.yaml [section.key=value ...]`: run (or resume) training on every rank, and
`solopo precompute-ref` (`PrecomputeRef`): store the frozen reference model's log-probs next to the data.

Launch one process per GPU with torchrun (or srun); a single process needs no launcher. Exit status:
0 when the run reached its last step, 75 (loop.EXIT_RESUMABLE) when it stopped early with a complete
checkpoint (train.max_steps_per_run, or $SOLOPO_STOP_FILE), 1 on a configuration, data or checkpoint
error or a diverged (NaN/Inf) loss, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="experiment YAML (sections model, parallel, objective, data, train, eval); "
                             "examples/configs/tiny_cpu.yaml runs on CPU")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 train.steps=100")


def run(args: argparse.Namespace) -> int:
    from megatron_solopo.config import ConfigError, load_config
    from megatron_solopo.training.checkpointing import CheckpointError
    from megatron_solopo.training.loop import TrainingDiverged, train
    from megatron_solopo.training.reference import ReferenceMismatchError

    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    try:
        config = load_config(args.config, list(args.overrides))
        summary = train(config)
    except (ConfigError, CheckpointError, ReferenceMismatchError, TrainingDiverged, FileNotFoundError,
            ValueError) as err:
        if rank0:
            print(f"solopo train: error: {err}", file=sys.stderr)
        return 1
    if rank0:
        state = ("finished" if summary.finished else
                 f"stopped early ({summary.stop_reason}); run again with train.resume=auto to continue")
        loss = summary.last_metrics.get("loss")
        print(f"solopo train: {state} at step {summary.final_step}/{summary.total_steps} in {summary.wall_time_s:.1f} s"
              + (f", last loss {loss:.4f}" if loss is not None else "")
              + (f"; checkpoint {summary.checkpoint}" if summary.checkpoint else ""))
    return summary.exit_code


class PrecomputeRef:
    """`solopo precompute-ref --config X.yaml [section.key=value ...] [--output PATH]`: runs
    `reference.precompute_reference` (the same config as training; collective over every rank)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, help="experiment YAML (the same one training uses)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_pairs=4")
        parser.add_argument("--output", default=None,
                            help="where to write the table (default: train.reference_path, else reference_logps.pt "
                                 "next to the pairs file)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from megatron_solopo.config import ConfigError, load_config
        from megatron_solopo.training.reference import precompute_reference

        rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0  # no process group any more
        try:
            config = load_config(args.config, list(args.overrides))
            summary = precompute_reference(config, output=args.output)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            if rank0:
                print(f"solopo precompute-ref: error: {err}", file=sys.stderr)
            return 1
        if rank0:
            print(f"wrote reference log-probs for {summary['count']} pairs ({', '.join(summary['roles'])}) to "
                  f"{summary['path']} in {summary['seconds']:.1f} s")
        return 0
