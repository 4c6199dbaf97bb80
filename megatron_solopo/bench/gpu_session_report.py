"""`--report` of the GPU session: the files a session call returned -> benchmarks/results/<date>-<machine>/.

Input: the folder the device tool copied $OUT into (session.json, env.json, gpu-tests.xml,
bench-*.json, probes.json, logs.tgz; see megatron_solopo.bench.gpu_session; older sessions' <step>.log and
bench/bench-*.json are read too). Output, in `<results_root>/<date>-<machine>/`: the bench JSON files and
table.md + plots (bench.report), the logs unpacked under logs/, env.json, session.json, probes.json, the
JUnit files, and session.md (steps, GPU tests, the max-length probes with the planner's verdict, the
issue's bar with each figure's source); plus the README's GPU results block (between two HTML comments),
printed and, when a README path is given, written into it. A missing session.json is noted, not fatal,
as long as some result of a session came back.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo.bench.gpu_session import BENCH_DIR, LOGS_FILE, README_END, README_START, SESSION_FILE
from megatron_solopo.bench.probes import PROBES_FILE, SCHEMA as PROBES_SCHEMA, summarize_probes
from megatron_solopo.bench.report import SCHEMA, machine_slug, regenerate_report

# The GPU bar (issue 13), checked on the returned figures.
BAR_TIME_RATIO_8K = 0.58
"""solo-ORPO / long-ORPO seconds per pair at 8K: at most this (the paper's 8K figure)."""
BAR_MAX_LENGTH_RATIO = 2.0
"""solo-ORPO's longest trainable length / long-ORPO's: at least this."""
BAR_BASELINE_RATIO = 2.0
"""solo-ORPO pairs/s / the TRL/transformers ORPO baseline's (long) pairs/s at 8K and 32K: at least this."""
SIMULATED_WARNING = ("SIMULATED session (`--run --simulate`): every figure below is made up by "
                     "megatron_solopo/bench/gpu_session_sim.py; not a measurement, do not publish")


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


def bar_checks(results: Sequence[Mapping[str, Any]], probes: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's GPU bar on the returned bench results (and the max-length probes): one row per criterion
    (value None = not measured)."""
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
    if probes is not None:
        rows.append(_probe_bar_row(probes))
    elif measured:
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


def _probe_bar_row(probes: Mapping[str, Any]) -> dict[str, Any]:
    summary = probes["summary"]
    ratio, modes = summary["solo_over_long_max_length"], summary["modes"]
    source = (f"probes ({probes.get('variant')}, {probes.get('memory_gib'):g} GiB): solo {modes['solo']['max_ok']} vs "
              f"long {modes['long']['max_ok']} tokens, {summary['ratio_kind'] or 'not measured'}")
    return {"criterion": f"solo-ORPO longest trainable length >= {BAR_MAX_LENGTH_RATIO:g}x long-ORPO's",
            "value": ratio, "source": source, "holds": None if ratio is None else ratio >= BAR_MAX_LENGTH_RATIO}


def probes_markdown(probes: Mapping[str, Any]) -> list[str]:
    """The max-length probes: one row each, then the largest length per mode and the planner's verdict."""
    lines = ["## Maximum trainable length (probes)", "",
             f"One optimizer step per process, {probes.get('preset')} {probes.get('variant')}, usable GPU memory "
             f"{probes.get('memory_gib'):g} GiB; lengths from the dry run of the real step (`solopo plan --scaled`: "
             "'max' = the longest whose planned peak fits the usable memory, 'over' = the shortest whose planned "
             "peak exceeds the whole memory).", "",
             "| probe | long tokens | planned peak GiB | predicted | status | measured peak GiB | step s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for p in probes["probes"]:
        lines.append(f"| {p['mode']}-ORPO {p['kind']} | {p['long_length']} | {_fmt(p['planned_peak_gib'])} | "
                     f"{p['predicted']} | {p['status']} | {_fmt(p['peak_memory_gib'])} | {_fmt(p['step_time_s'])} | "
                     f"{_fmt(p['wall_s'])} |")
    lines.append("")
    summary = probes["summary"]
    for mode, row in summary["modes"].items():
        lines.append(f"- {mode}-ORPO: largest that trained **{row['max_ok'] or '-'}** tokens, shortest out of memory "
                     f"{row['first_oom'] or '-'}; the planner's prediction {row['verdict']}")
    lines += [f"- solo / long longest trainable length: **{_fmt(summary['solo_over_long_max_length'])}** "
              f"({summary['ratio_kind'] or 'not measured'})", ""]
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _holds(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "not measured"}[value]


def session_markdown(session: Mapping[str, Any], env: Mapping[str, Any], tests: Sequence[Mapping[str, Any]],
                     bar: Sequence[Mapping[str, Any]], dest_name: str,
                     probes: Mapping[str, Any] | None = None) -> str:
    lines = [f"# GPU session {dest_name}", "",
             f"{env.get('gpu_name') or 'unknown GPU'} ({_fmt(env.get('gpu_memory_gib'))} GiB), torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, TE "
             f"{env.get('transformer_engine')}, transformers {env.get('transformers')}, trl {env.get('trl')}; "
             f"started {session.get('started_at')}, {session.get('elapsed_s')} s of a {session.get('budget_s')} s "
             "budget. Generated by `benchmarks/gpu_session.sh --report` from the returned files.", "",
             *([f"**{session['note']}**", ""] if session.get("note") else []),
             *([f"**{SIMULATED_WARNING}**", ""] if session.get("simulated") else []),
             "## Steps", "", "| step | cap s | status | wall s | log |", "|---|---|---|---|---|"]
    for step in session.get("steps", []):
        log = step.get("log")
        log = (log if log.startswith("logs/") else f"logs/{log}") if log else "-"
        lines.append(f"| {step['name']} | {step.get('cap_s')} | {step['status']} | {_fmt(step.get('wall_s'))} | {log} |")
    lines += ["", "## GPU tests", ""]
    if not tests:
        lines.append("No JUnit file came back (the tests step did not run or did not finish).")
    for summary in tests:
        c = summary["counts"]
        lines += [f"`{summary['file']}`: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped", ""]
        lines += [f"- {t['test']}: {t['outcome']} ({t['time_s']:.1f} s)" for t in summary["tests"]]
        lines.append("")
    if probes is not None:
        lines += probes_markdown(probes)
    lines += ["## The bar (issue 13)", "", "| criterion | value | holds | source |", "|---|---|---|---|"]
    lines += [f"| {row['criterion']} | {_fmt(row['value'])} | {_holds(row['holds'])} | {row['source'] or '-'} |"
              for row in bar]
    lines += ["", "Full tables: [table.md](table.md)."]
    return "\n".join(lines) + "\n"


def readme_snippet(env: Mapping[str, Any], bar: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]],
                   rel_dir: str, date: str, probes: Mapping[str, Any] | None = None, simulated: bool = False) -> str:
    """The README's GPU results block (between README_START and README_END)."""
    counts = [s["counts"] for s in tests]
    passed = sum(c["passed"] for c in counts)
    failed = sum(c["failed"] + c["error"] for c in counts)
    skipped = sum(c["skipped"] for c in counts)
    lines = [README_START, *([f"**{SIMULATED_WARNING}**", ""] if simulated else []),
             f"**GPU session ({date}, {env.get('gpu_name') or 'unknown GPU'}; torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, megatron-core {env.get('megatron_core')}, TE "
             f"{env.get('transformer_engine') or 'none'}).** GPU tests: {passed} passed, {failed} failed, "
             f"{skipped} skipped. Llama-style ~1.1B preset, bf16, random weights, synthetic pairs:", ""]
    lines += [f"- {row['criterion']}: **{_fmt(row['value'])}** ({_holds(row['holds'])})" for row in bar]
    if probes is not None:
        lines += [f"- planned maximum length of {mode}-ORPO: {row['verdict']}"
                  for mode, row in probes["summary"]["modes"].items()]
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


def _extract_logs(archive: pathlib.Path, dest: pathlib.Path) -> list[pathlib.Path]:
    """The step logs of logs.tgz into dest/logs/ (plain files named logs/<name>.log only)."""
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = pathlib.PurePosixPath(member.name)
            if not member.isfile() or len(name.parts) != 2 or name.parts[0] != "logs" or name.name.startswith("."):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = dest / "logs" / name.name
            target.write_bytes(source.read())
            written.append(target)
    return written


def _load_probes(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    doc = _load_json(path)
    if doc.get("schema") != PROBES_SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r} is not {PROBES_SCHEMA!r}")
    doc["summary"] = summarize_probes(doc.get("probes", []))  # recomputed: the verdict rules live in one place
    return doc


def build_report(files_dir: pathlib.Path, results_root: pathlib.Path,
                 readme: pathlib.Path | None = None) -> dict[str, Any]:
    """The results folder of one GPU session from its returned files; see the module docstring."""
    session_path = files_dir / SESSION_FILE
    known = [session_path, files_dir / "env.json", files_dir / PROBES_FILE, files_dir / LOGS_FILE]
    benches = _bench_files(files_dir) if files_dir.is_dir() else []
    if not any(p.is_file() for p in known) and not benches:
        raise ValueError(f"{files_dir}: no {SESSION_FILE} nor any other result of a GPU session call")
    if session_path.is_file():
        session = _load_json(session_path)
    else:
        session = {"note": f"{SESSION_FILE} did not come back: the steps table is empty"}
    env = _load_json(files_dir / "env.json") if (files_dir / "env.json").is_file() else {}
    date = (session.get("started_at") or datetime.date.today().isoformat())[:10]
    dest = results_root / f"{date}-{machine_slug({'gpu_name': env.get('gpu_name')})}"
    (dest / "logs").mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []

    def copy(src: pathlib.Path, target: pathlib.Path) -> None:
        shutil.copyfile(src, target)
        written.append(target)

    for src in benches:
        copy(src, dest / src.name)
    for src in sorted(files_dir.glob("*.log")):  # sessions before logs.tgz
        copy(src, dest / "logs" / src.name)
    if (files_dir / LOGS_FILE).is_file():
        written += _extract_logs(files_dir / LOGS_FILE, dest)
    extra = [session_path, *sorted(files_dir.glob("env*.json")), *sorted(files_dir.glob("*.xml")),
             files_dir / PROBES_FILE]
    for src in extra:
        if src.is_file():
            copy(src, dest / src.name)
    results = [_load_json(dest / src.name) for src in benches]
    session["simulated"] = bool(session.get("simulated") or env.get("simulated") or
                                any(r.get("simulated") or (r.get("meta") or {}).get("simulated") for r in results))
    if results:
        written += regenerate_report(dest)
    probes = _load_probes(dest / PROBES_FILE)
    tests = [junit_summary(path) for path in sorted(dest.glob("*.xml"))]
    bar = bar_checks(results, probes)
    session_md = dest / "session.md"
    session_md.write_text(session_markdown(session, env, tests, bar, dest.name, probes), encoding="utf-8")
    written.append(session_md)
    try:
        rel_dir = str(dest.resolve().relative_to(readme.resolve().parent)) if readme else str(dest)
    except ValueError:
        rel_dir = str(dest)
    snippet = readme_snippet(env, bar, tests, rel_dir, date, probes, simulated=session["simulated"])
    if readme is not None:
        update_readme(readme, snippet)
        written.append(readme)
    return {"dest": dest, "written": written, "snippet": snippet, "bar": bar, "tests": tests, "probes": probes}
