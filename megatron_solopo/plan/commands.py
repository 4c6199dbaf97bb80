"""`solopo plan`: one rank's peak memory for a layout and batch shape, from a fake-tensor dry run of the real
training step (plan/dry_run.py). Runs in one CPU process whatever the layout's world size.

    solopo plan --preset llama3.1-8b --tp 8 --cp 8 --short 4K --long 128K --response 256 --recompute full
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_solopo.plan.dry_run import PlanSpec, parse_tokens, plan_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (model/presets.py), e.g. llama3.1-8b")
    for name, text in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context"), ("dp", "data")):
        parser.add_argument(f"--{name}", type=int, default=1, help=f"{text}-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved)")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--short", default="1K", help="short-context prompt tokens (e.g. 4K)")
    parser.add_argument("--long", default="8K", help="long-context prompt tokens (e.g. 128K, 1M)")
    parser.add_argument("--response", default="128", help="tokens per answer (chosen and rejected)")
    parser.add_argument("--mode", choices=("solo", "long"), default="solo",
                        help="solo: short chosen/rejected + long chosen (SoLoPO); long: long chosen + rejected")
    parser.add_argument("--objective", default="orpo", help="base objective (orpo, simpo, dpo, ipo)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="model params dtype")
    parser.add_argument("--micro-batch-pairs", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step on this rank")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--stage", choices=("first", "last"), default="first",
                        help="pipeline stage whose rank to plan (first: rank 0)")
    parser.add_argument("--real", action="store_true",
                        help="run with real tensors instead (world size 1 only): the validation path")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")


def run(args: argparse.Namespace) -> int:
    spec = PlanSpec(preset=args.preset, tp=args.tp, pp=args.pp, cp=args.cp, dp=args.dp, virtual_pp=args.vpp,
                    sequence_parallel=args.sequence_parallel, short_tokens=parse_tokens(args.short),
                    long_tokens=parse_tokens(args.long), response_tokens=parse_tokens(args.response),
                    mode=args.mode, objective=args.objective, recompute=args.recompute, params_dtype=args.dtype,
                    micro_batch_pairs=args.micro_batch_pairs, num_microbatches=args.microbatches,
                    distributed_optimizer=args.distributed_optimizer, stage=args.stage)
    try:
        result = plan_step(spec, fake=not args.real)
    except (ValueError, NotImplementedError) as err:
        print(f"solopo plan: {err}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"spec": vars(spec), "fake": result.fake, "pp_rank": result.pp_rank,
                       "memory": result.memory.as_dict(), "seconds_setup": result.seconds_setup,
                       "seconds_step": result.seconds_step}, handle, indent=2)
    return 0
