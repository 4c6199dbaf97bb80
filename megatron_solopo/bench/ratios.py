"""The ratios the paper and the issue quote (solo/long time, max length, ours/baseline), from one run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _ok(case: Mapping[str, Any]) -> bool:
    return case["status"] == "ok" and case.get("time_per_pair_s") is not None


def compute_ratios(cases: Sequence[Mapping[str, Any]], searches: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The ratios the paper and the issue quote, from one run's cases and searches.

    - solo_over_long_time_per_pair: solo-X / long-X seconds per pair, same runner, variant, X, length
      (paper: 0.58 for ORPO at 8K);
    - max_length_solo_over_long: longest trainable solo-X length / long-X length (paper: 2.1x);
      'lower_bound' when solo reached the search limit;
    - ours_over_baseline_pairs_per_s: our pairs/s (each variant and mode, ORPO) / the baseline's
      long-ORPO pairs/s at the same length (the issue's bar: >= 2 at 8K and 32K for solo-ORPO).
    """
    index = {(c["runner"], c["variant"], c["objective"], c["mode"], c["long_length"]): c for c in cases}
    time_ratios = []
    for (runner, variant, objective, mode, length), solo in index.items():
        long_ = index.get((runner, variant, objective, "long", length))
        if mode == "solo" and long_ is not None:
            ratio = (solo["time_per_pair_s"] / long_["time_per_pair_s"]) if _ok(solo) and _ok(long_) else None
            time_ratios.append({"runner": runner, "variant": variant, "objective": objective, "long_length": length,
                                "ratio": ratio, "solo_status": solo["status"], "long_status": long_["status"]})
    by_key = {(s["runner"], s["variant"], s["objective"], s["mode"]): s for s in searches}
    length_ratios = []
    for (runner, variant, objective, mode), solo in by_key.items():
        long_ = by_key.get((runner, variant, objective, "long"))
        if mode != "solo" or long_ is None:
            continue
        ratio, bound = None, None
        if solo["max_ok"] and long_["max_ok"] and not long_["hit_limit"]:
            ratio = solo["max_ok"] / long_["max_ok"]
            bound = "lower_bound" if solo["hit_limit"] else "measured"
        length_ratios.append({"runner": runner, "variant": variant, "objective": objective,
                              "solo_max_ok": solo["max_ok"], "long_max_ok": long_["max_ok"],
                              "ratio": ratio, "kind": bound})
    baseline_ratios = []
    for (runner, variant, objective, mode, length), ours in index.items():
        if not runner == "ours" or objective != "orpo":
            continue
        for base in (c for c in cases if c["runner"].startswith("baseline") and c["mode"] == "long"
                     and c["objective"] == "orpo" and c["long_length"] == length):
            ratio = ours["pairs_per_s"] / base["pairs_per_s"] if _ok(ours) and _ok(base) else None
            baseline_ratios.append({"variant": variant, "mode": mode, "long_length": length,
                                    "baseline": f"{base['runner']}/{base['variant']}", "ratio": ratio,
                                    "ours_status": ours["status"], "baseline_status": base["status"]})
    return {"solo_over_long_time_per_pair": time_ratios, "max_length_solo_over_long": length_ratios,
            "ours_over_baseline_pairs_per_s": baseline_ratios}

