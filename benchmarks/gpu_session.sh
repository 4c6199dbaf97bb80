#!/usr/bin/env bash
# The GPU session: ONE device call, steps in priority order, each under its own time cap, ending within 540 s
# (the plan and its caps: megatron_solopo/bench/gpu_session.py; docs/benchmarks.md explains it).
#
#   bash benchmarks/gpu_session.sh --dry-run [--checkout DIR]
#                                 here, on CPU: the plan, caps <= 525 s, $OUT's files (<= 8), the staged
#                                 .device/base (<= 64 MiB), device minutes (start + call + idle <= 13 of 15);
#                                 exit 0 only when everything is ready for the call
#   bash benchmarks/gpu_session.sh --simulate OUT_DIR
#                                 here, on CPU: the whole plan with simulated steps (made-up figures), to see
#                                 what comes back and what is printed (tests/bench/test_gpu_session.py runs it)
#   bash benchmarks/gpu_session.sh
#                                 ON the GPU machine, through the device tool, then give_back at once:
#       run(carry=[".device/base"], command="bash benchmarks/gpu_session.sh", timeout_s=540)
#   bash benchmarks/gpu_session.sh te
#                                 a later loan of its own, after staging TE (benchmarks/README.md)
#   bash benchmarks/gpu_session.sh --report FILES_DIR [--readme README.md]
#                                 here: the returned files -> benchmarks/results/<date>-<machine>/ (table.md,
#                                 plots, session.md, logs/) and the README's GPU results block
# $OUT holds at most 6 files at any moment (session.json, env.json, gpu-tests.xml, the headline bench JSON,
# probes.json, logs.tgz; + 1 being replaced), each rewritten as soon as its step ends; every figure is
# printed to stdout as soon as the runner has it, so the reply's output tail holds the results too.
set -uo pipefail
mode=${1:-run}
case "$mode" in
  --dry-run|dry-run)
    shift
    exec python3 -m megatron_solopo.bench.gpu_session --dry-run --plan base "$@"
    ;;
  --simulate|simulate)
    out=${2:?usage: gpu_session.sh --simulate OUT_DIR}
    exec python3 -m megatron_solopo.bench.gpu_session --run --simulate --out "$out" --work "$out-work"
    ;;
  --report|report)
    shift
    exec python3 -m megatron_solopo.bench.gpu_session --report "$@"
    ;;
  run|te)
    : "${OUT:?run this through the device tool: it sets OUT, the folder whose files come back}"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # fewer fragmentation failures after a caught OOM (docstring of megatron_solopo/bench/__init__.py)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    # single-process NCCL has never run there: its warnings (not its chatter) go to the step logs
    export NCCL_DEBUG=WARN
    export PYTHONUNBUFFERED=1
    plan=base
    [ "$mode" = te ] && plan=te
    exec python3 -m megatron_solopo.bench.gpu_session --run --plan "$plan" --out "$OUT" --work /tmp/solopo-session
    ;;
  *)
    echo "usage: gpu_session.sh [--dry-run [--checkout DIR] | --simulate OUT_DIR | te | --report FILES_DIR [--readme README.md]]" >&2
    exit 2
    ;;
esac
