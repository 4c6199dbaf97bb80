"""`solopo`: the command-line entry point. Each subcommand lives in its room as a module exposing
`add_arguments(parser)` and `run(args) -> int`; this file only maps names to those modules."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("megatron_solopo.env_report", "print what this machine has: torch/CUDA, Megatron-Core, TE, GPUs"),
    "fetch-default-model": ("megatron_solopo.convert.default_model",
                            "download and convert the embedded default model (SmolLM2-135M-Instruct)"),
    "convert": ("megatron_solopo.convert.commands", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "build-data": ("megatron_solopo.data.commands", "build SoLoPO preference data (contexts, sampling, pairs)"),
    "precompute-ref": ("megatron_solopo.training.reference",
                       "store the frozen reference model's log-probs next to the data"),
    "train": ("megatron_solopo.training.commands", "train with SoLoPO or a baseline objective"),
    "eval": ("megatron_solopo.eval.commands", "evaluate long-context QA (sub-EM, EM, F1) and plot"),
    "bench": ("megatron_solopo.bench", "benchmark solo-X vs long-X: time per pair, memory, max length"),
    "demo": ("megatron_solopo.demo", "the end-to-end demo: fetch, build data, train, evaluate"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast --help, fast start)."""
    parser = argparse.ArgumentParser(prog="solopo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
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
