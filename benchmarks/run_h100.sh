#!/usr/bin/env bash
# Replaced by benchmarks/gpu_session.sh (one device call, steps under time caps, 8 minutes in all):
# GPU loans are now 15 minutes of device time, too short for this file's 11-call plan.
echo "benchmarks/run_h100.sh is retired: use benchmarks/gpu_session.sh (--dry-run first; see benchmarks/README.md)" >&2
exit 2
