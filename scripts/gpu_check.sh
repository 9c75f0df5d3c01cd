#!/usr/bin/env bash
# The GPU verification run (H200 through the device tool, or any CUDA machine).
#   scripts/gpu_check.sh tests       GPU test group + 10,000-step soak
#   scripts/gpu_check.sh sanitizers  compute-sanitizer memcheck/racecheck/initcheck over the sanitizer subset
#   scripts/gpu_check.sh bench       sawint4 bench (full default grid)
# Logs go to $OUT (or ./gpu_out).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
case "${1:-tests}" in
  tests)
    timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
      tests/gpu/test_aot_launcher_gpu.py tests/gpu/test_model_gpu.py tests/gpu/test_reliability_gpu.py -rfE \
      2>&1 | tee "$out/gpu_tests.txt" | tail -40
    SAWINT4_SOAK_STEPS=${SAWINT4_SOAK_STEPS:-10000} timeout 220 python3 -m pytest -m gpu -q -s -p no:cacheprovider \
      tests/gpu/test_soak_gpu.py 2>&1 | tee "$out/soak.txt" | tail -15
    ;;
  sanitizers)
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for tool in memcheck racecheck initcheck; do
      echo "== $tool"
      timeout 150 compute-sanitizer --tool $tool --error-exitcode 1 python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/gpu/test_reliability_gpu.py -k sanitizer 2>&1 | tee "$out/sanitizer_$tool.txt" | tail -6
      echo "exit=$?"
    done
    ;;
  bench)
    timeout 420 sawint4 bench --out "$out/bench" 2>&1 | tee "$out/bench.txt" | tail -60
    ;;
esac
