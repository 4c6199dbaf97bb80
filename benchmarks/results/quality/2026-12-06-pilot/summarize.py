"""Tables of the RULER pilot from `solopo eval` reports: accuracy per task and context with a 95% CI,
the paired short vs long discordance, and the per-item correctness file.

    python benchmarks/results/quality/2026-12-06-pilot/summarize.py OUT_DIR REPORT.json [REPORT.json ...]

Writes OUT_DIR/table.md, OUT_DIR/summary.json and OUT_DIR/items.csv (one row per question and
context: task, question id, context, prompt tokens, correct (the metric: sub-EM of the Answer: line),
stated (a description, not the metric: the gold answer(s) occur anywhere in the whole response, as
`answer_scores` on the whole text), final answer).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import sys

from megatron_solopo.data.scoring import answer_scores
from megatron_solopo.eval.stats import mcnemar_exact


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0/n and n/n, unlike the bootstrap)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def context_of(item: dict) -> str:
    return "short" if item["context_length"] is None else f"L{item['context_length']}_d{item['depth']:g}"


def main(out_dir: str, paths: list[str]) -> None:
    out = pathlib.Path(out_dir)
    rows, cells, stated = [], {}, {}
    for path in paths:
        report = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        for item in report["items"]:
            task = item["suite"].removeprefix("ruler_").removesuffix("_short")
            row = {"task": task, "source_id": item["source_id"], "context": context_of(item),
                   "prompt_tokens": item["prompt_tokens"], "correct": int(item["sub_em"]),
                   "stated": int(answer_scores(item["prediction"], item["answers"],
                                               item["meta"].get("answer_match", "any"))["sub_em"]),
                   "final_answer": item["final_answer"]}
            rows.append(row)
            cell = cells.setdefault((task, row["context"]), {})
            if row["source_id"] in cell:
                raise ValueError(f"{path}: {task} {row['context']} {row['source_id']} is in two reports")
            cell[row["source_id"]] = row["correct"]
            stated.setdefault((task, row["context"]), []).append(row["stated"])
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tasks = list(dict.fromkeys(task for task, _ in cells))
    contexts = sorted({c for _, c in cells}, key=lambda c: (c != "short", c))
    summary = {"cells": [], "paired": []}
    lines = ["| task | " + " | ".join(contexts) + " |", "|---|" + "---|" * len(contexts)]
    for task in tasks:
        entries = []
        for context in contexts:
            scores = cells.get((task, context))
            if scores is None:
                entries.append("-")
                continue
            n, k = len(scores), sum(scores.values())
            lo, hi = wilson(k, n)
            summary["cells"].append({"task": task, "context": context, "n": n, "correct": k,
                                     "accuracy": k / n, "ci95": [lo, hi]})
            entries.append(f"{100 * k / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] n={n}")
        lines.append(f"| {task} | " + " | ".join(entries) + " |")
    lines += ["", "Gold answer stated anywhere in the response (with or without an Answer: line; not the metric):", "",
              "| task | " + " | ".join(contexts) + " |", "|---|" + "---|" * len(contexts)]
    for task in tasks:
        values = [stated.get((task, c)) for c in contexts]
        lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{100 * sum(v) / len(v):.0f} ({sum(v)}/{len(v)})"
                                                  for v in values) + " |")
    lines += ["", "| task | long cell | short right, long wrong | short wrong, long right | both right | "
              "both wrong | McNemar p |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        short = cells.get((task, "short"), {})
        for context in contexts:
            if context == "short" or (task, context) not in cells or not short:
                continue
            long = cells[(task, context)]
            ids = sorted(set(short) & set(long))
            a, b = [short[i] for i in ids], [long[i] for i in ids]
            test = mcnemar_exact(a, b)
            both = sum(x and y for x, y in zip(a, b))
            neither = sum(not x and not y for x, y in zip(a, b))
            summary["paired"].append({"task": task, "long": context, "n": len(ids), "short_only": test["only_a"],
                                      "long_only": test["only_b"], "both": both, "neither": neither,
                                      "mcnemar_p": test["p_value"]})
            lines.append(f"| {task} | {context} | {test['only_a']} | {test['only_b']} | {both} | {neither} | "
                         f"{test['p_value']:.3g} |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
