"""`solopo experiment`: the quality experiment (SoLo-X vs long-X vs expand-long-X vs base), end to end.

    solopo experiment --config examples/experiments/solopo_vs_long_135m.yaml [--run-dir DIR] [--quick]
                      [--publish benchmarks/results/quality/<date>-<machine>] [section.key=value ...]

Stages, each a `solopo` command in its own process, skipped when an earlier run finished it
(experiment/stages.py): fetch the default model (when the config names no model), measure the
machine's fp32 matmul throughput, build the pair sets (responses sampled on x_short, and on x_long
when an arm needs them), train every arm, evaluate the base model and every arm on the held-out eval
questions, then the analysis (experiment/analysis.py) into <run_dir>/results/. Every file of the
run is under the run directory; --publish copies what a results folder needs (config, data summaries,
eval reports, table, plots) to a directory meant to be committed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import re
import shutil
import tempfile

import yaml

from megatron_solopo.config import to_dict
from megatron_solopo.console import UserError
from megatron_solopo.convert.default_model import default_cache_dir
from megatron_solopo.env_report import collect, measure_matmul_gflops
from megatron_solopo.eval.report import load_report
from megatron_solopo.experiment.analysis import (analyze, preregistered_rows, question_overlap, training_cost,
                                                 training_diagnostics, write_results)
from megatron_solopo.experiment.config import BASE_ARM, QualityExperimentConfig, load_quality_config
from megatron_solopo.experiment.selection import choose_alpha, load_selection, save_selection, selection_cell
from megatron_solopo.experiment.stages import Stage, StageRunner, latest_checkpoint, solopo_argv

__all__ = ["add_arguments", "run", "plan_stages", "publish", "restore"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (examples/experiments/*.yaml)")
    parser.add_argument("--run-dir", help="where everything is written (default: the file's run_dir)")
    parser.add_argument("--quick", action="store_true",
                        help="apply the file's `quick` overrides (tiny sizes: checks that every stage connects)")
    parser.add_argument("--model-dir", help="default-model cache dir (default: the user cache, as "
                                            "fetch-default-model); used when the config names no model")
    parser.add_argument("--publish", metavar="DIR", help="after the analysis, copy the results (config, data "
                                                         "summaries, eval reports, table, plots) to DIR")
    parser.add_argument("--restore", metavar="DIR", help="first rebuild the run directory's finished stages from a "
                        "folder an earlier run published (a run split in two, continued on another machine or "
                        "clone); refused when the run directory already holds a run")
    parser.add_argument("--arms", metavar="A,B", help="run the stages of these arms only (the pair sets and the "
                        "base are shared: a second run with the other arms skips them); the analysis covers "
                        "every arm evaluated so far")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the shared config, applied to every stage (after --quick's)")


# ------------------------------------------------------------------------------------- stage configs
def _write_yaml(path: pathlib.Path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


def _stage_config(shared: dict, **sections: dict) -> dict:
    """The shared config dict with some sections' keys replaced."""
    out = {name: dict(value) for name, value in shared.items()}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def _resolved_shared(experiment: QualityExperimentConfig, overrides: list[str], model_dir: pathlib.Path | None) -> dict:
    """The shared config as a complete dict (every default filled in), with the fetched model's path."""
    shared = to_dict(experiment.shared_config(overrides))  # every default filled in: stages see one config
    if model_dir is not None:
        shared["model"]["hf_model"] = str(model_dir / "hf")
    return shared


def _base_model_args(shared: dict) -> list[str]:
    model = shared["model"]
    return ["--hf-model", model["hf_model"]] if model.get("hf_model") else ["--checkpoint", model["checkpoint"]]


def plan_stages(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict,
                fetch_dir: pathlib.Path | None, validation_eval: dict | None = None,
                arms: list[str] | None = None) -> list[Stage]:
    """Every stage's command line; writes each stage's full config under run_dir/configs/.

    validation_eval: the eval section of the validation split (needed when an arm has alpha candidates).
    arms: plan only these arms' stages (None: all); the pair sets and the base eval are always planned.
    """
    configs = run_dir / "configs"
    stages = []
    if fetch_dir is not None:
        stages.append(Stage("fetch", "fetch and convert the default model (cached after the first run)",
                            solopo_argv("fetch-default-model", "--output", str(fetch_dir))))
    for pair_set in experiment.pair_sets():
        data_dir = run_dir / "data" / pair_set
        config = _write_yaml(configs / f"data-{pair_set}.yaml", _stage_config(
            shared, data={"sample_on": pair_set, "output_dir": str(data_dir), "cache_dir": str(data_dir / "cache")}))
        stages.append(Stage(f"data-{pair_set}", f"build the pairs sampled on x_{pair_set}",
                            solopo_argv("build-data", "--config", config)))
    heldout = _heldout_source(experiment, run_dir, shared)
    chosen = [arm for arm in experiment.arms if arms is None or arm.name in arms]
    for arm in chosen:
        if not arm.alpha_candidates:
            stages.append(_train_stage(run_dir, shared, arm.name, arm.pairs, arm.objective, heldout))
            continue
        if validation_eval is None:
            raise ValueError(f"arm {arm.name} selects alpha: plan_stages needs the validation eval section")
        for alpha in arm.alpha_candidates:
            name = arm.candidate_name(alpha)
            stages.append(_train_stage(run_dir, shared, name, arm.pairs, arm.candidate_objective(alpha), heldout))
            config = _write_yaml(configs / f"eval-val-{name}.yaml", _stage_config(
                {**shared, "eval": validation_eval}, eval={"output_dir": str(run_dir / "eval-val" / name), "label": name}))
            argv = (lambda cfg=config, d=run_dir / "train" / name: solopo_argv(
                "eval", "--config", cfg, "--checkpoint", latest_checkpoint(d, "solopo experiment")))
            stages.append(Stage(f"eval-val-{name}", f"evaluate {name} on the validation split", argv))
    for arm in [BASE_ARM, *(a.name for a in chosen)]:
        config = _write_yaml(configs / f"eval-{arm}.yaml", _stage_config(
            shared, eval={"output_dir": str(run_dir / "eval" / arm), "label": arm}))
        if arm == BASE_ARM:
            argv = solopo_argv("eval", "--config", config, *_base_model_args(shared))
        else:
            argv = (lambda cfg=config, a=arm: solopo_argv(
                "eval", "--config", cfg, "--checkpoint",
                latest_checkpoint(_arm_train_dir(experiment, run_dir, a, select=True), "solopo experiment")))
        stages.append(Stage(f"eval-{arm}", f"evaluate {arm} on the held-out questions", argv))
    return stages


def _train_stage(run_dir: pathlib.Path, shared: dict, name: str, pairs: str, objective: dict, heldout: dict) -> Stage:
    """`solopo train` of one arm (or alpha candidate) on its pair set, into run_dir/train/<name>."""
    data_dir = run_dir / "data" / pairs
    config = _write_yaml(run_dir / "configs" / f"train-{name}.yaml", _stage_config(
        shared, data={"sample_on": pairs, "output_dir": str(data_dir), "cache_dir": str(data_dir / "cache")},
        train={"output_dir": str(run_dir / "train" / name), "resume": "auto", **heldout}) | {"objective": dict(objective)})
    return Stage(f"train-{name}", f"train {name} on the x_{pairs} pairs", solopo_argv("train", "--config", config))


def _arm_train_dir(experiment: QualityExperimentConfig, run_dir: pathlib.Path, arm_name: str,
                   select: bool = False) -> pathlib.Path:
    """The training directory behind an arm: its own, or its chosen alpha candidate's. With select=True
    the choice is made (from the validation reports) and recorded when it is not yet."""
    arm = next(a for a in experiment.arms if a.name == arm_name)
    if not arm.alpha_candidates:
        return run_dir / "train" / arm.name
    choice = load_selection(run_dir, arm.name)
    if choice is None:
        if not select:
            raise UserError(f"arm {arm.name}: its alpha has not been chosen yet (run its stages: --arms {arm.name})")
        choice = _select_alpha(experiment, run_dir, arm)
    return run_dir / "train" / choice["candidate"]


def _select_alpha(experiment: QualityExperimentConfig, run_dir: pathlib.Path, arm) -> dict:
    """Chooses and records the arm's alpha from its candidates' validation reports; prints the table."""
    reports = {alpha: load_report(run_dir / "eval-val" / arm.candidate_name(alpha) / "report.json")
               for alpha in arm.alpha_candidates}
    choice = choose_alpha(arm, reports, experiment.metric, selection_cell(experiment.preregistration))
    save_selection(run_dir, choice)
    scores = ", ".join(f"alpha {row['alpha']:g}: {100 * row['score']:.1f}% (n={row['n']})" for row in choice["rows"])
    print(f"{arm.name}: alpha {choice['alpha']:g} chosen on the validation split ({choice['cell']}; {scores})")
    return choice


def _heldout_source(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict) -> dict:
    """train.heldout_pairs_path of every arm: the first pair set's pairs file, so that every arm scores the same
    held-out pairs and leaves their questions (pair ids) out of its own training pairs, whichever set it
    trains on. {} when shared.train.heldout_pairs is 0 (or an arm-independent path is given)."""
    train = shared.get("train", {})
    if not train.get("heldout_pairs") or train.get("heldout_pairs_path"):
        return {}
    return {"heldout_pairs_path": str(run_dir / "data" / experiment.pair_sets()[0] / "pairs.jsonl")}


# ------------------------------------------------------------------------------------- run
def _arms_argument(experiment: QualityExperimentConfig, text: str | None) -> list[str] | None:
    """--arms A,B as a list of arm names (None: every arm); an unknown name is a one-line error."""
    if not text:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [arm.name for arm in experiment.arms]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(f"--arms {text}: {unknown or 'no arm'} not among the file's arms {known}")
    return names


def _pin_experiment(run_dir: pathlib.Path, record: dict) -> None:
    """The run directory belongs to one experiment: a later run with other settings is refused."""
    path = run_dir / "experiment.json"
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != record:
            changed = sorted(k for k in set(earlier) | set(record) if earlier.get(k) != record.get(k))
            raise UserError(f"{run_dir} holds a run with other settings ({', '.join(changed)} differ); continue "
                            "it with the same command, or pass --run-dir NEW_DIR")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _measure_machine(run_dir: pathlib.Path) -> None:
    """machine.json: versions, devices and the fp32 matmul GFLOP/s, measured once per run directory
    (in this process, before the stages load the machine)."""
    import os


    path = run_dir / "machine.json"
    if path.is_file():
        return
    info = {**collect(), **measure_matmul_gflops()}
    info["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {info['platform']}"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"this machine: fp32 matmul {info['matmul_gflops']} GFLOP/s ({info['matmul_device']})")


def _load_json(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _header(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict, seconds: dict,
            quick: bool) -> str:
    machine = _load_json(run_dir / "machine.json") or {}
    data_lines = []
    for pair_set in experiment.pair_sets():
        summary = _load_json(run_dir / "data" / pair_set / "summary.json") or {}
        counts = summary.get("counts", {})
        data_lines.append(f"x_{pair_set} pairs: {counts.get('pairs_written', '?')} from "
                          f"{counts.get('sampled_questions', '?')} questions x "
                          f"{summary.get('responses_per_question', '?')} "
                          f"responses ({summary.get('sampling_model', '?')}), sampling {summary.get('timing', {}).get('sampling_s', '?')} s")
    ev, train, data = shared["eval"], shared["train"], shared["data"]
    return "\n".join([
        f"## Quality experiment{' (--quick: tiny sizes, not a result)' if quick else ''}", "",
        f"- machine: {machine.get('machine', platform.platform())}, fp32 matmul {machine.get('matmul_gflops', '?')} GFLOP/s"
        f" (measured in this run); torch {machine.get('torch', '?')}, megatron-core {machine.get('megatron_core', '?')}, "
        f"transformers {machine.get('transformers', '?')}",
        f"- date: {datetime.date.today().isoformat()}; model: {shared['model'].get('hf_model') or shared['model'].get('checkpoint')}",
        f"- data: short contexts <= {data['short_max_tokens']} tokens, long {data['long_target_tokens']} tokens; "
        + "; ".join(data_lines),
        f"- training: {train.get('steps')} steps x {train['global_batch_pairs']} pairs, lr {train['lr']}, same for every arm",
        f"- eval: suites {ev['suites']}, lengths {ev['context_lengths']}, depths {ev['depths']}, "
        f"{ev['num_samples']} questions per cell, {ev['answer_extraction']} scoring",
        f"- stage seconds: {json.dumps(seconds)}", "", ""])


def _evaluated_arms(experiment: QualityExperimentConfig, run_dir: pathlib.Path) -> list:
    """The arms whose test eval exists (a run with --arms evaluates some of them)."""
    return [arm for arm in experiment.arms if (run_dir / "eval" / arm.name / "report.json").is_file()]


def _stage_seconds(run_dir: pathlib.Path) -> dict[str, float]:
    """{stage: seconds} of every finished stage of the run directory (earlier runs with --arms included)."""
    markers = sorted((run_dir / "stages").glob("*.json"), key=lambda path: path.stat().st_mtime)
    return {path.stem: json.loads(path.read_text(encoding="utf-8"))["seconds"] for path in markers}


def _selection_results(experiment: QualityExperimentConfig, run_dir: pathlib.Path, arms: list, reports: dict) -> dict:
    """Per evaluated arm with alpha candidates: its recorded choice and how many of its validation
    questions are test questions (0 expected)."""
    out = {}
    for arm in arms:
        choice = load_selection(run_dir, arm.name) if arm.alpha_candidates else None
        if choice is None:
            continue
        validation = [load_report(run_dir / "eval-val" / arm.candidate_name(a) / "report.json") for a in arm.alpha_candidates]
        out[arm.name] = {**choice, "test_overlap": question_overlap(validation, list(reports.values()))}
    return out


def _sampling_results(experiment: QualityExperimentConfig, run_dir: pathlib.Path) -> dict:
    """Per pair set: the data summary's sampling timing and the pairs it wrote."""
    out = {}
    for pair_set in experiment.pair_sets():
        summary = _load_json(run_dir / "data" / pair_set / "summary.json") or {}
        out[pair_set] = {**summary.get("timing", {}), "pairs_written": summary.get("counts", {}).get("pairs_written")}
    return out


def _analyze(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict, quick: bool) -> dict[str, str]:
    evaluated = _evaluated_arms(experiment, run_dir)
    missing = [arm.name for arm in experiment.arms if arm not in evaluated]
    if missing:
        print(f"analysis without {', '.join(missing)} (not evaluated yet: `--arms {','.join(missing)}` runs them)")
    names = [BASE_ARM, *(arm.name for arm in evaluated)]
    reports = {arm: load_report(run_dir / "eval" / arm / "report.json") for arm in names}
    train_dirs = {arm.name: _arm_train_dir(experiment, run_dir, arm.name) for arm in evaluated}
    costs = {name: training_cost(train_dir / "metrics.jsonl") for name, train_dir in train_dirs.items()}
    prereg = experiment.preregistration
    comparisons = experiment.all_comparisons() + [tuple(pair) for pair in (prereg.primary_comparisons if prereg else [])]
    results = analyze(reports, costs, list(dict.fromkeys(comparisons)), experiment.metric,
                      experiment.bootstrap_resamples, experiment.seed)
    if prereg is not None:
        solo = [arm.name for arm in evaluated if arm.objective.get("mode", "solo") == "solo"]
        results["preregistered"] = preregistered_rows(results["comparisons"], prereg, solo, BASE_ARM)
    seconds = _stage_seconds(run_dir)
    results["machine"] = _load_json(run_dir / "machine.json")
    results["stage_seconds"] = seconds
    results["training_diagnostics"] = {name: training_diagnostics(train_dir) for name, train_dir in train_dirs.items()}
    results["sampling"] = _sampling_results(experiment, run_dir)
    results["selection"] = _selection_results(experiment, run_dir, evaluated, reports)
    ablations = {arm.name: arm.ablation for arm in experiment.arms if arm.ablation}
    return write_results(results, run_dir / "results", ablations,
                         header=_header(experiment, run_dir, shared, seconds, quick))


def publish(run_dir: pathlib.Path, experiment: QualityExperimentConfig, out_dir: pathlib.Path) -> None:
    """Copies the committed part of a run: config, machine, data summaries and pairs, eval reports, training
    metrics, stage markers, results. With the markers and pairs, `--restore` can continue the run elsewhere."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("experiment.json", "machine.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    for folder in ("configs", "stages"):
        shutil.copytree(run_dir / folder, out_dir / folder, dirs_exist_ok=True)
    shutil.copytree(run_dir / "results", out_dir, dirs_exist_ok=True)
    for pair_set in experiment.pair_sets():
        for name, published in (("summary.json", f"summary-{pair_set}.json"), ("pairs.jsonl", f"pairs-{pair_set}.jsonl")):
            if (run_dir / "data" / pair_set / name).is_file():
                (out_dir / "data").mkdir(exist_ok=True)
                shutil.copy2(run_dir / "data" / pair_set / name, out_dir / "data" / published)
    for arm in [BASE_ARM, *(a.name for a in experiment.arms)]:
        report = run_dir / "eval" / arm / "report.json"
        if report.is_file():
            (out_dir / "eval").mkdir(exist_ok=True)
            shutil.copy2(report, out_dir / "eval" / f"{arm}.json")
    for train_dir in sorted((run_dir / "train").glob("*")):  # every arm and alpha candidate
        for name, suffix in (("metrics.jsonl", "metrics.jsonl"), ("run_summary.json", "run_summary.json")):
            if (train_dir / name).is_file():
                (out_dir / "train").mkdir(exist_ok=True)
                shutil.copy2(train_dir / name, out_dir / "train" / f"{train_dir.name}.{suffix}")
    for report in sorted((run_dir / "eval-val").glob("*/report.json")):  # the validation split
        (out_dir / "eval-val").mkdir(exist_ok=True)
        shutil.copy2(report, out_dir / "eval-val" / f"{report.parent.name}.json")
    if (run_dir / "selection").is_dir():
        shutil.copytree(run_dir / "selection", out_dir / "selection", dirs_exist_ok=True)
    _strip_local_paths(out_dir, run_dir)


def _local_paths(run_dir: pathlib.Path) -> list[tuple[str, str]]:
    """(path of this machine, placeholder) for the run dir, the repository, home and the temporary folder
    (an eval's HF export of a checkpoint lives there); the longest first: the run dir lies inside the repo,
    the repo may lie in home, the run dir may lie in the temporary folder."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    return sorted({str(run_dir.resolve()): "<run_dir>", str(repo): "<repo>", str(pathlib.Path.home()): "~",
                   tempfile.gettempdir(): "<tmp>"}.items(), key=lambda item: -len(item[0]))


def _whole_path(prefix: str) -> re.Pattern[str]:
    """`prefix` where it is a whole path or a path's leading folders: not inside a longer name or path
    (/tmp is left alone in /home/me/tmp/x and in /tmpfiles)."""
    return re.compile(r"(?<![\w.\-/])" + re.escape(prefix) + r"(?![\w.\-])")


def _strip_local_paths(out_dir: pathlib.Path, run_dir: pathlib.Path) -> None:
    """Published files are committed: paths of this machine (run dir, repository, home with the model
    cache, the temporary folder) become `<run_dir>`, `<repo>`, `~` and `<tmp>` in every text file of
    `out_dir`."""
    patterns = [(_whole_path(prefix), placeholder) for prefix, placeholder in _local_paths(run_dir)]
    for path in out_dir.rglob("*"):
        if path.suffix not in (".json", ".jsonl", ".yaml", ".md") or not path.is_file():
            continue
        text = original = path.read_text(encoding="utf-8")
        for pattern, placeholder in patterns:
            text = pattern.sub(placeholder, text)
        if text != original:
            path.write_text(text, encoding="utf-8")


_RESTORED = {  # published file (glob) -> where the run directory keeps it, from the file's name
    "experiment.json": lambda name: "experiment.json",
    "machine.json": lambda name: "machine.json",
    "configs/*.yaml": lambda name: f"configs/{name}",
    "stages/*.json": lambda name: f"stages/{name}",
    "data/summary-*.json": lambda name: f"data/{name[len('summary-'):-len('.json')]}/summary.json",
    "data/pairs-*.jsonl": lambda name: f"data/{name[len('pairs-'):-len('.jsonl')]}/pairs.jsonl",
    "eval/*.json": lambda name: f"eval/{name[:-len('.json')]}/report.json",
    "eval-val/*.json": lambda name: f"eval-val/{name[:-len('.json')]}/report.json",
    "train/*.metrics.jsonl": lambda name: f"train/{name[:-len('.metrics.jsonl')]}/metrics.jsonl",
    "train/*.run_summary.json": lambda name: f"train/{name[:-len('.run_summary.json')]}/run_summary.json",
    "selection/*.json": lambda name: f"selection/{name}",
}
"""The inverse of `publish` for what a later run needs: the pin, the markers of the finished stages and
what those stages left that later stages and the analysis read (no checkpoints: an arm is evaluated in
the run that trains it)."""
_MACHINE_LOCAL_STAGES = ("fetch",)
"""Stages whose output lives outside the run directory (the model cache): run again after a restore."""
_PLACEHOLDER_FILES = ("experiment.json", "configs/*.yaml", "stages/*.json")
"""Restored files whose placeholders become this machine's paths (the pin and the stage commands compare
them); reports and metrics keep `<run_dir>` as published."""


def restore(published: pathlib.Path, run_dir: pathlib.Path) -> int:
    """Rebuilds `run_dir` from a folder `publish` wrote (see `_RESTORED`); returns the number of files.
    Refuses (UserError) a run directory that already holds a run, or a folder without stage markers."""
    if (run_dir / "experiment.json").exists() or (run_dir / "stages").exists():
        raise UserError(f"--restore: {run_dir} already holds a run; nothing was replaced. Restore into a new "
                        "--run-dir, or continue that run without --restore")
    if not (published / "experiment.json").is_file() or not any(published.glob("stages/*.json")):
        raise UserError(f"--restore: {published} holds no experiment.json or stage markers (stages/*.json); "
                        "it must be a folder written by `solopo experiment --publish` (this version or later)")
    paths = [(prefix, placeholder) for prefix, placeholder in _local_paths(run_dir)]
    count = 0
    for pattern, target in _RESTORED.items():
        for source in sorted(published.glob(pattern)):
            if pattern.startswith("stages/") and source.stem in _MACHINE_LOCAL_STAGES:
                continue
            destination = run_dir / target(source.name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if any(source.match(p) for p in _PLACEHOLDER_FILES):
                text = source.read_text(encoding="utf-8")
                for prefix, placeholder in paths:
                    text = re.sub(re.escape(placeholder) + r"(?=[/\"'\s]|$)", lambda _: prefix, text,
                                  flags=re.MULTILINE)
                destination.write_text(text, encoding="utf-8")
            else:
                shutil.copy2(source, destination)
            count += 1
    return count


def run(args: argparse.Namespace) -> int:
    """Runs (or continues) the experiment; user errors propagate to `solopo` (one line, exit status 2)."""
    experiment = load_quality_config(args.config)
    overrides = [*(experiment.quick if args.quick else []), *args.overrides]
    run_dir = pathlib.Path(args.run_dir or experiment.run_dir).resolve()
    needs_model = not (experiment.shared.get("model", {}).get("hf_model")
                       or experiment.shared.get("model", {}).get("checkpoint")
                       or any(o.startswith(("model.hf_model=", "model.checkpoint=")) for o in overrides))
    fetch_dir = None
    if needs_model:
        fetch_dir = pathlib.Path(args.model_dir).resolve() if args.model_dir else default_cache_dir()
    shared = _resolved_shared(experiment, overrides, fetch_dir)
    # the validation split: the shared eval with the file's `validation` overrides; --quick's sizes win again
    validation = [*overrides, *experiment.validation, *(experiment.quick if args.quick else [])]
    validation_eval = _resolved_shared(experiment, validation, fetch_dir)["eval"] if experiment.validation else None
    only = _arms_argument(experiment, args.arms)
    record = {"config_file": str(pathlib.Path(args.config).resolve()), "quick": args.quick, "overrides": overrides,
              "arms": [a.name for a in experiment.arms], "shared": shared}
    if experiment.validation:  # only when used: run directories of earlier versions stay valid
        record["validation"] = experiment.validation
    if args.restore:
        print(f"restored {restore(pathlib.Path(args.restore), run_dir)} files of {args.restore} into {run_dir}")
    _pin_experiment(run_dir, record)
    _measure_machine(run_dir)
    stages = plan_stages(experiment, run_dir, shared, fetch_dir, validation_eval, only)
    StageRunner(run_dir).run(stages)
    paths = _analyze(experiment, run_dir, shared, args.quick)
    print((run_dir / "results" / "table.md").read_text(encoding="utf-8"))
    print("results: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    if args.publish:
        publish(run_dir, experiment, pathlib.Path(args.publish))
        print(f"published to {args.publish}")
    return 0
