"""`solopo`: the command-line entry point. Each subcommand lives in its room's commands module as an
object exposing `add_arguments(parser)` and `run(args) -> int`: the module itself, or a class of static
methods named `module:Class` when one module serves several commands; this file only maps names to them."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> ("module" or "module:Class", one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("megatron_solopo.env_report", "print what this machine has: torch/CUDA, Megatron-Core, TE, GPUs"),
    "fetch-default-model": ("megatron_solopo.convert.commands:FetchDefaultModel",
                            "download and convert the embedded default model (SmolLM2-135M-Instruct)"),
    "convert": ("megatron_solopo.convert.commands", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "build-data": ("megatron_solopo.data.commands", "build SoLoPO preference data (contexts, sampling, pairs)"),
    "precompute-ref": ("megatron_solopo.training.commands:PrecomputeRef",
                       "store the frozen reference model's log-probs next to the data"),
    "train": ("megatron_solopo.training.commands", "train with SoLoPO or a baseline objective"),
    "eval": ("megatron_solopo.eval.commands", "evaluate long-context QA (sub-EM, EM, F1) and plot"),
    "bench": ("megatron_solopo.bench.commands", "benchmark solo-X vs long-X: time per pair, memory, max length"),
    "demo": ("megatron_solopo.demo", "the end-to-end demo: fetch, build data, train, evaluate"),
    "experiment": ("megatron_solopo.experiment.commands",
                   "the quality experiment: SoLo-X vs long-X vs expand-long-X vs base, with CIs and cost"),
    "plan": ("megatron_solopo.plan.commands",
             "per-GPU peak memory of one training step for a layout (fake-tensor dry run)"),
}


def _command(target: str):
    """The object behind a COMMANDS entry: "pkg.module" -> the module, "pkg.module:Class" -> that class."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast --help, fast start)."""
    parser = argparse.ArgumentParser(prog="solopo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            command = _command(module_name)
            command.add_arguments(cmd)
            cmd.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
