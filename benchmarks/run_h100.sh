#!/usr/bin/env bash
# The `solopo bench` sweep on the lent H100, one phase per device `run` call (each call may run at
# most 10 minutes; a session has about 30 minutes of device time in all). Runs ON the GPU machine,
# from the repository root, after the staging calls in benchmarks/README.md. Results land under
# $OUT/<date>-<machine>/ (JSON rewritten after every case, plus a log), which the device tool copies
# back; commit them under benchmarks/results/ and redo the plots with `solopo bench --report DIR`.
#
#   bash benchmarks/run_h100.sh check        versions, GPU, and whether TE / TRL import (seconds)
#   bash benchmarks/run_h100.sh main         llama-1b, TE: solo-/long-ORPO 4K..128K, max-length search, TRL
#   bash benchmarks/run_h100.sh attention    llama-1b, ORPO: sdpa, local (padded), te padded, te fp8
#   bash benchmarks/run_h100.sh recompute    llama-1b, ORPO: te selective, te full (the long lengths)
#   bash benchmarks/run_h100.sh objectives   llama-1b, TE: solo-/long-{DPO,SimPO}, search
#   bash benchmarks/run_h100.sh smollm       smollm2-135m, TE: every objective, search, TRL (+ solo on HF)
#
# One warm-up and three timed steps per case (the first step absorbs kernel selection and the
# optimizer's state allocation; the JSON keeps every timed step, so the spread is visible).
# Ratios against the baseline are in each run's JSON when the baseline ran in it (main, smollm),
# and across runs in table.md.
# Phases are ordered by what the bar needs; each stops starting new cases after
# BENCH_BUDGET_S seconds (default 420) so it ends, with its JSON complete, inside the 10 minutes.
set -euo pipefail
phase=${1:?usage: run_h100.sh check|main|objectives|attention|recompute|smollm}
: "${OUT:?run this through the device tool: it sets OUT, the folder whose files come back}"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# fewer fragmentation failures after a caught OOM (see the docstring of megatron_solopo/bench/__init__.py)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
budget=${BENCH_BUDGET_S:-420}
bench() {  # bench TAG ARGS...: one `solopo bench` invocation, its log next to its JSON
  local tag=$1; shift
  python3 -m megatron_solopo.cli bench --out "$OUT" --tag "$tag" --time-budget-s "$budget" \
    --warmup-steps 1 --measure-steps 3 "$@" 2>&1 \
    | tee "$OUT/log-$tag.txt"
}

case "$phase" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
    python3 -m megatron_solopo.cli env
    python3 -c "import trl.experimental.orpo as m; print('trl ORPOTrainer ok', m.ORPOTrainer)" \
      || echo "TRL does not import: the baseline falls back to plain transformers (recorded in the JSON)"
    ;;
  main)
    bench main --preset llama-1b --variants te --objectives orpo --baseline auto --baseline-grad-ckpt on
    ;;
  objectives)
    bench objectives --preset llama-1b --variants te --objectives dpo,simpo --baseline none
    ;;
  attention)
    bench attention --preset llama-1b --variants sdpa local te-padded te-fp8 --baseline none
    ;;
  recompute)
    bench recompute --preset llama-1b --variants te-selective te-full --baseline none
    ;;
  smollm)
    bench smollm --preset smollm2-135m --variants te --baseline auto --baseline-grad-ckpt on,off \
      --baseline-modes long,solo
    ;;
  *)
    echo "unknown phase $phase (check|main|objectives|attention|recompute|smollm)" >&2
    exit 2
    ;;
esac
