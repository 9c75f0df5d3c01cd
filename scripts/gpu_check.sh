#!/usr/bin/env bash
# The GPU verification run (H200 through the device tool, or any CUDA machine).
#   scripts/gpu_check.sh tests       the GPU test group (222 tests; ~9 min on the H200 in one process,
#                                    so it runs in GPU_TEST_WORKERS (6) pytest-xdist workers when xdist is there:
#                                    most of the time is Triton compiling, which is per process and CPU-bound)
#   scripts/gpu_check.sh soak        the 10,000-step soak (~4.5 min; 5,000 steps per config)
#   scripts/gpu_check.sh sanitizers  compute-sanitizer memcheck/initcheck (sanitizer subset), racecheck (its smem kernels);
#                                    SANITIZER_TOOLS="memcheck" picks tools
#   scripts/gpu_check.sh bench       sawint4 bench (full default grid)
#   scripts/gpu_check.sh serving     the serving engine's GPU tests (tests/gpu/test_serving_gpu.py)
#   scripts/gpu_check.sh bench-serving-long | bench-serving-short
#                                    sawint4 bench-serving, Qwen3-8B shapes, one scenario per call (docs/serving.md)
# Logs go to $OUT (or ./gpu_out).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
case "${1:-tests}" in
  tests)
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-6}")
    timeout 580 python3 -m pytest -m gpu -q -p no:cacheprovider "${workers[@]}" tests/gpu/test_kernels_gpu.py \
      tests/gpu/test_aot_launcher_gpu.py tests/gpu/test_model_gpu.py tests/gpu/test_reliability_gpu.py \
      tests/gpu/test_trtllm_gpu.py -rfE \
      2>&1 | tee "$out/gpu_tests.txt" | tail -40
    ;;
  soak)
    SAWINT4_SOAK_STEPS=${SAWINT4_SOAK_STEPS:-10000} timeout 400 python3 -m pytest -m gpu -q -s -p no:cacheprovider \
      tests/gpu/test_soak_gpu.py 2>&1 | tee "$out/soak.txt" | tail -15
    ;;
  sanitizers)
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    sel_all="sanitizer"
    sel_smem="sanitizer and (decode_small or prefill_small or with_transforms)"  # racecheck is slow: the smem users
    for tool in ${SANITIZER_TOOLS:-memcheck initcheck racecheck}; do
      sel=$sel_all; [ $tool = racecheck ] && sel=$sel_smem
      echo "== $tool"
      timeout 200 compute-sanitizer --tool $tool --error-exitcode 1 python3 -m pytest -m gpu -q -p no:cacheprovider \
        tests/gpu/test_reliability_gpu.py -k "$sel" 2>&1 | tee "$out/sanitizer_$tool.txt" | tail -4
      echo "exit=${PIPESTATUS[0]}"
    done
    ;;
  bench)
    timeout 420 sawint4 bench --out "$out/bench" 2>&1 | tee "$out/bench.txt" | tail -60
    ;;
  serving)
    timeout 580 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_serving_gpu.py -rfE \
      2>&1 | tee "$out/serving_tests.txt" | tail -40
    ;;
  bench-serving-long)
    timeout 580 sawint4 bench-serving --scenarios long ${BENCH_SERVING_ARGS:-} --out "$out/serving_long" 2>&1 \
      | tee "$out/bench_serving_long.txt" | tail -40
    ;;
  bench-serving-short)
    timeout 580 sawint4 bench-serving --scenarios short ${BENCH_SERVING_ARGS:-} --out "$out/serving_short" 2>&1 \
      | tee "$out/bench_serving_short.txt" | tail -40
    ;;
esac
