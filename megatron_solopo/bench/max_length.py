"""Maximum trainable length: doubling then bisection over a `fits(length)` probe."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class SearchResult:
    """Outcome of a maximum-length search for one runner x variant x objective x mode."""

    max_ok: int | None
    """Longest long length that trained (None: not even the start fitted)."""
    first_fail: int | None
    """Shortest length that failed (None: the limit fitted)."""
    hit_limit: bool
    """True when the search limit itself trained (the true maximum may be higher)."""
    trials: list[dict[str, Any]]
    """Every probe in order: {"long_length", "status"} (+ error)."""


def _align_down(value: int, granularity: int) -> int:
    return (value // granularity) * granularity


def search_max_length(fits: Callable[[int], bool], start: int, limit: int, granularity: int,
                      known_ok: int | None = None, known_fail: int | None = None) -> SearchResult:
    """Longest length L in [start, limit] with fits(L), by doubling and then bisection.

    Doubles from the longest known-fitting length (or `start`) until a length fails or the limit
    fits, then bisects on multiples of `granularity` until the gap is at most `granularity`.
    Assumes fitting is monotone in L (memory grows with length). `known_ok` / `known_fail` seed the
    search from the sweep's results, saving trials.
    """
    trials: list[dict[str, Any]] = []

    def probe(length: int) -> bool:
        ok = fits(length)
        trials.append({"long_length": length, "status": "ok" if ok else "fail"})
        return ok

    lo, hi = known_ok, known_fail
    if lo is None:
        if hi is not None and hi <= start:
            return SearchResult(None, hi, False, trials)
        if not probe(start):
            return SearchResult(None, start, False, trials)
        lo = start
    while hi is None:
        if lo >= limit:
            return SearchResult(lo, None, True, trials)
        nxt = min(2 * lo, limit)
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > granularity:
        mid = _align_down((lo + hi) // 2, granularity)
        if mid <= lo:
            mid = lo + granularity
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, False, trials)

