"""Turns a quality experiment's eval reports and training logs into its results: the arm x cell table
with bootstrap CIs, paired tests between arms, the smallest detectable differences, and the cost of
each arm, as Markdown, JSON and plots.

Cells are (suite, context length, depth) as the eval reports define them, plus the pooled rows
(suite x length over depths, and suite). Arms are compared on the same items (same item ids); an item
missing from one report is left out of that comparison, and the table says how many were compared.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo.eval.stats import bootstrap_ci, mcnemar_exact, mdd_mcnemar, mdd_two_proportions, paired_bootstrap

__all__ = ["cell_scores", "accuracy_table", "comparison_table", "training_cost", "training_diagnostics",
           "eval_throughput", "prediction_quality", "preregistered_rows", "question_overlap", "analyze",
           "write_results"]

CellKey = tuple[str, Any, Any]  # (suite, context_length | "all", depth | "all")
ALL = "all"


def _cell_keys(item: Mapping[str, Any]) -> list[CellKey]:
    suite, length, depth = item["suite"], item.get("context_length"), item.get("depth")
    keys = [(suite, ALL, ALL)]
    if length is not None:
        keys.append((suite, length, ALL))
        if depth is not None:
            keys.append((suite, length, depth))
    return keys


def cell_scores(report: Mapping[str, Any], metric: str) -> dict[CellKey, dict[str, float]]:
    """{cell: {item_id: score in [0, 1]}} for every cell the report's items fall in."""
    cells: dict[CellKey, dict[str, float]] = collections.defaultdict(dict)
    for item in report["items"]:
        for key in _cell_keys(item):
            cells[key][item["item_id"]] = float(item[metric])
    return dict(cells)


def _sort_key(key: CellKey) -> tuple:
    suite, length, depth = key
    rank = lambda v: (0, 0.0) if v == ALL else (1, float(v))  # noqa: E731 - pooled rows first
    return (suite, rank(length), rank(depth))


def cell_label(key: CellKey) -> str:
    """'multihop', 'multihop @ 2048', 'multihop @ 2048, depth 0.5'."""
    suite, length, depth = key
    if length == ALL:
        return suite
    text = f"{suite} @ {length}"
    return text if depth == ALL else f"{text}, depth {depth:g}"


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _mdd_text(value: float | None) -> str:
    """A detectable difference in pp; above 100 pp the cell is too small to detect anything."""
    if value is None:
        return "-"
    return "none (too few items)" if value > 1.0 else _pct(value)


def accuracy_table(scores: Mapping[str, Mapping[CellKey, Mapping[str, float]]], resamples: int,
                   seed: int) -> list[dict[str, Any]]:
    """One row per cell: n and {arm: bootstrap CI} (fractions)."""
    keys = sorted({key for by_cell in scores.values() for key in by_cell}, key=_sort_key)
    rows = []
    for key in keys:
        row: dict[str, Any] = {"cell": cell_label(key), "key": list(key), "arms": {}}
        for arm, by_cell in scores.items():
            values = list(by_cell.get(key, {}).values())
            row["arms"][arm] = bootstrap_ci(values, n_resamples=resamples, seed=seed) if values else None
        rows.append(row)
    return rows


def _aligned(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[float], list[float]]:
    common = sorted(set(a) & set(b))
    return [a[i] for i in common], [b[i] for i in common]


def comparison_table(scores: Mapping[str, Mapping[CellKey, Mapping[str, float]]],
                     comparisons: Sequence[tuple[str, str]], metric: str, resamples: int,
                     seed: int) -> list[dict[str, Any]]:
    """One row per (comparison, cell): b - a with its paired-bootstrap CI, the McNemar p-value (0/1
    metrics) and the smallest difference the cell's size can detect (80% power, alpha 0.05)."""
    rows = []
    for a, b in comparisons:
        if a not in scores or b not in scores:
            continue
        keys = sorted(set(scores[a]) & set(scores[b]), key=_sort_key)
        for key in keys:
            a_scores, b_scores = _aligned(scores[a][key], scores[b][key])
            if not a_scores:
                continue
            boot = paired_bootstrap(a_scores, b_scores, n_resamples=resamples, seed=seed)
            row = {"a": a, "b": b, "cell": cell_label(key), "key": list(key), "n": boot["n"], "diff": boot["diff"],
                   "lo": boot["lo"], "hi": boot["hi"], "p_bootstrap": boot["p_value"],
                   "mdd_independent": mdd_two_proportions(boot["n"])}
            if metric in ("sub_em", "em"):
                test = mcnemar_exact(a_scores, b_scores)
                discordant = (test["only_a"] + test["only_b"]) / test["n"]
                row.update(p_mcnemar=test["p_value"], only_a=test["only_a"], only_b=test["only_b"],
                           mdd_paired=mdd_mcnemar(test["n"], discordant) if discordant > 0 else None)
            rows.append(row)
    return rows


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_cost(metrics_path: str | pathlib.Path) -> dict[str, Any]:
    """Seconds per pair and peak memory of one arm's training, from its metrics.jsonl.

    The first step (model warm-up, allocator growth) is left out of the per-pair time when there are
    later steps; the median over steps is reported with the mean.
    """
    by_step = {r["step"]: r for r in _read_jsonl(pathlib.Path(metrics_path)) if "step_time_s" in r and r.get("pairs")}
    records = [by_step[step] for step in sorted(by_step)]  # a step logged again after a resume: its last record
    if not records:
        raise ValueError(f"{metrics_path} holds no training steps with step_time_s and pairs")
    timed = records[1:] if len(records) > 1 else records
    per_pair = [r["step_time_s"] / r["pairs"] for r in timed]
    pair_updates = _pair_updates(records)
    return {"steps": records[-1]["step"], "pairs": pair_updates,
            "distinct_pairs": _distinct_pairs(metrics_path, pair_updates),
            "seconds_per_pair_median": statistics.median(per_pair), "seconds_per_pair_mean": statistics.fmean(per_pair),
            "steps_timed": len(timed), "peak_mem_gib": max(float(r.get("peak_mem_gib") or 0.0) for r in records),
            "tokens_per_pair": statistics.fmean(r.get("tokens", 0.0) / r["pairs"] for r in timed),
            "final_loss": records[-1].get("loss")}


def _pair_updates(records: list[dict]) -> int:
    """Pairs trained on in all, from the logged steps (sorted by step): with `train.log_every: k` a record
    stands for the k steps since the previous one, each of the same global batch (`pairs`)."""
    previous, total = 0, 0
    for record in records:
        total += int(record["pairs"]) * (int(record["step"]) - previous)
        previous = int(record["step"])
    return total


def _distinct_pairs(metrics_path: str | pathlib.Path, pair_updates: int) -> int | None:
    """Distinct pairs the run trained on: each epoch of the sampler is a permutation of the run's training
    pairs (run_summary.json train_pairs), so the first min(train_pairs, pair updates) are all different.
    None when the run summary does not say how many pairs it had."""
    summary = pathlib.Path(metrics_path).parent / "run_summary.json"
    train_pairs = json.loads(summary.read_text(encoding="utf-8")).get("train_pairs") if summary.is_file() else None
    return min(int(train_pairs), pair_updates) if train_pairs else None


_HELDOUT_ROLES = ("short_chosen", "long_chosen", "short_rejected", "long_rejected")


def training_diagnostics(train_dir: str | pathlib.Path) -> dict[str, Any]:
    """One arm's training diagnostics (docs/training.md "Diagnostics") from its run_summary.json: the held-out
    pairs' mean log-prob per token before and after training, per sequence, and the mean SoLo-RA gradient
    share over the steps that measured it. {} when the run wrote no diagnostics."""
    path = pathlib.Path(train_dir) / "run_summary.json"
    if not path.is_file():
        return {}
    diagnostics = json.loads(path.read_text(encoding="utf-8")).get("diagnostics") or {}
    heldout = diagnostics.get("heldout") or {}
    out: dict[str, Any] = {"ra_grad_share_mean": diagnostics.get("ra_grad_share_mean"),
                           "grad_cos_ra_po_mean": diagnostics.get("grad_cos_ra_po_mean"),
                           "heldout_pairs": heldout.get("pairs"), "heldout_ids": heldout.get("ids")}
    for role in (*_HELDOUT_ROLES, "chosen_gap_short_minus_long"):
        key = f"heldout/{role}" if role.startswith("chosen_gap") else f"heldout/{role}_mean_logp"
        out[role] = {point: (heldout.get(point) or {}).get(key) for point in ("before", "after")}
    return out


def eval_throughput(report: Mapping[str, Any]) -> dict[str, float]:
    """Prompt and generated tokens per second of one eval run (its whole generation time)."""
    timing = report["timing"]
    seconds = max(float(timing.get("seconds_generate") or 0.0), 1e-9)
    return {"seconds_generate": seconds, "prompt_tokens": timing.get("prompt_tokens", 0),
            "generated_tokens": timing.get("generated_tokens", 0),
            "prompt_tokens_per_s": timing.get("prompt_tokens", 0) / seconds,
            "generated_tokens_per_s": timing.get("generated_tokens", 0) / seconds}


_WORD = re.compile(r"\w+")
REPEAT_NGRAM, REPEAT_TIMES = 4, 3


def _repeats_an_ngram(text: str) -> bool:
    """True when some word 4-gram occurs 3 or more times in `text` (degenerate, looping output)."""
    words = _WORD.findall(text.lower())
    grams = collections.Counter(tuple(words[i:i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1))
    return any(count >= REPEAT_TIMES for count in grams.values())


def prediction_quality(report: Mapping[str, Any]) -> dict[str, float]:
    """Per report: the share of predictions that repeat a word 4-gram 3+ times, and the share that hold
    the scored answer line (final_answer extracted), over all items."""
    items = report["items"]
    if not items:
        return {"items": 0, "repetition_rate": math.nan, "answer_format_rate": math.nan}
    repeats = sum(_repeats_an_ngram(item.get("prediction") or "") for item in items)
    formatted = sum(item.get("final_answer") is not None for item in items)
    return {"items": len(items), "repetition_rate": repeats / len(items), "answer_format_rate": formatted / len(items)}


def question_overlap(reports_a: Sequence[Mapping[str, Any]], reports_b: Sequence[Mapping[str, Any]]) -> int:
    """Questions (question text with its answers) that occur in both groups of reports: 0 when a
    validation split is disjoint from the test questions."""
    def questions(reports):
        return {(item["question"], tuple(item["answers"])) for report in reports for item in report["items"]}
    return len(questions(reports_a) & questions(reports_b))


def preregistered_rows(comparisons: Sequence[Mapping[str, Any]], prereg: Any, solo_arms: Sequence[str],
                       base: str = "base") -> list[dict[str, Any]]:
    """The pre-registered decisions from the comparison rows: each primary comparison on the primary
    cell (significant at prereg.level by the exact McNemar test, or not), and each SoLoPO arm vs the base
    on the short suite (holds when the point estimate loses at most short_margin_points)."""
    primary = cell_label((prereg.primary_suite, prereg.primary_context_length, prereg.primary_depth))
    by_key = {(row["a"], row["b"], row["cell"]): row for row in comparisons}
    rows = []
    for a, b in prereg.primary_comparisons:
        row = by_key.get((a, b, primary))
        if row is None:
            rows.append({"kind": "primary", "a": a, "b": b, "cell": primary, "verdict": "not evaluated"})
            continue
        p = row.get("p_mcnemar")
        verdict = ("no significant difference" if p is None or p >= prereg.level else
                   f"{b} better" if row["diff"] > 0 else f"{b} worse")
        rows.append({"kind": "primary", **row, "verdict": verdict})
    for arm in solo_arms:
        row = by_key.get((base, arm, prereg.short_suite))
        if row is None:
            rows.append({"kind": "short", "a": base, "b": arm, "cell": prereg.short_suite, "verdict": "not evaluated"})
            continue
        holds = 100.0 * row["diff"] >= -prereg.short_margin_points
        rows.append({"kind": "short", **row, "verdict": f"{'holds' if holds else 'fails'} "
                                                        f"(margin -{prereg.short_margin_points:g} points)"})
    return rows


def analyze(reports: Mapping[str, Mapping[str, Any]], costs: Mapping[str, Mapping[str, Any]],
            comparisons: Sequence[tuple[str, str]], metric: str, resamples: int, seed: int) -> dict[str, Any]:
    """All numbers of the results: accuracy rows, comparison rows, training costs, eval throughput."""
    scores = {arm: cell_scores(report, metric) for arm, report in reports.items()}
    return {"metric": metric, "arms": list(reports), "accuracy": accuracy_table(scores, resamples, seed),
            "comparisons": comparison_table(scores, comparisons, metric, resamples, seed),
            "training_cost": dict(costs), "eval_throughput": {arm: eval_throughput(r) for arm, r in reports.items()},
            "prediction_quality": {arm: prediction_quality(r) for arm, r in reports.items()}}


# ------------------------------------------------------------------------------------- Markdown
def _ci_text(ci: Mapping[str, float] | None) -> str:
    return "-" if ci is None else f"{_pct(ci['mean'])} [{_pct(ci['lo'])}, {_pct(ci['hi'])}]"


def _p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown(results: Mapping[str, Any], ablations: Mapping[str, str] | None = None) -> str:
    """The results as Markdown: accuracy table, paired tests, cost."""
    arms, metric = results["arms"], results["metric"].replace("_", "-")
    ablations = ablations or {}
    names = [f"{arm} (ablation: {ablations[arm]})" if arm in ablations else arm for arm in arms]
    lines = _preregistered_lines(results.get("preregistered") or [], metric) + _selection_lines(results.get("selection") or {})
    lines += [f"### {metric} (%) per arm and cell, mean [95% bootstrap CI]", "",
             "| cell | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(arms)]
    for row in results["accuracy"]:
        n = max((ci["n"] for ci in row["arms"].values() if ci), default=0)
        lines.append(f"| {row['cell']} | {n} | " + " | ".join(_ci_text(row["arms"][a]) for a in arms) + " |")
    lines += ["", f"### Paired differences b - a ({metric}, percentage points) on the same items", "",
              "| b vs a | cell | n | b - a [95% CI] | p (McNemar, exact) | p (paired bootstrap) | "
              "b only / a only | detectable (paired / indep.) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["comparisons"]:
        lines.append(f"| {row['b']} vs {row['a']} | {row['cell']} | {row['n']} | {_pct(row['diff'])} "
                     f"[{_pct(row['lo'])}, {_pct(row['hi'])}] | {_p_text(row.get('p_mcnemar'))} | "
                     f"{_p_text(row['p_bootstrap'])} | {row.get('only_b', '-')} / {row.get('only_a', '-')} | "
                     f"{_mdd_text(row.get('mdd_paired'))} / {_mdd_text(row['mdd_independent'])} |")
    lines += ["", "'detectable': the smallest true difference (pp) the cell's size detects with 80% power at "
              "alpha 0.05 (paired: McNemar at the observed discordance, Connor 1987; indep.: two proportions at "
              "50%). Differences below it can be neither shown nor ruled out. p-values are not corrected for "
              "the number of cells.", "",
              "### Cost", "",
              "| arm | pair updates | distinct pairs | s / pair (median) | peak memory (GiB) | tokens / pair | "
              "eval prompt tok/s | eval generated tok/s | repeating outputs | answer line |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        cost, thr = results["training_cost"].get(arm), results["eval_throughput"].get(arm)
        train_text = ("- | - | - | - | -" if cost is None else
                      f"{cost['pairs']} | {cost.get('distinct_pairs') or '-'} | {cost['seconds_per_pair_median']:.2f} | "
                      f"{cost['peak_mem_gib']:.2f} | {cost['tokens_per_pair']:.0f}")
        quality = (results.get("prediction_quality") or {}).get(arm)
        quality_text = ("- | -" if not quality or not quality["items"] else
                        f"{_pct(quality['repetition_rate'])}% | {_pct(quality['answer_format_rate'])}%")
        lines.append(f"| {arm} | {train_text} | {thr['prompt_tokens_per_s']:.0f} | "
                     f"{thr['generated_tokens_per_s']:.1f} | {quality_text} |")
    lines += ["", "'repeating outputs': predictions in which a word 4-gram occurs 3+ times; 'answer line': "
              "predictions with the scored answer extracted; both over all of the arm's eval items."]
    return "\n".join(lines + _sampling_lines(results.get("sampling") or {})
                     + _diagnostics_lines(results.get("training_diagnostics") or {})) + "\n"


def _before_after(values: Mapping[str, Any]) -> str:
    before, after = values.get("before"), values.get("after")
    if before is None or after is None:
        return "-"
    return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"


def _diagnostics_lines(diagnostics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per arm: the held-out pairs' mean log-probs before -> after training, and the mean RA gradient share."""
    arms = {arm: d for arm, d in diagnostics.items() if d}
    if not arms:
        return []
    pairs = sorted({d.get("heldout_pairs") for d in arms.values() if d.get("heldout_pairs")})
    same = len({tuple(d.get("heldout_ids") or ()) for d in arms.values()}) == 1
    lines = ["", "### Training diagnostics", "",
             f"Held-out pairs ({', '.join(map(str, pairs)) or 'none'}; "
             f"{'the same pairs for every arm' if same else 'NOT the same pairs for every arm'}, never trained on): "
             "mean log-prob per response token, before -> after training (change). 'RA share': mean over the "
             "logged steps of ||g_RA|| / ||g|| (SoLo arms only); 'cos': mean cosine between the RA and the PO "
             "gradients (negative: the RA term works against the preference term). docs/training.md "
             "\"Diagnostics\" says how to read them.", "",
             "| arm | chosen on x_short | chosen on x_long | rejected on x_short | rejected on x_long | "
             "chosen gap short - long | RA share | cos(RA, PO) |", "|---|---|---|---|---|---|---|---|"]
    for arm, d in arms.items():
        cells = [_before_after(d.get(role) or {}) for role in (*_HELDOUT_ROLES, "chosen_gap_short_minus_long")]
        share, cos = d.get("ra_grad_share_mean"), d.get("grad_cos_ra_po_mean")
        cells += ["-" if share is None else f"{share:.3f}", "-" if cos is None else f"{cos:+.3f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _sampling_lines(sampling: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The on-policy sampling cost per pair set (data summaries' `timing`), if the summaries count tokens."""
    counted = {name: t for name, t in sampling.items() if t.get("sampled_questions_now")}
    if not counted:
        return []
    lines = ["", "| pairs sampled on | questions sampled | pairs | pairs / sampling hour | prompt tokens | "
             "generated tokens | sampling s | prompt tok/s | generated tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in counted.items():
        pairs = t.get("pairs_written")
        per_hour = "-" if pairs is None else f"{3600.0 * pairs / max(t['sampling_backend_s'], 1e-9):.0f}"
        lines.append(f"| x_{name} | {t['sampled_questions_now']} | {'-' if pairs is None else pairs} | {per_hour} | "
                     f"{t['prompt_tokens']} | {t['generated_tokens']} | {t['sampling_backend_s']:.0f} | "
                     f"{t['prompt_tokens_per_s']:.0f} | {t['generated_tokens_per_s']:.1f} |")
    return lines + ["", "'pairs / sampling hour': pairs written per hour of the sampling backend's time (the "
                    "questions sampled in this run)."]


def _preregistered_lines(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """The pre-registered decisions, first in the table: primary comparisons and the short-suite margin."""
    if not rows:
        return []
    lines = [f"### Pre-registered decisions ({metric}, percentage points, b - a on the same items)", "",
             "| decision | b vs a | cell | n | b - a [95% CI] | p (McNemar, exact) | p (paired bootstrap) | "
             "detectable (paired) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kind = "primary" if row["kind"] == "primary" else "short-suite margin"
        if "diff" not in row:
            lines.append(f"| {kind} | {row['b']} vs {row['a']} | {row['cell']} | - | - | - | - | - | {row['verdict']} |")
            continue
        lines.append(f"| {kind} | {row['b']} vs {row['a']} | {row['cell']} | {row['n']} | {_pct(row['diff'])} "
                     f"[{_pct(row['lo'])}, {_pct(row['hi'])}] | {_p_text(row.get('p_mcnemar'))} | "
                     f"{_p_text(row['p_bootstrap'])} | {_mdd_text(row.get('mdd_paired'))} | {row['verdict']} |")
    return lines + ["", "Decided before any arm was evaluated (the experiment file's `preregistration`, in the git "
                    "history); p-values are not corrected across the primary comparisons.", ""]


def _selection_lines(selection: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per SoLoPO arm with alpha candidates: the validation scores and the chosen alpha."""
    if not selection:
        return []
    lines = ["### Alpha selection on the validation split (questions disjoint from the test questions)", "",
             "| arm | cell | " + "candidates: alpha = score (n)" + " | chosen |", "|---|---|---|---|"]
    for arm, choice in selection.items():
        scores = ", ".join(f"{row['alpha']:g} = {_pct(row['score'])}% ({row['n']})" for row in choice["rows"])
        lines.append(f"| {arm} | {choice['cell']} | {scores} | {choice['alpha']:g} |")
    overlap = {arm: choice.get("test_overlap") for arm, choice in selection.items()}
    lines += ["", "Questions shared by the validation and test evals: "
              + ", ".join(f"{arm} {'?' if n is None else n}" for arm, n in overlap.items()) + " (must be 0).", ""]
    return lines


# ------------------------------------------------------------------------------------- plots
def plot_accuracy_vs_length(results: Mapping[str, Any], path: str | pathlib.Path) -> str | None:
    """Accuracy per arm vs context length (pooled over depths) with 95% CI bars, one panel per suite
    that was swept over lengths; None when no suite was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_suite: dict[str, list[dict]] = collections.defaultdict(list)
    for row in results["accuracy"]:
        suite, length, depth = row["key"]
        if length != ALL and depth == ALL:
            by_suite[suite].append(row)
    if not by_suite:
        return None
    fig, axes = plt.subplots(1, len(by_suite), figsize=(5.5 * len(by_suite), 4), squeeze=False)
    for ax, (suite, rows) in zip(axes[0], sorted(by_suite.items())):
        lengths = [row["key"][1] for row in rows]
        for offset, arm in enumerate(results["arms"]):
            cis = [row["arms"].get(arm) for row in rows]
            xs = [x * (1 + 0.02 * (offset - len(results["arms"]) / 2)) for x, ci in zip(lengths, cis) if ci]
            ys = [100 * ci["mean"] for ci in cis if ci]
            err = [[100 * (ci["mean"] - ci["lo"]) for ci in cis if ci],  # [2, n]: below, above the mean
                   [100 * (ci["hi"] - ci["mean"]) for ci in cis if ci]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"{results['metric']} (%)")
        ax.set_title(suite)
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_cost(results: Mapping[str, Any], path: str | pathlib.Path) -> str | None:
    """Seconds per pair and peak memory per trained arm (bars); None without trained arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = results["training_cost"]
    arms = [arm for arm in results["arms"] if arm in costs]
    if not arms:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(arms, [costs[a]["seconds_per_pair_median"] for a in arms], color="tab:blue")
    left.set_ylabel("seconds per pair (median)")
    right.bar(arms, [costs[a]["peak_mem_gib"] for a in arms], color="tab:orange")
    right.set_ylabel("peak memory (GiB)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_results(results: Mapping[str, Any], out_dir: str | pathlib.Path,
                  ablations: Mapping[str, str] | None = None, header: str = "") -> dict[str, str]:
    """Writes results.json, table.md and the plots under `out_dir`; returns their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n", encoding="utf-8")
    (out / "table.md").write_text(header + markdown(results, ablations), encoding="utf-8")
    paths = {"json": str(out / "results.json"), "table": str(out / "table.md")}
    for name, plot in (("accuracy_plot", plot_accuracy_vs_length), ("cost_plot", plot_cost)):
        written = plot(results, out / f"{name.replace('_plot', '')}.png")
        if written:
            paths[name] = written
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serializable: {value!r}")
