"""`solopo build-data`: build SoLoPO preference pairs from a QA source (docs/data.md).

    solopo build-data --config examples/configs/data/synthetic_tiny.yaml [data.num_responses=8 ...]

Writes {data.output_dir}/pairs.jsonl, summary.json, summary.png and samples.jsonl, then tokenizes the
pairs into the Arrow cache (data.cache_dir) with the model's tokenizer so length problems show up
now rather than at training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["add_arguments", "run", "resolve_model_dir"]

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


def resolve_model_dir(config: ExperimentConfig) -> str:
    """data.sampling_model, else model.hf_model, else the default model (fetched/converted on first use)."""
    if config.data.sampling_model:
        return config.data.sampling_model
    if getattr(config.model, "hf_model", None):
        return config.model.hf_model
    # imported lazily: only this fallback needs the conversion room
    from megatron_solopo.convert.default_model import ensure_default_model

    return str(ensure_default_model())


def run(args: argparse.Namespace) -> int:
    from megatron_solopo.config import load_config
    from megatron_solopo.console import check_writable_dir
    from megatron_solopo.data.pipeline import build_data
    from megatron_solopo.data.sampling import make_backend
    from megatron_solopo.data.tokenize import load_tokenized_pairs, load_tokenizer

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    data = config.data
    check_writable_dir(data.output_dir, "data.output_dir")  # before minutes of sampling
    check_writable_dir(pathlib.Path(data.resolved_pairs_path).parent, "data.pairs_path's directory")
    if not args.no_tokenize:
        check_writable_dir(data.cache_dir, "data.cache_dir")
    model_dir = resolve_model_dir(config)
    tokenizer = load_tokenizer(model_dir)
    backend = make_backend(data.sampling_backend, model_dir, data.sampling_device, data.sampling_dtype,
                           data.sampling_batch_size, tokenizer)
    model_id = "scripted" if data.sampling_backend == "scripted" else model_dir
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
