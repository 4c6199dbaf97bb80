"""Run summary of `solopo build-data`: counts, token-length histograms, pass rates (JSON and PNG)."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo.data.records import atomic_write, write_json

__all__ = ["length_stats", "histogram", "write_summary"]


def histogram(values: Sequence[float], num_bins: int = 20, low: float | None = None,
              high: float | None = None) -> dict[str, list[float]]:
    """Equal-width histogram {"edges": [num_bins + 1], "counts": [num_bins]} (last bin closed)."""
    if not values:
        return {"edges": [], "counts": []}
    low = min(values) if low is None else low
    high = max(values) if high is None else high
    if high <= low:
        high = low + 1
    width = (high - low) / num_bins
    counts = [0] * num_bins
    for v in values:
        counts[min(num_bins - 1, max(0, int((v - low) / width)))] += 1
    return {"edges": [low + i * width for i in range(num_bins + 1)], "counts": counts}


def length_stats(values: Sequence[int]) -> dict[str, Any]:
    """min / mean / p50 / p95 / max and a histogram of token lengths."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"count": len(values), "min": ordered[0], "mean": sum(values) / len(values), "p50": pct(0.5),
            "p95": pct(0.95), "max": ordered[-1], "histogram": histogram(values)}


def _plot(path: pathlib.Path, short_tokens: Sequence[int], long_tokens: Sequence[int],
          pass_rates: Sequence[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, values, label in ((axes[0], short_tokens, "short context x_s (tokens)"),
                              (axes[1], long_tokens, "long context x_l (tokens)")):
        ax.hist(values, bins=20, color="tab:blue" if ax is axes[0] else "tab:orange")
        ax.set_xlabel(label)
        ax.set_ylabel("questions")
    axes[2].hist(pass_rates, bins=[i / 10 for i in range(11)], color="tab:green")
    axes[2].set_xlabel("pass rate (correct / sampled, per question)")
    axes[2].set_ylabel("questions")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def write_summary(output_dir: str | os.PathLike, counts: Mapping[str, Any], short_tokens: Sequence[int],
                  long_tokens: Sequence[int], pass_rates: Sequence[float], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Writes summary.json and summary.png into `output_dir` (atomically) and returns the summary."""
    output_dir = pathlib.Path(output_dir)
    summary = {
        "counts": dict(counts),
        "short_context_tokens": length_stats(short_tokens),
        "long_context_tokens": length_stats(long_tokens),
        "pass_rate": {"mean": sum(pass_rates) / len(pass_rates) if pass_rates else None,
                      "histogram": histogram(pass_rates, num_bins=10, low=0.0, high=1.0)},
        **dict(extra),
    }
    write_json(output_dir / "summary.json", summary)
    title = (f"{counts.get('pairs_written', 0)} pairs from {counts.get('items_read', 0)} questions "
             f"(mean pass rate {summary['pass_rate']['mean'] or 0:.2f})")
    _plot(output_dir / "summary.png", short_tokens, long_tokens, pass_rates, title)
    return summary
