"""Eval reports: the JSON document, its schema check, PNG plots and Markdown tables.

Report JSON (schema_version 1; docs/evaluation.md has the same table)::

    schema_version  int      1
    kind            str      "megatron_solopo.eval_report"
    created_utc     str      ISO-8601 time the report was written
    model           object   label, kind (hf | megatron), path, fingerprint, step (int|null),
                             tokenizer, tokenizer_fingerprint
    generation      object   backend, path (hf-unpadded-prefill | hf-generate | mcore-engine |
                             static-kv-loop | recompute-loop), device, dtype, max_new_tokens, batch_size, greedy (true),
                             shared_prefix_tokens (hf: leading prompt tokens prefilled once for all; optional)
    config          object   eval: the eval section; prompt: the data-section fields that render prompts
    machine         object   platform, python, cpu_count, gpus (list of str)
    versions        object   megatron_solopo, torch, transformers, megatron_core, cuda (str|null)
    timing          object   seconds_total, seconds_build, seconds_generate, num_prompts,
                             prompt_tokens, generated_tokens, generated_tokens_per_second
    overall         object   sub_em, em, f1 (percent, 0-100), num_items
    suites          object   suite -> {sub_em, em, f1, num_items}
    by_length       list     {suite, context_length, sub_em, em, f1, num_items} (long suites, jsonl)
    cells           list     {suite, context_length, depth, sub_em, em, f1, num_items}
    skipped         object   suite -> {reason -> count} (contexts that could not be built)
    items           list     per question and cell: suite, item_id, source_id, question, answers,
                             context_length, depth, prompt_tokens, input_tokens, prediction,
                             final_answer, sub_em, em, f1, generated_tokens, meta

Scores of items are 0/1 (sub_em, em) and [0, 1] (f1); aggregates are percentages.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo import __version__ as solopo_version
from megatron_solopo.data.records import write_json
from megatron_solopo.eval.metrics import METRICS, aggregate, aggregate_by, cell_table
from megatron_solopo.versions import package_version

__all__ = ["SCHEMA_VERSION", "REPORT_KIND", "REPORT_SCHEMA", "ITEM_SCHEMA", "build_report", "validate_report",
           "load_report", "write_report", "plot_accuracy_vs_length", "plot_depth_heatmap", "report_markdown",
           "compare_markdown", "plot_comparison", "machine_info", "versions_info"]

SCHEMA_VERSION = 1
REPORT_KIND = "megatron_solopo.eval_report"

_NUM = (int, float)
_AGG = {"sub_em": _NUM, "em": _NUM, "f1": _NUM, "num_items": int}
REPORT_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "kind": str,
    "created_utc": str,
    "model": {"label": str, "kind": str, "path": str, "fingerprint": str, "step": (int, type(None)),
              "tokenizer": str, "tokenizer_fingerprint": str},
    "generation": {"backend": str, "path": str, "device": str, "dtype": str, "max_new_tokens": int,
                   "batch_size": int, "greedy": bool},
    "config": {"eval": dict, "prompt": dict},
    "machine": {"platform": str, "python": str, "cpu_count": int, "gpus": list},
    "versions": {"megatron_solopo": str, "torch": str, "transformers": (str, type(None)),
                 "megatron_core": (str, type(None)), "cuda": (str, type(None))},
    "timing": {"seconds_total": _NUM, "seconds_build": _NUM, "seconds_generate": _NUM, "num_prompts": int,
               "prompt_tokens": int, "generated_tokens": int, "generated_tokens_per_second": _NUM},
    "overall": _AGG,
    "suites": dict,
    "by_length": list,
    "cells": list,
    "skipped": dict,
    "items": list,
}
"""Required keys and their JSON types (a nested dict = a required object with those keys)."""
ITEM_SCHEMA: dict[str, Any] = {
    "suite": str, "item_id": str, "source_id": str, "question": str, "answers": list,
    "context_length": (int, type(None)), "depth": (int, float, type(None)), "prompt_tokens": int,
    "input_tokens": int, "prediction": str, "final_answer": (str, type(None)), "sub_em": _NUM, "em": _NUM,
    "f1": _NUM, "generated_tokens": int, "meta": dict,
}
_CELL_SCHEMA = {"suite": str, "context_length": (int, type(None)), "depth": (int, float, type(None)), **_AGG}


# ------------------------------------------------------------------------------------------ identity
def machine_info() -> dict[str, Any]:
    """Platform, Python, CPU count and GPU names of this machine."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(f"{props.name}, {props.total_memory / 2**30:.0f} GiB")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count() or 0,
            "gpus": gpus}


def versions_info() -> dict[str, str | None]:
    """Versions of the packages that determine the numbers."""
    import torch


    return {"megatron_solopo": str(solopo_version), "torch": torch.__version__,
            "transformers": package_version("transformers"), "megatron_core": package_version("megatron-core"),
            "cuda": torch.version.cuda}


# ------------------------------------------------------------------------------------------ building
def build_report(*, items: Sequence[Mapping[str, Any]], skipped: Mapping[str, Mapping[str, int]],
                 model: Mapping[str, Any], generation: Mapping[str, Any], config: Mapping[str, Any],
                 timing: Mapping[str, Any], long_suites: Sequence[str]) -> dict[str, Any]:
    """Assembles a schema-conforming report from scored item records and run metadata."""
    items = [dict(item) for item in items]
    suites = {row["suite"]: {k: row[k] for k in (*METRICS, "num_items")} for row in aggregate_by(items, ("suite",))}
    length_rows = [r for r in items if r["suite"] in long_suites or r["suite"] == "jsonl"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": REPORT_KIND,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": dict(model),
        "generation": dict(generation),
        "config": dict(config),
        "machine": machine_info(),
        "versions": versions_info(),
        "timing": dict(timing),
        "overall": aggregate(items),
        "suites": suites,
        "by_length": aggregate_by(length_rows, ("suite", "context_length")),
        "cells": cell_table(items),
        "skipped": {suite: dict(reasons) for suite, reasons in skipped.items()},
        "items": items,
    }
    validate_report(report)
    return report


def _check(value: Any, spec: Any, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    # JSON has no int/bool distinction problems except bool being an int in Python: reject it
    if isinstance(value, bool) and bool not in types:
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got bool")
    elif not isinstance(value, types):
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")


def validate_report(report: Mapping[str, Any]) -> None:
    """Raises ValueError listing every missing key or wrong type (checked against REPORT_SCHEMA)."""
    problems: list[str] = []
    _check(report, REPORT_SCHEMA, "report", problems)
    if not isinstance(report, Mapping):
        raise TypeError(f"eval report must be a JSON object, got {type(report).__name__}")
    if (report.get("kind"), report.get("schema_version")) not in ((REPORT_KIND, SCHEMA_VERSION), (None, None)):
        problems.append(f"report: kind/schema_version {report.get('kind')!r}/{report.get('schema_version')} is "
                        f"not {REPORT_KIND!r}/{SCHEMA_VERSION}")
    for key, schema in (("items", ITEM_SCHEMA), ("cells", _CELL_SCHEMA)):
        if isinstance(report.get(key), list):
            for i, row in enumerate(report[key]):
                _check(row, schema, f"report.{key}[{i}]", problems)
    if isinstance(report.get("suites"), dict):
        for name, agg in report["suites"].items():
            _check(agg, _AGG, f"report.suites.{name}", problems)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError("eval report does not match schema version 1: " + "; ".join(shown))


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a report JSON file (for --compare)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval report {path} does not exist (pass report.json files written by solopo eval)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass a report.json written by solopo eval") from None
    try:
        validate_report(report)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return report


# ------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _length_series(report: Mapping[str, Any], suite: str) -> tuple[list[int], list[float]]:
    rows = [r for r in report["by_length"] if r["suite"] == suite and r["context_length"] is not None]
    return [r["context_length"] for r in rows], [r["sub_em"] for r in rows]


def _length_suites(report: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["suite"] for r in report["by_length"]))


def _label_lengths(ax, lengths: Sequence[int]) -> None:
    if lengths:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(lengths)))
        ax.set_xticklabels([_k(n) for n in sorted(set(lengths))])


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def plot_accuracy_vs_length(report: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Sub-EM vs context length, one line per suite (mean over depths); short suites as dashed lines (a
    suite's own `<suite>_short` in its color)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lengths: list[int] = []
    for suite in _length_suites(report):
        xs, ys = _length_series(report, suite)
        lengths += xs
        (line,) = ax.plot(xs, ys, marker="o", label=suite)
        short = report["suites"].get(f"{suite}_short")
        if short is not None:
            ax.axhline(short["sub_em"], linestyle="--", color=line.get_color(), label=f"{suite}_short")
    if "short" in report["suites"]:
        ax.axhline(report["suites"]["short"]["sub_em"], linestyle="--", color="gray", label="short (no distractors)")
    _label_lengths(ax, lengths)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("sub-EM (%)")
    ax.set_title(f"{report['model']['label']}: accuracy vs context length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_depth_heatmap(report: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """Sub-EM per (depth, length) for each suite with a depth sweep; None when no suite has one."""
    cells = [c for c in report["cells"] if c["depth"] is not None and c["context_length"] is not None]
    suites = list(dict.fromkeys(c["suite"] for c in cells))
    if not suites:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(suites), figsize=(1.5 + 4.2 * len(suites), 3.8), squeeze=False,
                             layout="constrained")
    for ax, suite in zip(axes[0], suites):
        rows = [c for c in cells if c["suite"] == suite]
        lengths = sorted({c["context_length"] for c in rows})
        depths = sorted({c["depth"] for c in rows})
        grid = [[math.nan] * len(lengths) for _ in depths]
        for c in rows:
            grid[depths.index(c["depth"])][lengths.index(c["context_length"])] = c["sub_em"]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("evidence depth")
        ax.set_title(suite, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="sub-EM (%)")
    fig.suptitle(f"{report['model']['label']}: sub-EM by evidence depth", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_comparison(reports: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str | None:
    """Sub-EM vs context length for several reports, one panel per suite; None without length data."""
    suites = list(dict.fromkeys(s for r in reports for s in _length_suites(r)))
    if not suites:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(suites), figsize=(4.6 * len(suites), 3.8), squeeze=False, layout="constrained")
    for ax, suite in zip(axes[0], suites):
        lengths: list[int] = []
        for report in reports:
            xs, ys = _length_series(report, suite)
            lengths += xs
            if xs:
                ax.plot(xs, ys, marker="o", label=report["model"]["label"])
        _label_lengths(ax, lengths)
        ax.set_ylim(-2, 102)
        ax.set_title(suite, fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("sub-EM (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------ markdown
def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    """A human-readable summary of one report: overall, per suite, per length, per (length, depth)."""
    model, gen = report["model"], report["generation"]
    parts = [f"# Eval: {model['label']}", "",
             (f"model `{model['path']}` ({model['kind']}, fingerprint `{model['fingerprint'][:12]}`), "
              f"decoding {gen['path']} on {gen['device']} ({gen['dtype']}), {report['created_utc']}"), "",
             _table(["scope", "sub-EM", "EM", "F1", "items"],
                    [["overall", *(report["overall"][m] for m in METRICS), report["overall"]["num_items"]]]
                    + [[name, *(agg[m] for m in METRICS), agg["num_items"]] for name, agg in report["suites"].items()])]
    if report["by_length"]:
        parts += ["", "## By context length (sub-EM %, mean over depths)", "",
                  _table(["suite", "length", "sub-EM", "EM", "F1", "items"],
                         [[r["suite"], r["context_length"], *(r[m] for m in METRICS), r["num_items"]]
                          for r in report["by_length"]])]
    depth_cells = [c for c in report["cells"] if c["depth"] is not None]
    if depth_cells:
        parts += ["", "## By evidence depth (sub-EM %)", "",
                  _table(["suite", "length", "depth", "sub-EM", "items"],
                         [[c["suite"], c["context_length"], c["depth"], c["sub_em"], c["num_items"]]
                          for c in depth_cells])]
    skipped = {s: r for s, r in report["skipped"].items() if r}
    if skipped:
        parts += ["", "Contexts that could not be built (skipped, not scored): "
                  + "; ".join(f"{s}: " + ", ".join(f"{k} x{v}" for k, v in r.items()) for s, r in skipped.items())]
    return "\n".join(parts) + "\n"


# eval settings that decide where and how fast a report is made, not what it scores (greedy decoding
# gives the same tokens at any batch size; the device is recorded in the report's generation block)
_NOT_SCORED = frozenset({"output_dir", "label", "batch_size", "device"})


def scoring_differences(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """Eval settings (and prompt settings) that differ between reports and can change their scores."""
    keys: set[str] = set()
    for section in ("eval", "prompt"):
        values = [r["config"].get(section, {}) for r in reports]
        for key in set().union(*values) - (_NOT_SCORED if section == "eval" else set()):
            if len({json.dumps(v.get(key), sort_keys=True) for v in values}) > 1:
                keys.add(f"{section}.{key}")
    return sorted(keys)


def compare_markdown(reports: Sequence[Mapping[str, Any]]) -> str:
    """Several reports side by side: one column per model, rows for overall, suites and lengths (sub-EM %)."""
    if not reports:
        raise ValueError("compare_markdown needs at least one report")
    labels = [r["model"]["label"] for r in reports]
    rows: list[list[Any]] = []
    for metric in METRICS:
        rows.append([f"overall {metric}", *(r["overall"][metric] for r in reports)])
    for suite in dict.fromkeys(s for r in reports for s in r["suites"]):
        rows.append([f"{suite} sub-EM", *(r["suites"].get(suite, {}).get("sub_em") for r in reports)])
    keys = list(dict.fromkeys((row["suite"], row["context_length"]) for r in reports for row in r["by_length"]))
    for suite, length in keys:
        values = []
        for r in reports:
            match = [row["sub_em"] for row in r["by_length"] if (row["suite"], row["context_length"]) == (suite, length)]
            values.append(match[0] if match else None)
        rows.append([f"{suite} @ {_k(length)} sub-EM", *values])
    rows.append(["items", *(r["overall"]["num_items"] for r in reports)])
    footer = ["", "Models: " + "; ".join(f"**{r['model']['label']}** = `{r['model']['path']}` "
                                         f"(fingerprint `{r['model']['fingerprint'][:12]}`, {r['generation']['path']})"
                                         for r in reports)]
    differing = scoring_differences(reports)
    if differing:
        footer.append(f"Warning: the reports differ in eval settings that change scores ({', '.join(differing)}); "
                      "compare with care.")
    return _table(["metric (%)", *labels], rows) + "\n" + "\n".join(footer) + "\n"


# ------------------------------------------------------------------------------------------ writing
REPORT_FILES = ("report.json", "report.md", "accuracy_vs_length.png", "depth_heatmap.png")


def report_dir(report: Mapping[str, Any], output_dir: str | os.PathLike) -> pathlib.Path:
    """Where `report` is written: `output_dir`, unless that already holds another model's report; then
    a per-model subdirectory `output_dir/<label>` (`<label>-2`, ... if taken), so that no report or
    plot of an earlier model is overwritten or left beside the new one."""
    out = pathlib.Path(output_dir)
    candidate, number = out, 1
    while (candidate / "report.json").is_file() and not _same_model(candidate / "report.json", report):
        number += 1
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(report["model"]["label"])) or "model"
        candidate = out / (slug if number == 2 else f"{slug}-{number - 1}")
    return candidate


def _same_model(path: pathlib.Path, report: Mapping[str, Any]) -> bool:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: keep it, write elsewhere
    ours = report["model"]
    return earlier.get("label") == ours["label"] and earlier.get("fingerprint") == ours["fingerprint"]


def write_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, str]:
    """Writes report.json, report.md, accuracy_vs_length.png and depth_heatmap.png (when there is a
    depth sweep) into `report_dir(report, output_dir)`; returns {name: path}.

    The same model evaluated again replaces its own files (a plot the new report does not have is
    removed with them); another model's report in `output_dir` is never touched."""
    out = report_dir(report, output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    paths = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    write_json(paths["json"], report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    paths["accuracy_plot"] = plot_accuracy_vs_length(report, out / "accuracy_vs_length.png")
    heatmap = plot_depth_heatmap(report, out / "depth_heatmap.png")
    if heatmap:
        paths["depth_heatmap"] = heatmap
    return paths
