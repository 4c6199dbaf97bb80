"""`solopo`: the command-line entry point. Each subcommand lives in its room's commands module as an
object exposing `add_arguments(parser)` and `run(args) -> int`: the module itself, or a class of static
methods named `module:Class` when one module serves several commands; this file only maps names to them,
and turns user errors into one line and exit status 2 (console.py)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_solopo.console import USER_ERRORS, mute_dependency_warnings, report_error
from megatron_solopo.dataclass_yaml import OVERRIDE_PATTERN

DESCRIPTION = ("SoLoPO: short-to-long preference optimization of LLMs for long contexts, on Megatron-Core. "
               "Build preference data, train (SoLo-DPO/IPO/SimPO/ORPO and baselines), convert checkpoints, "
               "evaluate long-context QA, benchmark and plan runs. `solopo COMMAND --help` for each command.")

# name -> ("module" or "module:Class", one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("megatron_solopo.env_report", "print what this machine has: torch/CUDA, Megatron-Core, TE, GPUs"),
    "fetch-default-model": ("megatron_solopo.commands.convert:FetchDefaultModel",
                            "download and convert the embedded default model (SmolLM2-135M-Instruct)"),
    "convert": ("megatron_solopo.commands.convert", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "build-data": ("megatron_solopo.commands.data", "build SoLoPO preference data (contexts, sampling, pairs)"),
    "precompute-ref": ("megatron_solopo.commands.training:PrecomputeRef",
                       "store the frozen reference model's log-probs next to the data"),
    "train": ("megatron_solopo.commands.training", "train with SoLoPO or a baseline objective"),
    "eval": ("megatron_solopo.commands.eval", "evaluate long-context QA (sub-EM, EM, F1) and plot"),
    "bench": ("megatron_solopo.commands.bench", "benchmark solo-X vs long-X: time per pair, memory, max length"),
    "demo": ("megatron_solopo.demo", "the end-to-end demo: fetch, build data, train, evaluate"),
    "experiment": ("megatron_solopo.commands.experiment",
                   "the quality experiment: SoLo-X vs long-X vs expand-long-X vs base, with CIs and cost"),
    "plan": ("megatron_solopo.commands.plan",
             "per-GPU peak memory of one training step for a layout (fake-tensor dry run)"),
}


def _command(target: str):
    """The object behind a COMMANDS entry: "pkg.module" -> the module, "pkg.module:Class" -> that class."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast --help, fast start)."""
    parser = argparse.ArgumentParser(prog="solopo", description=DESCRIPTION)
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
    mute_dependency_warnings()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = _parse(parser, argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("SOLOPO_TRACEBACK") == "1":
            raise
        return report_error(args.command, err)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that `section.key=value` overrides may come anywhere after the subcommand
    (argparse alone takes the positional list once: `--config X a.b=1 --flag c.d=2` lost `c.d=2`)."""
    args, extras = parser.parse_known_args(argv)
    stray = [a for a in extras if not OVERRIDE_PATTERN.match(a)]
    if stray or (extras and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


if __name__ == "__main__":
    sys.exit(main())
