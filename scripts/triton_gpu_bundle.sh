#!/usr/bin/env bash
# Build build/triton_bundle/ (git-ignored) for a GPU machine with Python 3.12 and no network, small enough to
# travel with the working tree (the device tool carries at most 64 MiB; this is about 41 MiB):
#   server_py312.tar.xz        the nvidia-pytriton 0.7.0 wheel's tritonserver 2.51, Python backend, the 3.12
#                              stub and the wheel's bundled libraries, with the stubs of the other Python
#                              versions and the bundled libpython3.13 left out (~24 MiB)
#   numpy-1.26.4-cp312-*.whl   numpy<2 for the model's environment there (the backend needs it; ~17 MiB)
# Run it on a machine that reaches PyPI; then run scripts/serve_gpu_point.sh on the GPU machine with
# build/triton_bundle carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/triton_bundle}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_35_x86_64 \
  -d "$tmp" nvidia-pytriton==0.7.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" numpy==1.26.4
python3 -m zipfile -e "$tmp"/nvidia_pytriton-0.7.0-*.whl "$tmp/x"
cd "$tmp/x"
find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
rm -f nvidia_pytriton.libs/libpython3*13*
chmod +x pytriton/tritonserver/bin/tritonserver pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub
cd - >/dev/null
tar -C "$tmp/x" -cf - pytriton/tritonserver nvidia_pytriton.libs | xz -9e -T2 > "$out/server_py312.tar.xz"
du -ch "$out"/* | tail -n +1
