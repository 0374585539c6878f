#!/usr/bin/env bash
# Issue 20's variants of the from-scratch prior on a GPU, all at once: bench/prior.py, one process per
# variant (each clip in turn), JSON per variant in $OUT (or bench/results), the logs' ends on stdout;
# bench/results/prior_tiny_gpu.json holds such files' rows concatenated.
#   here:            bash bench/fit_gpu.sh --prepare; python bench/prior.py --prepare --variants VARIANT ...
#   on the GPU:      bash bench/prior_gpu.sh [VARIANT ...]   (carry bench/work/gpu, .whl and each
#                    bench/work/prior/tiny/CLIP/stages_*: the default variants pin FFHQ's crops, stages_ffhq)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-bench/results}"
source bench/gpu_env.sh
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(base inbetween adversarial tune all)
for variant in "${VARIANTS[@]}"; do
  OMP_NUM_THREADS=3 timeout "${PRIOR_GPU_SECONDS:-530}" python3 bench/prior.py --variants "$variant" \
    --out "$RESULTS/prior_tiny_gpu_$variant.json" > "/tmp/prior_gpu_$variant.log" 2>&1 &
done
wait
tail -n 4 /tmp/prior_gpu_*.log
