#!/usr/bin/env bash
# The GPU session: ONE device call, steps in priority order, each under its own time cap, all within
# 8 minutes (the plan and its caps: megatron_solopo/bench/session.py; docs/benchmarks.md explains it).
#
#   bash benchmarks/gpu_session.sh --dry-run            here, on CPU: print the plan, check caps <= 480 s
#   bash benchmarks/gpu_session.sh                      ON the GPU machine, through the device tool:
#       run(carry=[".device/base"], command="bash benchmarks/gpu_session.sh", timeout_s=540)
#   bash benchmarks/gpu_session.sh te                   optional second call (only if >= 6 min of device
#       time remain), after staging TE: run(carry=[".device/te1"], ...) x4 as in benchmarks/README.md, then
#       run(carry=[".device/te5", ".device/base"], command="bash benchmarks/gpu_session.sh te", timeout_s=540)
#   bash benchmarks/gpu_session.sh --report FILES_DIR [--readme README.md]
#                                                       here: the returned files -> benchmarks/results/
#                                                       <date>-<machine>/ (table.md, plots, session.md)
#                                                       and the README's GPU results block
# Every step writes under $OUT as soon as it ends (session.json after each step, <step>.log while it
# runs, bench/bench-*.json after each case), so a call cut short still returns what it measured.
set -uo pipefail
mode=${1:-run}
case "$mode" in
  --dry-run|dry-run)
    exec python3 -m megatron_solopo.bench.session --dry-run --plan base
    ;;
  --report|report)
    shift
    exec python3 -m megatron_solopo.bench.session --report "$@"
    ;;
  run|te)
    : "${OUT:?run this through the device tool: it sets OUT, the folder whose files come back}"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # fewer fragmentation failures after a caught OOM (docstring of megatron_solopo/bench/__init__.py)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    plan=base
    [ "$mode" = te ] && plan=te
    exec python3 -m megatron_solopo.bench.session --run --plan "$plan" --out "$OUT"
    ;;
  *)
    echo "usage: gpu_session.sh [--dry-run | te | --report FILES_DIR [--readme README.md]]" >&2
    exit 2
    ;;
esac
