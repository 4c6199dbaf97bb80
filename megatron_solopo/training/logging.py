"""Per-step metrics: a concise console line, a JSONL file, TensorBoard and Weights & Biases.

Only rank 0 writes (the step engine already reduces metrics over the data-parallel ranks, once, so
nothing is double counted across TP/CP ranks). One JSONL record per logged step::

    {"step": 12, "loss": 0.69, "loss/po": 0.68, "loss/ra": 0.01, "rewards/chosen": ..., "rewards/margin": ...,
     "rewards/accuracy": 0.5, "ra/distance": ..., "grad_norm": 1.3, "lr": 1e-6, "step_time_s": 0.52,
     "tokens_per_s": 9800.0, "tokens": 5096, "pairs": 8, "peak_mem_gib": 3.1, "time": "2026-11-23T17:00:00Z"}

Training diagnostics (`diag/*` every logged step, `heldout/*` records with a "heldout/point" of before |
after | step) are described in training/diagnostics.py and docs/training.md "Diagnostics".

`metrics.jsonl` is the run's record: a resumed run first drops the records after the step it
resumes from (they belong to steps that are recomputed), so each step appears once.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import resource
import sys
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
# console: these keys in this order when present, with a short label; everything else goes to the files
_CONSOLE_KEYS = (
    ("loss", "loss", "{:.4f}"), ("loss/po", "po", "{:.4f}"), ("loss/ra", "ra", "{:.4f}"),
    ("loss/nll", "nll", "{:.4f}"), ("rewards/accuracy", "acc", "{:.2f}"), ("rewards/margin", "margin", "{:.3f}"),
    ("ra/distance", "dist", "{:.3f}"), ("diag/chosen_gap_short_minus_long", "gap s-l", "{:+.3f}"),
    ("diag/ra_grad_share", "ra share", "{:.2f}"), ("grad_norm", "gnorm", "{:.3f}"), ("lr", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:.0f}"), ("step_time_s", "s/step", "{:.2f}"), ("peak_mem_gib", "mem", "{:.1f}G"),
)


def peak_memory_gib() -> float:
    """Peak memory of this process in GiB: CUDA max allocated on a GPU, else the CPU peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def format_console_line(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
    """`step 12/100 | loss 0.6931 | po 0.6931 | acc 0.50 | ... ` with the keys in `_CONSOLE_KEYS` only."""
    parts = [f"step {step}/{total_steps}"]
    for key, label, fmt in _CONSOLE_KEYS:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    return " | ".join(parts)


def truncate_jsonl_after(path: str | os.PathLike, step: int) -> int:
    """Drops records with "step" > `step` from a JSONL file (atomically); returns how many were dropped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class MetricsLogger:
    """Writes per-step metrics to the console (concise), metrics.jsonl, TensorBoard and W&B (rank 0 only).

    Args:
        output_dir: the run directory (metrics.jsonl and tensorboard/ go there).
        enabled: True on the rank that writes (global rank 0); other ranks get a silent logger.
        total_steps: for the console's "step k/N".
        start_step: the step the run starts after (a resume point): later records are dropped.
        tensorboard / wandb: also write there (W&B needs the `wandb` package).
        wandb_project / run_config: the W&B project and the config logged with the run.
        console: callable printing one line (default print to stdout; the loop passes tqdm.write).
    """

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "megatron-solopo",
                 run_config: Mapping[str, Any] | None = None, console=None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.console = console or print
        self.path = pathlib.Path(output_dir) / METRICS_FILE
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = truncate_jsonl_after(self.path, start_step)
        if dropped:
            logger.info("dropped %d metric records after step %d from %s (they are recomputed)", dropped,
                        start_step, self.path)
        if tensorboard:
            self._tb = _open_tensorboard(pathlib.Path(output_dir) / TENSORBOARD_SUBDIR, start_step)
        if wandb:
            self._wandb = _open_wandb(wandb_project, pathlib.Path(output_dir), run_config, resumed=start_step > 0)

    def log(self, step: int, metrics: Mapping[str, Any], console: bool = True) -> dict[str, Any]:
        """Writes one step's metrics everywhere; returns the record (floats, plus "step" and "time")."""
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if value is None:
                continue
            record[key] = value if isinstance(value, (str, list)) else _as_float(value)
        record["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        if not self.enabled:
            return record
        with self.path.open("a", encoding="utf-8") as f:
            # NaN/Inf are written as null-safe strings so the file stays valid JSON
            f.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, float)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if console:
            self.console(format_console_line(step, self.total_steps, numbers))
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": json.dumps would write invalid JSON tokens
    return value


def _open_tensorboard(log_dir: pathlib.Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("train.tensorboard=true but the tensorboard package is not installed; "
                         "pip install tensorboard (or megatron_solopo[tensorboard]), or set train.tensorboard=false"
                         ) from err
    # purge_step drops events after the resume point when TensorBoard reads the directory
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)


def _open_wandb(project: str, output_dir: pathlib.Path, run_config: Mapping[str, Any] | None, resumed: bool):
    import wandb

    run_id_file = output_dir / "wandb_run_id"
    run_id = run_id_file.read_text().strip() if resumed and run_id_file.is_file() else None
    run = wandb.init(project=project, dir=str(output_dir), config=dict(run_config or {}), id=run_id,
                     resume="allow" if run_id else None, name=output_dir.name)
    run_id_file.write_text(run.id)
    return run
