#!/usr/bin/env bash
# Every GPU measurement of the benchmarks, and the CUDA tests, in one call of the device tool.
#
# Here, once (both folders are git-ignored; together with the tree they stay under 64 MiB):
#   ../shared/tools/gpu-wheels.sh .whl                      # Optuna, albumentations & co., 14 MiB
#   python bench/gpu_data.py --data ../shared/data/cifar10-jpeg --out .gpu-data   # 15k images, 44 MiB
# Then the device tool: command "bash bench/gpu.sh", carry [".whl", ".gpu-data"], timeout_s 540.
# It writes $OUT/gpu.log and $OUT/gpu-results.tgz; unpack that into bench/results and commit.
# Each step has a time limit, so one that hangs cannot eat the others; the whole stays under 8 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
RESULTS=bench/results-gpu
mkdir -p "$OUT" "$RESULTS"
exec > >(tee "$OUT/gpu.log") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, optuna, albumentations as A; print('torch', torch.__version__, 'optuna', optuna.__version__,
  'albumentations', A.__version__, torch.cuda.get_device_name())"
ARGS=(--data .gpu-data --param data.train_size=5000 --device cuda --out "$RESULTS")

step() {  # step NAME SECONDS COMMAND...: run it under a limit and say how it ended
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - t0)) s, $SECONDS s in all"
}

step "CUDA tests" 75 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_train.py tests/test_augment.py
step "(2) where a step's time goes" 40 python3 bench/steps.py "${ARGS[@]}"
step "(a) engine" 80 python3 bench/engine.py "${ARGS[@]}" --epochs 5 --repeats 3
step "(c) K workers on one GPU" 100 python3 bench/workers.py "${ARGS[@]}" --trials 8
step "(b, d) random search" 140 python3 bench/search.py "${ARGS[@]}"
# The same K = 8 under MPS, which lets the workers' kernels run side by side rather than
# time-sliced; only while the call has time left. The daemon changes no setting of the card.
if command -v nvidia-cuda-mps-control >/dev/null && ((SECONDS < 400)); then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    step "(c) K workers under MPS" 50 python3 bench/workers.py "${ARGS[@]}" --trials 8 --workers 1 8 --tag -mps
    echo quit | nvidia-cuda-mps-control
  fi
fi
tar czf "$OUT/gpu-results.tgz" -C bench results-gpu
ls -la "$RESULTS"
