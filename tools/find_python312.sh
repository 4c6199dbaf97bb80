#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter: $PYTHON312, python3.12 on PATH, or pyenv's newest 3.12.
set -u
is312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' 2>/dev/null; }
for cand in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)"; do
  [ -n "$cand" ] && is312 "$cand" && { echo "$cand"; exit 0; }
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
    cand="$root/versions/$v/bin/python"
    is312 "$cand" && { echo "$cand"; exit 0; }
  done
fi
echo "error: no Python 3.12 found (megatron-core >= 0.17 needs it). Install one (e.g. 'pyenv install 3.12')" \
     "or set PYTHON312=/path/to/python3.12." >&2
exit 1
