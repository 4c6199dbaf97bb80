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
import shutil

import yaml

from megatron_solopo.console import UserError
from megatron_solopo.experiment.config import BASE_ARM, QualityExperimentConfig, load_quality_config
from megatron_solopo.experiment.stages import Stage, StageRunner, latest_checkpoint, solopo_argv

__all__ = ["add_arguments", "run", "plan_stages", "publish"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (examples/experiments/*.yaml)")
    parser.add_argument("--run-dir", help="where everything is written (default: the file's run_dir)")
    parser.add_argument("--quick", action="store_true",
                        help="apply the file's `quick` overrides (tiny sizes: checks that every stage connects)")
    parser.add_argument("--model-dir", help="default-model cache dir (default: the user cache, as "
                                            "fetch-default-model); used when the config names no model")
    parser.add_argument("--publish", metavar="DIR", help="after the analysis, copy the results (config, data "
                                                         "summaries, eval reports, table, plots) to DIR")
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
    from megatron_solopo.config import to_dict

    shared = to_dict(experiment.shared_config(overrides))  # every default filled in: stages see one config
    if model_dir is not None:
        shared["model"]["hf_model"] = str(model_dir / "hf")
    return shared


def _base_model_args(shared: dict) -> list[str]:
    model = shared["model"]
    return ["--hf-model", model["hf_model"]] if model.get("hf_model") else ["--checkpoint", model["checkpoint"]]


def plan_stages(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict,
                fetch_dir: pathlib.Path | None) -> list[Stage]:
    """Every stage's command line; writes each stage's full config under run_dir/configs/."""
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
    for arm in experiment.arms:
        data_dir = run_dir / "data" / arm.pairs
        train_dir = run_dir / "train" / arm.name
        config = _write_yaml(configs / f"train-{arm.name}.yaml", _stage_config(
            shared, data={"sample_on": arm.pairs, "output_dir": str(data_dir),
                                          "cache_dir": str(data_dir / "cache")},
            train={"output_dir": str(train_dir), "resume": "auto"}) | {"objective": dict(arm.objective)})
        stages.append(Stage(f"train-{arm.name}", f"train {arm.name} on the x_{arm.pairs} pairs",
                            solopo_argv("train", "--config", config)))
    for arm in [BASE_ARM, *(a.name for a in experiment.arms)]:
        config = _write_yaml(configs / f"eval-{arm}.yaml", _stage_config(
            shared, eval={"output_dir": str(run_dir / "eval" / arm), "label": arm}))
        if arm == BASE_ARM:
            argv = solopo_argv("eval", "--config", config, *_base_model_args(shared))
        else:
            train_dir = run_dir / "train" / arm
            argv = (lambda cfg=config, d=train_dir: solopo_argv("eval", "--config", cfg, "--checkpoint",
                                                               latest_checkpoint(d, "solopo experiment")))
        stages.append(Stage(f"eval-{arm}", f"evaluate {arm} on the held-out questions", argv))
    return stages


# ------------------------------------------------------------------------------------- run
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

    from megatron_solopo.env_report import collect, measure_matmul_gflops

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


def _analyze(experiment: QualityExperimentConfig, run_dir: pathlib.Path, shared: dict, seconds: dict,
             quick: bool) -> dict[str, str]:
    from megatron_solopo.eval.report import load_report
    from megatron_solopo.experiment.analysis import analyze, training_cost, write_results

    arms = [BASE_ARM, *(arm.name for arm in experiment.arms)]
    reports = {arm: load_report(run_dir / "eval" / arm / "report.json") for arm in arms}
    costs = {arm.name: training_cost(run_dir / "train" / arm.name / "metrics.jsonl") for arm in experiment.arms}
    results = analyze(reports, costs, experiment.all_comparisons(), experiment.metric,
                      experiment.bootstrap_resamples, experiment.seed)
    results["machine"] = _load_json(run_dir / "machine.json")
    results["stage_seconds"] = seconds
    results["sampling"] = {pair_set: (_load_json(run_dir / "data" / pair_set / "summary.json") or {}).get("timing", {})
                           for pair_set in experiment.pair_sets()}
    ablations = {arm.name: arm.ablation for arm in experiment.arms if arm.ablation}
    return write_results(results, run_dir / "results", ablations,
                         header=_header(experiment, run_dir, shared, seconds, quick))


def publish(run_dir: pathlib.Path, experiment: QualityExperimentConfig, out_dir: pathlib.Path) -> None:
    """Copies the committed part of a run: config, machine, data summaries, eval reports, results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("experiment.json", "machine.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    shutil.copytree(run_dir / "configs", out_dir / "configs", dirs_exist_ok=True)
    shutil.copytree(run_dir / "results", out_dir, dirs_exist_ok=True)
    for pair_set in experiment.pair_sets():
        summary = run_dir / "data" / pair_set / "summary.json"
        if summary.is_file():
            (out_dir / "data").mkdir(exist_ok=True)
            shutil.copy2(summary, out_dir / "data" / f"summary-{pair_set}.json")
    for arm in [BASE_ARM, *(a.name for a in experiment.arms)]:
        report = run_dir / "eval" / arm / "report.json"
        if report.is_file():
            (out_dir / "eval").mkdir(exist_ok=True)
            shutil.copy2(report, out_dir / "eval" / f"{arm}.json")
        metrics = run_dir / "train" / arm / "metrics.jsonl"
        if metrics.is_file():
            (out_dir / "train").mkdir(exist_ok=True)
            shutil.copy2(metrics, out_dir / "train" / f"{arm}.metrics.jsonl")
    _strip_local_paths(out_dir, run_dir)


def _strip_local_paths(out_dir: pathlib.Path, run_dir: pathlib.Path) -> None:
    """Published files are committed: paths of this machine (run dir, repository, home with the model
    cache) become `<run_dir>`, `<repo>` and `~` in every text file of `out_dir`."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    prefixes = sorted({str(run_dir.resolve()): "<run_dir>", str(repo): "<repo>", str(pathlib.Path.home()): "~"}.items(),
                      key=lambda item: -len(item[0]))  # the longest first: the run dir lies inside the repo
    for path in out_dir.rglob("*"):
        if path.suffix not in (".json", ".jsonl", ".yaml", ".md") or not path.is_file():
            continue
        text = original = path.read_text(encoding="utf-8")
        for prefix, placeholder in prefixes:
            text = text.replace(prefix, placeholder)
        if text != original:
            path.write_text(text, encoding="utf-8")


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
        from megatron_solopo.convert.default_model import default_cache_dir

        fetch_dir = pathlib.Path(args.model_dir).resolve() if args.model_dir else default_cache_dir()
    shared = _resolved_shared(experiment, overrides, fetch_dir)
    _pin_experiment(run_dir, {"config_file": str(pathlib.Path(args.config).resolve()), "quick": args.quick,
                              "overrides": overrides, "arms": [a.name for a in experiment.arms], "shared": shared})
    _measure_machine(run_dir)
    stages = plan_stages(experiment, run_dir, shared, fetch_dir)
    seconds = StageRunner(run_dir).run(stages)
    paths = _analyze(experiment, run_dir, shared, seconds, args.quick)
    print((run_dir / "results" / "table.md").read_text(encoding="utf-8"))
    print("results: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    if args.publish:
        publish(run_dir, experiment, pathlib.Path(args.publish))
        print(f"published to {args.publish}")
    return 0
