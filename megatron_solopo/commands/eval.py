"""`solopo eval`: long-context QA evaluation of a checkpoint, and side-by-side comparison of reports.

    solopo eval --hf-model DIR [--config X.yaml] [section.key=value ...]
    solopo eval --checkpoint DIR [--config X.yaml] [section.key=value ...]
    solopo eval --compare a/report.json b/report.json          # table + plot only
    solopo eval --hf-model DIR --compare base/report.json       # evaluate, then compare

This module is the command line only; `eval.evaluate.evaluate()` is the library entry point (how a
Megatron-Core checkpoint is loaded or exported is described there).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from megatron_solopo.config import load_config
from megatron_solopo.console import EXIT_USER_ERROR, check_writable_dir, removed_if_left_empty
from megatron_solopo.dataclass_yaml import OVERRIDE_PATTERN
from megatron_solopo.eval.evaluate import ModelSource, compare_reports, evaluate
from megatron_solopo.eval.report import load_report

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["add_arguments", "run"]


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (its eval, data and model sections are used); "
                                         "default: built-in defaults")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-model", metavar="DIR", help="Hugging Face model directory to evaluate")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="Megatron-Core checkpoint directory (from solopo train or convert hf-to-mcore)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's)")
    parser.add_argument("--label", help="name of the model in reports and tables (default: directory name)")
    parser.add_argument("--compare", nargs="+", metavar="REPORT",
                        help="report.json files to put side by side (with a model: after evaluating it); "
                             "writes compare.md and compare.png to eval.output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. eval.num_samples=5 eval.context_lengths=[1024,4096]")


def _model_source(args: argparse.Namespace, config: ExperimentConfig) -> ModelSource | None:
    """--hf-model / --checkpoint; without them the config's model, except with --compare (table only)."""
    tokenizer = args.tokenizer or config.model.tokenizer
    label = args.label or config.eval.label
    if args.hf_model:
        return ModelSource("hf", args.hf_model, tokenizer or args.hf_model, label)
    if args.checkpoint:
        return ModelSource("megatron", args.checkpoint, tokenizer, label)
    if args.compare:
        return None
    if config.model.hf_model:
        return ModelSource("hf", config.model.hf_model, tokenizer or config.model.hf_model, label)
    if config.model.checkpoint:
        return ModelSource("megatron", config.model.checkpoint, tokenizer, label)
    return None


def run(args: argparse.Namespace) -> int:
    """Evaluates and/or compares; user errors propagate to `solopo` (one line, exit status 2)."""
    # `--compare a.json b.json eval.x=1`: argparse gives the override to --compare; take it back
    overrides = list(args.overrides) + [c for c in args.compare or [] if OVERRIDE_PATTERN.match(c)]
    args.compare = [c for c in args.compare or [] if not OVERRIDE_PATTERN.match(c)] or None
    config = load_config(args.config, overrides)
    source = _model_source(args, config)
    if source is None and not args.compare:
        print("solopo eval: nothing to evaluate; give --hf-model DIR or --checkpoint DIR (or model.hf_model / "
              "model.checkpoint in the config), or --compare REPORT.json ...", file=sys.stderr)
        return EXIT_USER_ERROR
    with removed_if_left_empty(config.eval.output_dir):  # a failed eval leaves no new empty directory
        check_writable_dir(config.eval.output_dir, "eval.output_dir")  # before minutes of generation
        reports = []
        if source is not None:
            report, paths = evaluate(config, source, progress=not args.no_progress)
            _print_summary(report, paths)
            reports.append(report)
        if args.compare:
            reports = [load_report(p) for p in args.compare] + reports
            table, paths = compare_reports(reports, config.eval.output_dir)
            print(table)
            print("comparison written to " + ", ".join(paths.values()))
    return 0


def _print_summary(report: dict, paths: dict[str, str]) -> None:
    overall = report["overall"]
    print(f"{report['model']['label']}: sub-EM {overall['sub_em']:.1f}  EM {overall['em']:.1f}  "
          f"F1 {overall['f1']:.1f}  ({overall['num_items']} items, decoding {report['generation']['path']})")
    for suite, agg in report["suites"].items():
        print(f"  {suite:<12} sub-EM {agg['sub_em']:5.1f}  ({agg['num_items']} items)")
    for suite, reasons in report["skipped"].items():
        if reasons:
            print(f"  {suite}: contexts skipped: " + ", ".join(f"{k} x{v}" for k, v in reasons.items()))
    print("report: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
