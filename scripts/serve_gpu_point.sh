#!/usr/bin/env bash
# On the GPU machine (Python 3.12, numpy 2, no network): one serving-benchmark point in process and through
# `sawint4 serve`, with the server from build/triton_bundle (made by scripts/triton_gpu_bundle.sh) and the
# model running in a small venv that has numpy<2 and sees this environment's packages.
#   scripts/serve_gpu_point.sh [bench_triton_point.py options, e.g. --concurrency 16 --output-len 256]
# Output: $OUT/triton_point.{txt,json}, $OUT/serve.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
bundle=build/triton_bundle
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
tar -C "$work" -xJf "$bundle/server_py312.tar.xz"
stub="$work/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"
libdir=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
{
  echo "== the machine"
  ldd --version | head -1
  python3 -c "import sysconfig as s; print('libpython:', s.get_config_var('LIBDIR'), s.get_config_var('LDLIBRARY'), 'shared:', s.get_config_var('Py_ENABLE_SHARED'))"
  LD_LIBRARY_PATH="$libdir" ldd "$stub" | grep -E "libpython|not found" || true
} 2>&1 | tee "$out/triton_point_machine.txt"
# The model's environment: numpy<2 first, then every site-packages folder of this environment.
python3 -m venv --without-pip "$work/stubenv"
sp=$("$work/stubenv/bin/python3" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m pip install -q --no-deps --no-index --target "$sp" "$bundle"/numpy-1.26.4-*.whl
python3 - "$sp/zz_main_env.pth" <<'PY'
import site, sys, sysconfig
dirs = [sysconfig.get_paths()["purelib"]] + [d for d in site.getsitepackages() if d != sysconfig.get_paths()["purelib"]]
open(sys.argv[1], "w").write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
PY
"$work/stubenv/bin/python3" -c "import numpy, torch, trtllm_sawint4; print('model env: numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tee -a "$out/triton_point_machine.txt"
timeout 560 python3 scripts/bench_triton_point.py --tritonserver-root "$work/pytriton/tritonserver" \
  --stub-python "$work/stubenv/bin/python3" --out "$out" "$@" 2>&1 | tee "$out/triton_point.txt"
