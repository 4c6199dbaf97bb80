"""Choosing a SoLoPO arm's alpha among its candidates on the validation split.

Each candidate (`ArmConfig.alpha_candidates`) is trained like any arm and evaluated on the validation
split: the shared eval section with the experiment's `validation` overrides (another eval seed, so the
questions differ from the test questions). The candidate with the highest mean score on the selection
cell wins; ties go to the candidate listed first. Only the winner is evaluated on the test questions,
so the test numbers are not used to pick it.
"""

from __future__ import annotations

import json
import pathlib
import statistics
from collections.abc import Mapping
from typing import Any

from megatron_solopo.experiment.analysis import CellKey, cell_label, cell_scores
from megatron_solopo.experiment.config import ArmConfig, Preregistration

__all__ = ["selection_cell", "choose_alpha", "save_selection", "load_selection", "selection_path"]


def selection_cell(prereg: Preregistration | None) -> CellKey | None:
    """The cell the choice is made on: the pre-registered primary cell, or None (every item of the report)."""
    if prereg is None:
        return None
    return (prereg.primary_suite, prereg.primary_context_length, prereg.primary_depth)


def _score(report: Mapping[str, Any], metric: str, cell: CellKey | None) -> tuple[float, int]:
    """(mean score, items) of one validation report on `cell` (None: all items)."""
    if cell is None:
        values = [float(item[metric]) for item in report["items"]]
    else:
        values = list(cell_scores(report, metric).get(cell, {}).values())
    if not values:
        where = "the report" if cell is None else cell_label(cell)
        raise ValueError(f"validation report {report.get('label', '?')!r} holds no items in {where}; the "
                         "validation eval must ask the selection cell")
    return statistics.fmean(values), len(values)


def choose_alpha(arm: ArmConfig, reports: Mapping[float, Mapping[str, Any]], metric: str,
                 cell: CellKey | None) -> dict[str, Any]:
    """The chosen alpha of `arm` and the validation table behind it.

    reports maps each candidate alpha to its validation eval report. Returns {"arm", "alpha",
    "candidate" (its name), "cell" (label), "metric", "rows": [{"alpha", "candidate", "score", "n"}]}.
    """
    missing = [alpha for alpha in arm.alpha_candidates if alpha not in reports]
    if missing:
        raise ValueError(f"arm {arm.name}: no validation report for alpha {missing}")
    rows = []
    for alpha in arm.alpha_candidates:  # listed order: ties go to the first
        score, n = _score(reports[alpha], metric, cell)
        rows.append({"alpha": alpha, "candidate": arm.candidate_name(alpha), "score": score, "n": n})
    best = max(rows, key=lambda row: (row["score"], -rows.index(row)))
    return {"arm": arm.name, "alpha": best["alpha"], "candidate": best["candidate"], "metric": metric,
            "cell": "all items" if cell is None else cell_label(cell), "rows": rows}


def selection_path(run_dir: pathlib.Path, arm_name: str) -> pathlib.Path:
    """Where the choice of `arm_name` is recorded."""
    return run_dir / "selection" / f"{arm_name}.json"


def save_selection(run_dir: pathlib.Path, choice: Mapping[str, Any]) -> pathlib.Path:
    """Writes the choice (whole file, then renamed: a kill leaves the old one or none)."""
    path = selection_path(run_dir, choice["arm"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(choice, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_selection(run_dir: pathlib.Path, arm_name: str) -> dict[str, Any] | None:
    """The recorded choice of `arm_name`, or None before its selection ran."""
    path = selection_path(run_dir, arm_name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
