#!/usr/bin/env bash
# Issue 23's GPU figures in one command: bench/fit.py for `paper` and `paper-exact` (per-stage step times,
# each stage extrapolated to the preset), on lp_d3's frames 0:283 and 200 pivots, with the official weight
# files written with random values at full size; then bench/sync_probe.py (host syncs in the step loops).
# JSON lands in $OUT (or bench/results) as each part ends.
#   bash bench/fit_gpu.sh --prepare    # here, with the venv: the track file and carried files in .whl/
#   bash bench/fit_gpu.sh              # on the GPU machine (carry bench/work/gpu and .whl)
# The machine needs torch, torchvision, numpy, opencv, safetensors, scikit-learn, scipy, tqdm; lpips comes
# (and tflite, pyzmq) as wheels in .whl/. The MediaPipe landmark network the pose and expression terms read renders with is
# carried as its .tflite file alone (mediapipe itself does not install beside numpy 2).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=bench/work/gpu
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WORK" .whl
  [ -f "$WORK/lp_d3.safetensors" ] || .venv/bin/python -m pvp.cli track tests/data/lp_d3.mp4 -o "$WORK/lp_d3.safetensors"
  .venv/bin/python -m pip download -q --no-deps -d .whl lpips==0.1.4 tflite==2.18.0
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl pyzmq==26.2.0  # pvp.cli imports the client side of the wire
  cp "$(.venv/bin/python -c 'from pvp.tracking.differentiable import mediapipe_landmark_model as m; print(m())')" \
     "$WORK/face_landmark.tflite"
  cp "$(.venv/bin/python -c 'import mediapipe.python.solutions.face_mesh_connections as m; print(m.__file__)')" \
     "$WORK/face_mesh_connections.py"
  ls -la "$WORK" .whl
  exit 0
fi
RESULTS="${OUT:-bench/results}"
source bench/gpu_env.sh
COMMON=(--video "$WORK/lp_d3.safetensors" --train-frames 0:283 --random-weights /tmp/pvp_weights --device cuda)
for run in "paper 0.02 270" "paper-exact 0.002 200"; do
  set -- $run
  echo "== $1 at $2 of its steps (at most $3 s)"
  timeout "$3" python3 bench/fit.py --preset "$1" --fraction "$2" "${COMMON[@]}" \
    --out "$RESULTS/fit_${1//-/_}_gpu.json" 2>&1 | grep -v "it/s\]\|step/s\]\|frame/s\]"
done
echo "== host syncs in the step loops"
timeout 100 python3 bench/sync_probe.py --track "$WORK/lp_d3.safetensors" --landmarks "$WORK/face_landmark.tflite" \
  --out "$RESULTS/sync_probe_gpu.json" 2>&1 | grep -v -i "warn"
