"""`--report` of the GPU session: the files a session call returned -> benchmarks/results/<date>-<machine>/.

Input: the folder the device tool copied $OUT into (session.json, env.json, <step>.log, gpu-tests.xml,
bench/bench-*.json; see megatron_solopo.bench.session). Output, in
`<results_root>/<date>-<machine>/`: the bench JSON files and table.md + plots (bench.report), the logs
under logs/, env.json, session.json, the JUnit files, and session.md (steps, GPU tests, the issue's bar
with each figure's source); plus the README's GPU results block (between two HTML comments), printed
and, when a README path is given, written into it.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo.bench.report import SCHEMA, machine_slug, regenerate_report
from megatron_solopo.bench.session import BENCH_DIR, README_END, README_START, SESSION_FILE

# The GPU bar (issue 13), checked on the returned figures.
BAR_TIME_RATIO_8K = 0.58
"""solo-ORPO / long-ORPO seconds per pair at 8K: at most this (the paper's 8K figure)."""
BAR_MAX_LENGTH_RATIO = 2.0
"""solo-ORPO's longest trainable length / long-ORPO's: at least this."""
BAR_BASELINE_RATIO = 2.0
"""solo-ORPO pairs/s / the TRL/transformers ORPO baseline's (long) pairs/s at 8K and 32K: at least this."""


def _load_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _bench_files(files_dir: pathlib.Path) -> list[pathlib.Path]:
    found = sorted((files_dir / BENCH_DIR).glob("bench-*.json")) + sorted(files_dir.glob("bench-*.json"))
    return [f for f in found if _load_json(f).get("schema") == SCHEMA]


def junit_summary(path: pathlib.Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "error"
                elif child.tag == "skipped":
                    outcome = f"skipped ({(child.get('message') or '').strip()[:80]})"
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "time_s": float(case.get("time") or 0.0)})
    counts = {key: sum(1 for t in tests if t["outcome"].startswith(key)) for key in ("passed", "failed", "error",
                                                                                    "skipped")}
    return {"file": path.name, "counts": counts, "tests": tests}


def bar_checks(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's GPU bar on the returned bench results: one row per criterion (value None = not measured)."""
    rows: list[dict[str, Any]] = []
    time_8k = [(r["ratio"], res["tag"], r["variant"]) for res in results
               for r in res["ratios"]["solo_over_long_time_per_pair"]
               if r["runner"] == "ours" and r["objective"] == "orpo" and r["long_length"] == 8192]
    best = min((t for t in time_8k if t[0] is not None), default=None)
    rows.append({"criterion": f"solo-ORPO / long-ORPO time per pair at 8K <= {BAR_TIME_RATIO_8K}",
                 "value": best[0] if best else None, "source": f"{best[2]} ({best[1]})" if best else None,
                 "holds": None if best is None else best[0] <= BAR_TIME_RATIO_8K})
    lengths = [(r, res["tag"]) for res in results for r in res["ratios"]["max_length_solo_over_long"]
               if r["runner"] == "ours" and r["objective"] == "orpo"]
    measured = [(r, tag) for r, tag in lengths if r["ratio"] is not None]
    if measured:
        r, tag = max(measured, key=lambda item: item[0]["ratio"])
        rows.append({"criterion": f"solo-ORPO longest trainable length >= {BAR_MAX_LENGTH_RATIO:g}x long-ORPO's",
                     "value": r["ratio"], "source": f"{r['variant']} ({tag}): {r['solo_max_ok']} vs "
                                                    f"{r['long_max_ok']} tokens, {r['kind']}",
                     "holds": r["ratio"] >= BAR_MAX_LENGTH_RATIO})
    else:
        why = ", ".join(f"solo {r['solo_max_ok']} vs long {r['long_max_ok']}" for r, _ in lengths) or "no search"
        rows.append({"criterion": f"solo-ORPO longest trainable length >= {BAR_MAX_LENGTH_RATIO:g}x long-ORPO's",
                     "value": None, "source": why, "holds": None})
    for length in (8192, 32768):
        found = [(r["ratio"], res["tag"], r["variant"], r["baseline"]) for res in results
                 for r in res["ratios"]["ours_over_baseline_pairs_per_s"]
                 if r["mode"] == "solo" and r["long_length"] == length and r["ratio"] is not None]
        best = max(found, default=None)
        rows.append({"criterion": f"solo-ORPO pairs/s >= {BAR_BASELINE_RATIO:g}x the TRL/transformers ORPO "
                                  f"baseline at {length // 1024}K",
                     "value": best[0] if best else None,
                     "source": f"{best[2]} vs {best[3]} ({best[1]})" if best else None,
                     "holds": None if best is None else best[0] >= BAR_BASELINE_RATIO})
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _holds(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "not measured"}[value]


def session_markdown(session: Mapping[str, Any], env: Mapping[str, Any], tests: Sequence[Mapping[str, Any]],
                     bar: Sequence[Mapping[str, Any]], dest_name: str) -> str:
    lines = [f"# GPU session {dest_name}", "",
             f"{env.get('gpu_name') or 'unknown GPU'} ({_fmt(env.get('gpu_memory_gib'))} GiB), torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, TE "
             f"{env.get('transformer_engine')}, transformers {env.get('transformers')}, trl {env.get('trl')}; "
             f"started {session.get('started_at')}, {session.get('elapsed_s')} s of a {session.get('budget_s')} s "
             "budget. Generated by `benchmarks/gpu_session.sh --report` from the returned files.", "",
             "## Steps", "", "| step | cap s | status | wall s | log |", "|---|---|---|---|---|"]
    for step in session.get("steps", []):
        lines.append(f"| {step['name']} | {step.get('cap_s')} | {step['status']} | {_fmt(step.get('wall_s'))} | "
                     f"{('logs/' + step['log']) if step.get('log') else '-'} |")
    lines += ["", "## GPU tests", ""]
    if not tests:
        lines.append("No JUnit file came back (the tests step did not run or did not finish).")
    for summary in tests:
        c = summary["counts"]
        lines += [f"`{summary['file']}`: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped", ""]
        lines += [f"- {t['test']}: {t['outcome']} ({t['time_s']:.1f} s)" for t in summary["tests"]]
        lines.append("")
    lines += ["## The bar (issue 13)", "", "| criterion | value | holds | source |", "|---|---|---|---|"]
    lines += [f"| {row['criterion']} | {_fmt(row['value'])} | {_holds(row['holds'])} | {row['source'] or '-'} |"
              for row in bar]
    lines += ["", "Full tables: [table.md](table.md)."]
    return "\n".join(lines) + "\n"


def readme_snippet(env: Mapping[str, Any], bar: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]],
                   rel_dir: str, date: str) -> str:
    """The README's GPU results block (between README_START and README_END)."""
    counts = [s["counts"] for s in tests]
    passed = sum(c["passed"] for c in counts)
    failed = sum(c["failed"] + c["error"] for c in counts)
    skipped = sum(c["skipped"] for c in counts)
    lines = [README_START,
             f"**GPU session ({date}, {env.get('gpu_name') or 'unknown GPU'}; torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, TE "
             f"{env.get('transformer_engine') or 'none'}).** GPU tests: {passed} passed, {failed} failed, "
             f"{skipped} skipped. Llama-style ~1.1B preset, bf16, random weights, synthetic pairs:", ""]
    lines += [f"- {row['criterion']}: **{_fmt(row['value'])}** ({_holds(row['holds'])})" for row in bar]
    lines += ["", f"Tables, plots, logs and versions: [{rel_dir}/session.md]({rel_dir}/session.md), "
                  f"[{rel_dir}/table.md]({rel_dir}/table.md).", README_END]
    return "\n".join(lines)


def update_readme(readme: pathlib.Path, snippet: str) -> None:
    """Replaces the block between the markers, or inserts it before '## License' (else at the end)."""
    text = readme.read_text(encoding="utf-8")
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + snippet + tail
    elif "\n## License" in text:
        head, tail = text.split("\n## License", 1)
        text = head.rstrip("\n") + "\n\n" + snippet + "\n\n## License" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + snippet + "\n"
    readme.write_text(text, encoding="utf-8")


def build_report(files_dir: pathlib.Path, results_root: pathlib.Path,
                 readme: pathlib.Path | None = None) -> dict[str, Any]:
    """The results folder of one GPU session from its returned files; see the module docstring."""
    session_path = files_dir / SESSION_FILE
    if not session_path.is_file():
        raise ValueError(f"{files_dir}: no {SESSION_FILE}: not the files of a GPU session call")
    session = _load_json(session_path)
    env = _load_json(files_dir / "env.json") if (files_dir / "env.json").is_file() else {}
    date = (session.get("started_at") or datetime.date.today().isoformat())[:10]
    dest = results_root / f"{date}-{machine_slug({'gpu_name': env.get('gpu_name')})}"
    (dest / "logs").mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []

    def copy(src: pathlib.Path, target: pathlib.Path) -> None:
        shutil.copyfile(src, target)
        written.append(target)

    benches = _bench_files(files_dir)
    for src in benches:
        copy(src, dest / src.name)
    for src in sorted(files_dir.glob("*.log")):
        copy(src, dest / "logs" / src.name)
    for src in [session_path, *sorted(files_dir.glob("env*.json")), *sorted(files_dir.glob("*.xml"))]:
        copy(src, dest / src.name)
    results = [_load_json(dest / src.name) for src in benches]
    if results:
        written += regenerate_report(dest)
    tests = [junit_summary(path) for path in sorted(dest.glob("*.xml"))]
    bar = bar_checks(results)
    session_md = dest / "session.md"
    session_md.write_text(session_markdown(session, env, tests, bar, dest.name), encoding="utf-8")
    written.append(session_md)
    try:
        rel_dir = str(dest.resolve().relative_to(readme.resolve().parent)) if readme else str(dest)
    except ValueError:
        rel_dir = str(dest)
    snippet = readme_snippet(env, bar, tests, rel_dir, date)
    if readme is not None:
        update_readme(readme, snippet)
        written.append(readme)
    return {"dest": dest, "written": written, "snippet": snippet, "bar": bar, "tests": tests}
