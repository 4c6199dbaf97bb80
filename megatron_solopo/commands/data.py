"""`solopo build-data`: build SoLoPO preference pairs from a QA source (docs/data.md).

    solopo build-data --config examples/configs/data/synthetic_tiny.yaml [data.num_responses=8 ...]

Writes {data.output_dir}/pairs.jsonl, summary.json, summary.png and samples.jsonl, then tokenizes the
pairs into the Arrow cache (data.cache_dir) with the model's tokenizer so length problems show up
now rather than at training time.

Nothing another build produced is replaced without `--overwrite`: an output_dir whose summary.json
records other settings (or none), or a pairs file that no build with these settings wrote there, is
refused before any sampling (`check_nothing_replaced`). Running the same command again is allowed (it
resumes sampling and writes the same pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from megatron_solopo.config import load_config
from megatron_solopo.console import UserError, check_writable_dir
from megatron_solopo.convert.default_model import ensure_default_model
from megatron_solopo.data.pipeline import build_data, build_settings, file_sha256
from megatron_solopo.data.sampling import make_backend
from megatron_solopo.data.tokenization import load_tokenized_pairs, load_tokenizer

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["add_arguments", "check_nothing_replaced", "run", "resolve_model_dir"]

logger = logging.getLogger("megatron_solopo.data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="experiment YAML (its `data` section, and `model.hf_model` as the default sampler); "
                             "omitted: all defaults (synthetic source)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted config overrides, e.g. data.num_responses=8 data.long_target_tokens=[4096]")
    parser.add_argument("--no-tokenize", action="store_true",
                        help="stop after writing pairs.jsonl (skip filling the tokenized cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the pairs/summary of an earlier build with other settings (refused without it)")


def resolve_model_dir(config: ExperimentConfig) -> str:
    """data.sampling_model, else model.hf_model, else the default model (fetched/converted on first use)."""
    if config.data.sampling_model:
        return config.data.sampling_model
    if getattr(config.model, "hf_model", None):
        return config.model.hf_model
    # imported lazily: only this fallback needs the conversion room
    return str(ensure_default_model())


def _differences(recorded: dict, settings: dict) -> str:
    changed = sorted(key for key in set(recorded) | set(settings) if recorded.get(key) != settings.get(key))
    shown = [f"data.{key} {recorded.get(key)!r} -> {settings.get(key)!r}" if key != "sampling_model_id" else
             f"sampling model {recorded.get(key)!r} -> {settings.get(key)!r}" for key in changed[:4]]
    return ", ".join(shown) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def _count_lines(path: pathlib.Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _model_id(config: ExperimentConfig) -> str:
    """What build_data records as the sampling model: "scripted", or the model directory."""
    return "scripted" if config.data.sampling_backend == "scripted" else resolve_model_dir(config)


def check_nothing_replaced(config: ExperimentConfig, model_id: Callable[[], str] | None = None) -> None:
    """UserError (before anything is written or sampled) when this build would replace what another build
    produced: a data.output_dir whose summary.json records other settings or none, or an existing pairs file
    that a build with these settings did not write (its sha256 in summary.json). `--overwrite` skips this.
    `model_id` gives the sampling model's id (default `_model_id`), asked only when there is something to
    compare with."""
    data = config.data
    fix = "nothing was written: pass --overwrite to replace it, or choose another data.output_dir"
    output_dir, summary_file = pathlib.Path(data.output_dir), pathlib.Path(data.output_dir) / "summary.json"
    pairs = pathlib.Path(data.resolved_pairs_path)
    if not summary_file.is_file() and not pairs.is_file():
        return
    model = (model_id or (lambda: _model_id(config)))()
    settings = json.loads(json.dumps(build_settings(data, model), default=str))  # as summary.json holds them
    summary: dict = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            summary = {}
        recorded = summary.get("build_settings") if isinstance(summary, dict) else None
        if not isinstance(recorded, dict):
            raise UserError(f"data.output_dir={output_dir} holds an earlier build whose settings {summary_file} does "
                            f"not record; {fix}")
        if recorded != settings:
            raise UserError(f"data.output_dir={output_dir} holds a build with other settings "
                            f"({_differences(recorded, settings)}); {fix}")
    if pairs.is_file():
        recorded_path = summary.get("pairs_path") if summary else None
        ours = (recorded_path is not None and pathlib.Path(recorded_path).resolve() == pairs.resolve()
                and summary.get("pairs_sha256") == file_sha256(pairs))
        if not ours:
            setting = f"data.pairs_path={pairs}" if data.pairs_path else f"data.output_dir={output_dir}: {pairs}"
            raise UserError(f"{setting} already holds {_count_lines(pairs)} pairs that no build with these settings "
                            f"wrote (no matching pairs_sha256 in {summary_file}); nothing was written: pass "
                            "--overwrite to replace them, or set another data.pairs_path / data.output_dir")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    data = config.data
    if not args.overwrite:
        check_nothing_replaced(config)
    check_writable_dir(data.output_dir, "data.output_dir")  # before minutes of sampling
    check_writable_dir(pathlib.Path(data.resolved_pairs_path).parent, "data.pairs_path's directory")
    if not args.no_tokenize:
        check_writable_dir(data.cache_dir, "data.cache_dir")
    model_dir = resolve_model_dir(config)
    model_id = "scripted" if data.sampling_backend == "scripted" else model_dir
    tokenizer = load_tokenizer(model_dir)
    backend = make_backend(data.sampling_backend, model_dir, data.sampling_device, data.sampling_dtype,
                           data.sampling_batch_size, tokenizer, calls_per_batch=data.sampling_calls_per_batch)
    summary = build_data(data, tokenizer, backend, model_id, progress=not args.no_progress)
    if not args.no_tokenize:
        start = time.perf_counter()
        dataset = load_tokenized_pairs(data.resolved_pairs_path, tokenizer, data)
        stats = json.loads(dataset.info.description)
        logger.info("tokenized %d pairs in %.1f s (cache %s; longest long_chosen %d tokens)", len(dataset),
                    time.perf_counter() - start, data.cache_dir, stats["max_long_chosen_tokens"])
    counts = summary["counts"]
    print(f"pairs: {counts['pairs_written']} written to {summary['pairs_path']} from {counts['items_read']} questions "
          f"(context skips {counts['context_skipped'] or 'none'}, dropped {counts['pairs_dropped'] or 'none'}); "
          f"mean pass rate {summary['pass_rate']['mean']:.2f}; {summary['timing']['total_s']} s")
    return 0
