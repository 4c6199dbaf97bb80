"""The packaged sample dataset (megatron_solopo/resources/sample/) and how it is rebuilt.

It holds 35 synthetic preference pairs (scripted responses, not model samples) plus a 256-token
ASCII BPE tokenizer with a ChatML template, sized for the `tiny` model presets (vocab_size 256,
4096 positions): short prompts ~400 tokens, long prompts 1536 tokens. It exists so `solopo train`
and the tests run with no download and no sampling; it teaches a model nothing real.

Rebuild (deterministic): ``python -m megatron_solopo.data.bundled [--tokenizer-too]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import tempfile

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.pipeline import build_data
from megatron_solopo.data.records import write_json
from megatron_solopo.data.sampling import ScriptedBackend
from megatron_solopo.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_solopo.data.tokenization import load_tokenizer

__all__ = ["SAMPLE_DIR", "sample_pairs_path", "sample_tokenizer_dir", "sample_config", "build_sample"]

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "resources" / "sample"
SAMPLE_VOCAB_SIZE = 256


def sample_pairs_path() -> pathlib.Path:
    """pairs.jsonl of the packaged sample."""
    return SAMPLE_DIR / "pairs.jsonl"


def sample_tokenizer_dir() -> pathlib.Path:
    """The sample's tokenizer directory (load with `transformers.AutoTokenizer.from_pretrained`)."""
    return SAMPLE_DIR / "tokenizer"


def sample_config(output_dir: str, pairs_path: str) -> DataConfig:
    """The data config the sample is built with (also examples/configs/data/sample_scripted.yaml)."""
    return DataConfig(source="synthetic", synthetic_num_items=40, synthetic_num_hops=[2, 3],
                      synthetic_filler_sentences=[0, 1], synthetic_num_distractors=8, seed=2024,
                      short_max_tokens=768, long_target_tokens=[1536], num_responses=8, sampling_backend="scripted",
                      output_dir=output_dir, pairs_path=pairs_path)


def build_sample(sample_dir: pathlib.Path = SAMPLE_DIR, rebuild_tokenizer: bool = False) -> dict:
    """Writes sample_dir/pairs.jsonl and summary.json (and the tokenizer when asked or missing)."""
    tokenizer_dir = sample_dir / "tokenizer"
    if rebuild_tokenizer or not tokenizer_dir.is_dir():
        build_tiny_tokenizer(vocab_size=SAMPLE_VOCAB_SIZE, byte_level=False, model_max_length=4096).save_pretrained(
            str(tokenizer_dir))
        # transformers 5 writes its own class name; the generic one loads in 4.x too
        config_path = tokenizer_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as work:
        config = sample_config(work, str(sample_dir / "pairs.jsonl"))
        summary = build_data(config, tokenizer, ScriptedBackend(), "scripted", progress=False)
    # machine-independent and reproducible: relative path, no wall-clock timings
    packaged = {**summary, "pairs_path": "pairs.jsonl"}
    for key in ("timing", "build_settings", "pairs_sha256"):  # timings vary; the provenance is build-data's
        packaged.pop(key, None)
    write_json(sample_dir / "summary.json", packaged)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer-too", action="store_true", help="also retrain the tokenizer")
    parser.add_argument("--out", type=pathlib.Path, default=SAMPLE_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    summary = build_sample(args.out, args.tokenizer_too)
    print(summary["counts"])


if __name__ == "__main__":
    main()
