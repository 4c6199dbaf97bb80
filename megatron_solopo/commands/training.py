"""`solopo train --config X.yaml [section.key=value ...]`: run (or resume) training on every rank, and
`solopo precompute-ref` (`PrecomputeRef`): store the frozen reference model's log-probs next to the data.

Launch one process per GPU with torchrun (or srun); a single process needs no launcher. Exit status:
0 when the run reached its last step, 75 (loop.EXIT_RESUMABLE) when it stopped early with a complete
checkpoint (train.max_steps_per_run, $SOLOPO_STOP_FILE or SIGTERM), 2 on a configuration, data,
checkpoint or file error or a diverged (NaN/Inf) loss, with the reason on one line of stderr
(console.py).
"""

from __future__ import annotations

import argparse
from megatron_solopo.config import load_config
from megatron_solopo.console import check_writable_dir, launcher_rank, removed_if_left_empty, report_error
from megatron_solopo.training.loop import TrainingDiverged, train
from megatron_solopo.training.reference import precompute_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="experiment YAML (sections model, parallel, objective, data, train, eval); "
                             "examples/configs/tiny_cpu.yaml runs on CPU")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 train.steps=100")


def run(args: argparse.Namespace) -> int:
    rank0 = launcher_rank() == 0
    config = load_config(args.config, list(args.overrides))
    try:
        with removed_if_left_empty(config.train.output_dir, enabled=rank0):  # a failed run leaves no new directory
            check_writable_dir(config.train.output_dir, "train.output_dir")  # before minutes of setup
            check_writable_dir(config.data.cache_dir, "data.cache_dir")
            summary = train(config)
    except TrainingDiverged as err:  # not a ValueError, but the message is the fix
        return report_error("train", err)
    if rank0:
        state = ("finished" if summary.finished else
                 f"stopped early ({summary.stop_reason}); run again with train.resume=auto to continue")
        if summary.stop_reason == "already_finished":
            print(f"solopo train: {config.train.output_dir} already finished at step {summary.final_step}/"
                  f"{summary.total_steps}; nothing to train (its config.yaml and run_summary.json are unchanged)")
            return summary.exit_code
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
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing table of other pairs or another model (refused without it; "
                                 "one of these pairs and this model is reused)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        config = load_config(args.config, list(args.overrides))
        summary = precompute_reference(config, output=args.output, overwrite=getattr(args, "overwrite", False))
        if launcher_rank() == 0 and summary["reused"]:
            print(f"{summary['path']} already holds the reference log-probs of these {summary['count']} pairs and this "
                  "model; nothing to compute (--overwrite recomputes it)")
        elif launcher_rank() == 0:  # no process group any more
            print(f"wrote reference log-probs for {summary['count']} pairs ({', '.join(summary['roles'])}) to "
                  f"{summary['path']} in {summary['seconds']:.1f} s")
        return 0
