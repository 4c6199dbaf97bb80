"""`solopo plan`: one rank's peak memory for a layout and batch shape, from a fake-tensor dry run of the real
training step (plan/dry_run.py). Runs in one CPU process whatever the layout's world size.

    solopo plan --preset llama3.1-8b --tp 8 --cp 8 --short 4K --long 128K --response 256 --recompute full

With --gpus N: searches the TP x CP x DP layouts (with / without full recompute) that fit --gpu-memory-gib,
by layer-scaled dry runs, ordered by a projected step time (plan/search.py), with their sbatch lines:

    solopo plan --preset llama3.1-8b --short 4K --long 1M --response 256 --gpus 64 --gpu-memory-gib 80

`PlanLayout` is `tools/plan_layout.py`: the layout and per-GPU memory of an experiment config (plan/layout.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_solopo.config import load_config
from megatron_solopo.console import UserError, report_error
from megatron_solopo.plan.dry_run import PlanSpec, parse_tokens, plan_step
from megatron_solopo.plan.layout import dry_run_spec, memory_lines, plan_layout, preset_for
from megatron_solopo.plan.memory import GIB
from megatron_solopo.plan.search import Assumptions, scaled_plan, search_layouts, smallest_layout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="model preset (model/presets.py), e.g. llama3.1-8b")
    for name, text in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context"), ("dp", "data")):
        parser.add_argument(f"--{name}", type=int, default=1, help=f"{text}-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved)")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="split the activations outside TP's linears over the TP ranks (default: off for one "
                             "layout; on wherever TP > 1 in --gpus/--smallest searches)")
    parser.add_argument("--short", default="1K", help="short-context prompt tokens (e.g. 4K)")
    parser.add_argument("--long", default="8K", help="long-context prompt tokens (e.g. 128K, 1M)")
    parser.add_argument("--response", default="128", help="tokens per answer (chosen and rejected)")
    parser.add_argument("--mode", choices=("solo", "long"), default="solo",
                        help="solo: short chosen/rejected + long chosen (SoLoPO); long: long chosen + rejected")
    parser.add_argument("--objective", default="orpo", help="base objective (orpo, simpo, dpo, ipo)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                        help="default none; with --gpus: search only this mode (default: none and full)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="model params dtype")
    parser.add_argument("--micro-batch-pairs", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step on this rank")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--stage", choices=("first", "last"), default="first",
                        help="pipeline stage whose rank to plan (first: rank 0)")
    parser.add_argument("--real", action="store_true",
                        help="run with real tensors instead (world size 1 only): the validation path")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")
    parser.add_argument("--scaled", action="store_true",
                        help="dry-run 2 and 4 layers and extrapolate to the full depth (exact; faster)")
    search = parser.add_argument_group("layout search (--gpus; plan/search.py, docs/scaling.md)")
    search.add_argument("--gpus", type=int, default=None,
                        help="search the layouts of this many GPUs (instead of planning --tp/--cp/--dp)")
    search.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    search.add_argument("--smallest", action="store_true",
                        help="instead of --gpus: the fewest GPUs of one replica (DP=1) that fit --gpu-memory-gib")
    search.add_argument("--top", type=int, default=5, help="stop after this many layouts fit (0: all)")
    search.add_argument("--config", default="CONFIG.yaml", help="experiment YAML to name in the sbatch lines")
    defaults = Assumptions()
    for field in dataclasses.fields(Assumptions):
        search.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), help="projection assumption (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """One plan, a search or the smallest layout; exit 0, 3 when nothing fits, 2 on a user error (the
    ValueErrors reach `solopo`'s one-line handler; what the dry run cannot trace yet is one line too)."""
    try:
        return _run(args)
    except NotImplementedError as err:  # an op the dry run cannot trace: named, one line
        return report_error("plan", err)


def validate_args(args: argparse.Namespace) -> None:
    """UserError naming the flag for a value no layout or batch can have (before any dry run): sizes below 1,
    a GPU memory of 0 or less, empty or negative token counts, a long context shorter than the short one."""
    for flag in ("tp", "pp", "cp", "dp", "micro_batch_pairs", "microbatches"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.vpp is not None and args.vpp < 1:
        raise UserError(f"--vpp {args.vpp}: must be at least 1 (or left out)")
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: must be at least 1")
    if not args.gpu_memory_gib > 0:
        raise UserError(f"--gpu-memory-gib {args.gpu_memory_gib:g}: must be more than 0")
    if args.top < 0:
        raise UserError(f"--top {args.top}: must be 0 (all) or more")
    tokens = {}
    for flag in ("short", "long", "response"):
        try:
            tokens[flag] = parse_tokens(getattr(args, flag))
        except ValueError as err:
            raise UserError(f"--{flag}: {err}") from None
        if tokens[flag] < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: a context or answer needs at least 1 token")
    if tokens["long"] < tokens["short"]:
        raise UserError(f"--long {args.long} is shorter than --short {args.short}: the long context holds the short "
                        "one's evidence among distractors, so give --long >= --short")
    for field in dataclasses.fields(Assumptions):
        value = getattr(args, field.name)
        if isinstance(value, (int, float)) and value < 0:
            raise UserError(f"--{field.name.replace('_', '-')} {value}: must not be negative")


def _run(args: argparse.Namespace) -> int:
    validate_args(args)
    if args.gpus is not None or args.smallest:
        return _search(args)
    if args.recompute is None:
        args.recompute = "none"
    spec = PlanSpec(preset=args.preset, tp=args.tp, pp=args.pp, cp=args.cp, dp=args.dp, virtual_pp=args.vpp,
                    sequence_parallel=bool(args.sequence_parallel), short_tokens=parse_tokens(args.short),
                    long_tokens=parse_tokens(args.long), response_tokens=parse_tokens(args.response),
                    mode=args.mode, objective=args.objective, recompute=args.recompute, params_dtype=args.dtype,
                    micro_batch_pairs=args.micro_batch_pairs, num_microbatches=args.microbatches,
                    distributed_optimizer=args.distributed_optimizer, stage=args.stage)
    if args.scaled:
        if args.real:
            raise UserError("--scaled is a fake-tensor dry run; drop --real")
        scaled = scaled_plan(spec)
        print(f"dry run (fake tensors) at {scaled.layers[0]} and {scaled.layers[1]} layers, extrapolated to the "
              f"full depth: {spec.preset}, tp={spec.tp}{' sp' if spec.sequence_parallel else ''} pp={spec.pp} "
              f"cp={spec.cp} dp={spec.dp}, {spec.stage} stage, recompute={spec.recompute}, "
              f"mode={spec.mode}, short={spec.short_tokens} long={spec.long_tokens} response={spec.response_tokens}")
        for name, value in [*scaled.persistent_bytes.items(), ("activations+temporaries", scaled.activations_bytes),
                            ("PEAK", scaled.peak_bytes)]:
            print(f"  {name:<24}  {value / GIB:10.3f} GiB  ({value:,} bytes)")
        print(f"  peak reached in: {scaled.peak_phase}; {scaled.seconds:.1f} s on this machine")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"spec": vars(spec), "scaled": dataclasses.asdict(scaled)}, handle, indent=2)
        return 0
    result = plan_step(spec, fake=not args.real)
    print("\n".join(result.lines()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"spec": vars(spec), "fake": result.fake, "pp_rank": result.pp_rank,
                       "memory": result.memory.as_dict(), "seconds_setup": result.seconds_setup,
                       "seconds_step": result.seconds_step}, handle, indent=2)
    return 0


def _search(args: argparse.Namespace) -> int:
    if any(getattr(args, name) != 1 for name in ("tp", "pp", "cp", "dp")) or args.real:
        raise UserError("--gpus searches the layout; drop --tp/--pp/--cp/--dp/--real")
    spec = PlanSpec(preset=args.preset, short_tokens=parse_tokens(args.short), long_tokens=parse_tokens(args.long),
                    response_tokens=parse_tokens(args.response), mode=args.mode, objective=args.objective,
                    params_dtype=args.dtype, micro_batch_pairs=args.micro_batch_pairs,
                    distributed_optimizer=args.distributed_optimizer)
    assumptions = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
    recomputes = (args.recompute,) if args.recompute else ("none", "full")
    if args.smallest:
        if args.gpus is not None:
            raise UserError("--smallest finds the GPU count; drop --gpus")
        return _smallest(args, spec, assumptions, recomputes, sequence_parallel=args.sequence_parallel is not False)
    result = search_layouts(spec, args.gpus, args.gpu_memory_gib, assumptions, recomputes, top=args.top,
                            config=args.config, log=lambda line: print(line, file=sys.stderr, flush=True),
                            sequence_parallel=args.sequence_parallel is not False)
    print("\n".join(result.lines()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.as_dict(), handle, indent=2)
    return 0 if result.fitting() else 3


def _smallest(args, spec: PlanSpec, assumptions: Assumptions, recomputes, sequence_parallel: bool) -> int:
    found = False
    print(f"smallest replica (DP=1, PP=1, {'SP where TP > 1' if sequence_parallel else 'no SP'}) that fits "
          f"{args.gpu_memory_gib:g} GiB "
          f"({1 - assumptions.reserve_fraction:.0%} usable): {spec.preset}, mode={spec.mode}, "
          f"short={spec.short_tokens} "
          f"long={spec.long_tokens} response={spec.response_tokens}; memory from the layer-scaled dry run, time a "
          "PROJECTION (assumptions below)")
    for recompute in recomputes:
        row = smallest_layout(spec, args.gpu_memory_gib, recompute, assumptions,
                              log=lambda line: print(line, file=sys.stderr, flush=True),
                              sequence_parallel=sequence_parallel)
        if row is None:
            print(f"  recompute={recompute}: nothing up to 256 GPUs fits")
            continue
        found = True
        c, p = row.candidate, row.projection
        print(f"  recompute={recompute}: {c.tp * c.cp} GPUs, {c.label}: peak {row.plan.peak_gib:.2f} GiB, "
              f"projected {p.pair_s:.2f} s per pair (compute {p.compute_s:.2f}, TP {p.tp_comm_s:.2f}, "
              f"CP exposed {p.cp_comm_s:.2f})")
    print("\n".join(assumptions.lines()))
    return 0 if found else 3


class PlanLayout:
    """`tools/plan_layout.py --config FILE [--nodes N] [--gpus-per-node G] ...`: a config's layout checked against
    the job and its per-GPU memory planned (plan/layout.py). Exit 0 when it fits, 3 when it does not, 2 for a
    config error (message on stderr)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, help="experiment YAML (a recipe)")
        parser.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
        parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
        parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
        parser.add_argument("--preset", help="model preset to plan with (default: from the config)")
        parser.add_argument("--json", action="store_true", help="also print the estimate as JSON (GiB)")
        parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        try:
            config = load_config(args.config, args.overrides)
            preset = preset_for(config, args.preset)
            plan = plan_layout(config, preset, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
            spec, reason = dry_run_spec(config, preset, plan.dp, plan.num_microbatches)
        except (ValueError, FileNotFoundError) as err:
            print(f"plan_layout: {err}", file=sys.stderr)
            return 2
        print(f"config: {args.config}")
        print("\n".join(plan.lines), flush=True)
        try:
            lines, fits = memory_lines(plan, spec, reason, args.gpu_memory_gib, config)
        except (ValueError, NotImplementedError) as err:
            print(f"plan_layout: dry run: {err}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        if args.json:
            print(json.dumps({"tp": plan.parallel.tp, "pp": plan.parallel.pp, "cp": plan.parallel.cp, "dp": plan.dp,
                              "fits": fits, "dry_run": spec is not None, "lower_bound_gib": plan.estimate.as_gib()}))
        return 0 if fits else 3
