#!/usr/bin/env python
"""The scaling table of docs/scaling.md: for each model, long length, objective mode, GPU memory and
recompute mode, the smallest single replica (DP=1, PP=1, SP wherever TP > 1) whose ranks fit, its dry-run
peak and projected seconds per pair, with the `solopo plan` command that reproduces the row.

    python tools/scaling_table.py --out scaling_rows.md                      # the whole matrix (~hours here)
    python tools/scaling_table.py --models llama3.1-8b --longs 128K 1M --modes solo --out rows.md

Rows are appended to --out as each is computed, and rows already in the file are skipped, so a killed run
continues where it stopped. Memory: the layer-scaled dry run (plan/search.py); time: the roofline
PROJECTION with the default assumptions (not a measurement). Models without `--distributed-optimizer`
in their entry below keep Adam's states whole on every rank.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODELS = {"llama3.1-8b": False, "qwen2.5-7b": False, "llama3.1-70b": True}
"""Preset -> plan it with the distributed optimizer (70B: 12 B/param of Adam does not fit whole on any rank)."""
HEADER = ("| model | long | mode | recompute | GPU | smallest layout | peak (dry run) | projected s / pair | "
          "wall s | command |\n|---|---|---|---|---|---|---|---|---|---|\n")


def row_key(model: str, long: str, mode: str, recompute: str, gib: float) -> str:
    """The first five cells of a row: what identifies it in --out."""
    return f"| {model} | {long} | {'SoLoPO' if mode == 'solo' else 'long-PO'} | {recompute} | {gib:g} GiB |"


def command(model: str, long: str, mode: str, recompute: str, gib: float, short: str, response: int) -> str:
    """The `solopo plan` line that reproduces one row."""
    distributed = " --distributed-optimizer" if MODELS.get(model) else ""
    return (f"solopo plan --preset {model} --short {short} --long {long} --response {response} --mode {mode} "
            f"--recompute {recompute}{distributed} --smallest --gpu-memory-gib {gib:g}")


def compute_row(model: str, long: str, mode: str, recompute: str, gib: float, short: str, response: int,
                max_gpus: int) -> str:
    from megatron_solopo.plan import PlanSpec, parse_tokens
    from megatron_solopo.plan.search import smallest_layout

    spec = PlanSpec(preset=model, short_tokens=parse_tokens(short), long_tokens=parse_tokens(long),
                    response_tokens=response, mode=mode, distributed_optimizer=MODELS.get(model, False))
    start = time.perf_counter()
    row = smallest_layout(spec, gib, recompute, max_gpus=max_gpus,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    if row is None:
        cells = f" nothing up to {max_gpus} GPUs | | |"
    else:
        c = row.candidate
        cells = (f" {c.tp * c.cp} GPUs: TP={c.tp}{' SP' if c.sequence_parallel else ''} CP={c.cp} | "
                 f"{row.plan.peak_gib:.2f} GiB | {row.projection.pair_s:.2f} |")
    cmd = command(model, long, mode, recompute, gib, short, response)
    return f"{row_key(model, long, mode, recompute, gib)}{cells} {seconds:.0f} | `{cmd}` |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--longs", nargs="+", default=["128K", "256K", "512K", "1M"])
    parser.add_argument("--modes", nargs="+", choices=("solo", "long"), default=["solo", "long"])
    parser.add_argument("--gpu-memory-gib", nargs="+", type=float, default=[80.0, 141.0])
    parser.add_argument("--recompute", nargs="+", choices=("none", "selective", "full"), default=["full", "none"])
    parser.add_argument("--short", default="4K")
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--max-gpus", type=int, default=256, help="largest replica tried (default 256)")
    parser.add_argument("--out", required=True, help="Markdown file the rows are appended to (resumable)")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    if not out.exists():
        out.write_text(HEADER)
    done = out.read_text()
    for model in args.models:
        for mode in args.modes:
            for recompute in args.recompute:
                for long in args.longs:
                    for gib in args.gpu_memory_gib:
                        if row_key(model, long, mode, recompute, gib) in done:
                            continue
                        line = compute_row(model, long, mode, recompute, gib, args.short, args.response,
                                           args.max_gpus)
                        print(line, flush=True)
                        with out.open("a") as handle:
                            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
