#!/usr/bin/env bash
# Issue 22's GPU figures in one command, the code before issue 22 and now side by side:
#   bash bench/gpu.sh [--cpu-smoke]
# writes bench/results/gpu.json as it goes (bench/gpu.py says what is measured). The old code comes from
# PVP_OLD_TREE if set, else from git (PVP_OLD_REF, default e77784e: the commit before issue 22) into
# bench/work/old_tree; where the machine has no .git (a device copy), make it here first with
# `bash bench/gpu.sh --prepare` and carry bench/work/old_tree. `pvp serve` needs pyzmq and msgpack:
# where they are missing, carry wheels in .whl/ (installed to /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="${PVP_OLD_TREE:-bench/work/old_tree}"
if [ ! -d "$OLD/pvp" ]; then
  mkdir -p "$OLD"
  git archive "${PVP_OLD_REF:-e77784e}" pvp pvp_contract bench | tar -x -C "$OLD"
fi
[ "${1:-}" = "--prepare" ] && { echo "old tree in $OLD"; exit 0; }
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c "import zmq, msgpack" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
exec "$PY" bench/gpu.py --old "$OLD" "$@"
