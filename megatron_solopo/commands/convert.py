"""`solopo convert hf-to-mcore | mcore-to-hf`: checkpoint conversion between Hugging Face and Megatron-Core,
and `solopo fetch-default-model` (`FetchDefaultModel`, convert/default_model.py).

    solopo convert hf-to-mcore --hf-model DIR --output DIR [--tp N --pp N] [--dtype bf16]
    solopo convert mcore-to-hf --checkpoint DIR --output DIR [--max-shard-size 5GB] [--dtype bf16]

One process is enough for any model size that fits in CPU memory: the Megatron checkpoint reshards
to any TP/PP when the trainer loads it. `--tp/--pp > 1` need that many processes
(`torchrun --nproc-per-node N -m megatron_solopo.cli convert hf-to-mcore ...`), each reading only its
shard of the HF files.
"""

from __future__ import annotations

import argparse
from megatron_solopo.console import report_error
from megatron_solopo.convert.default_model import default_cache_dir, fetch_default_model
from megatron_solopo.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_solopo.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_solopo.parallel import ParallelConfig

DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors checkpoint -> Megatron-Core dist checkpoint")
    to_mcore.add_argument("--hf-model", required=True, help="HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--output", required=True, help="new or empty directory for the Megatron checkpoint")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (default 1)")
    to_mcore.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype stored (default bf16)")

    to_hf = sub.add_parser("mcore-to-hf", help="Megatron-Core dist checkpoint -> HF safetensors checkpoint")
    to_hf.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory")
    to_hf.add_argument("--output", required=True, help="new or empty directory for the HF checkpoint")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    to_hf.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weight dtype written (default: the checkpoint's)")
    to_hf.add_argument("--preset", default=None,
                       help="registered preset name, for checkpoints without solopo_checkpoint.json")
    to_hf.add_argument("--hf-assets", default=None,
                       help="directory with tokenizer/generation-config files to copy (default: the "
                            "checkpoint's hf_assets/)")


def run(args: argparse.Namespace) -> int:
    """Runs one direction; user errors propagate to `solopo` (one line, exit status 2)."""
    if args.direction == "hf-to-mcore":
        convert_hf_to_mcore(args.hf_model, args.output, ParallelConfig(tp=args.tp, pp=args.pp), args.dtype)
        return 0

    convert_mcore_to_hf(args.checkpoint, args.output, max_shard_size=args.max_shard_size, dtype=args.dtype,
                        preset=args.preset, assets_dir=args.hf_assets)
    return 0


class FetchDefaultModel:
    """`solopo fetch-default-model [--output DIR] [--force]`: fetch and convert the embedded default model."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output", default=None,
                            help=f"directory for the model (default: {default_cache_dir()})")
        parser.add_argument("--force", action="store_true",
                            help="delete a previous fetch in --output and fetch again")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        try:
            hf_dir = fetch_default_model(args.output, force=args.force)
        except RuntimeError as err:  # a failed download or a damaged file: the message says which
            return report_error("fetch-default-model", err)
        print(f"HF checkpoint:       {hf_dir}\nMegatron checkpoint: {hf_dir.parent / 'mcore'}")
        return 0
