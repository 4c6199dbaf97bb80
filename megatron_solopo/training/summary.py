"""What a run reports when it returns: `RunSummary`, written by rank 0 to output_dir/run_summary.json."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import TYPE_CHECKING, Any

from megatron_solopo.training.diagnostics import read_metrics_file, summarize_metrics
from megatron_solopo.training.logging import METRICS_FILE
from megatron_solopo.training.signals import EXIT_RESUMABLE, record_exit_status

if TYPE_CHECKING:
    from megatron_solopo.training.setup import Run

__all__ = ["SUMMARY_FILE", "RunSummary", "earlier_metrics", "summarize"]

SUMMARY_FILE = "run_summary.json"


@dataclasses.dataclass
class RunSummary:
    """What one `train` call did."""

    output_dir: str
    total_steps: int
    start_step: int
    """Step the run resumed from (0 = fresh)."""
    final_step: int
    """Last completed step (== total_steps when finished)."""
    stop_reason: str
    """finished | max_steps_per_run | stop_file | sigterm | already_finished."""
    last_metrics: dict[str, Any]
    """The last step's metrics (empty if no step ran)."""
    checkpoint: str | None
    """The newest complete checkpoint."""
    wall_time_s: float
    metrics_path: str
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Summary of the diagnostics (training/diagnostics.summarize_metrics): held-out means before and
    after training, the mean RA gradient share, the diag/* values of the first and last logged step."""
    train_pairs: int = 0
    """Distinct pairs the run draws its batches from (the pairs file less the held-out pairs)."""

    @property
    def finished(self) -> bool:
        return self.final_step >= self.total_steps

    @property
    def exit_code(self) -> int:
        """0 when the run reached its last step, EXIT_RESUMABLE when it stopped early with a checkpoint."""
        return 0 if self.finished else EXIT_RESUMABLE


def earlier_metrics(output_dir: pathlib.Path) -> dict[str, Any]:
    """The last metrics a finished run recorded in its run_summary.json (empty when unreadable)."""
    try:
        metrics = json.loads((output_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("last_metrics")
    except (OSError, ValueError, AttributeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _diagnostics_summary(run: Run, output_dir: pathlib.Path) -> dict[str, Any]:
    """run_summary.json's `diagnostics`, from the whole metrics.jsonl (a resumed run's earlier steps too)."""
    return summarize_metrics(read_metrics_file(output_dir / METRICS_FILE), run.heldout)


def summarize(run: Run, outcome: tuple[int, str, dict], started: float, rank0: bool) -> RunSummary:
    """The RunSummary of `outcome` (last step, stop reason, its metrics); `started`: time.perf_counter() at
    the start. Rank 0 writes run_summary.json (unless the run had finished earlier) and the exit status."""
    output_dir = pathlib.Path(run.config.train.output_dir)
    final_step, reason, last = outcome
    summary = RunSummary(output_dir=str(output_dir), total_steps=run.total_steps, start_step=run.start_step,
                         final_step=final_step, stop_reason=reason, last_metrics=last, checkpoint=run.checkpoint,
                         wall_time_s=time.perf_counter() - started, metrics_path=str(output_dir / METRICS_FILE),
                         diagnostics=_diagnostics_summary(run, output_dir) if rank0 else {},
                         train_pairs=len(run.train_positions))
    if rank0:
        if reason != "already_finished":  # a finished run's run_summary.json stays as it is
            record = {**dataclasses.asdict(summary), "finished": summary.finished}
            (output_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        record_exit_status(summary)
    return summary
