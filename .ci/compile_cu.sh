#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc as a standalone object (no torch headers needed: the
# .cu files are plain CUDA C++ behind a C ABI). Catches CUDA syntax/type errors on
# machines whose torch is CPU-only. Skips, successfully, when nvcc is absent.
#   usage: .ci/compile_cu.sh          (DVPVAE_CUDA_ARCH=sm_90 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cu: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
arch="${DVPVAE_CUDA_ARCH:-sm_90}"
out="$(mktemp -d /tmp/dvpvae_cu.XXXXXX)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "compile_cu: no csrc/*.cu files"
  exit 0
fi
for f in "${files[@]}"; do
  obj="$out/$(basename "${f%.cu}").o"
  echo "compile_cu: nvcc -c -arch=$arch -O3 -Icsrc $f"
  nvcc -c -arch="$arch" -O3 -std=c++17 -Icsrc "$f" -o "$obj"
done
echo "compile_cu: ${#files[@]} file(s) OK"

# The torch glue of the CUDA kernels (csrc/*cuda_glue.cpp) is compiled only in CUDA builds of
# torch. On a CPU-only torch we can still syntax-check it: the headers it uses are shipped,
# except one CMake-generated file (c10/cuda/impl/cuda_cmake_macros.h), stubbed here.
cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
torch_inc="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
if [ -f "$cuda_inc/cuda_runtime_api.h" ] && [ -n "$torch_inc" ]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  [ -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ] || echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for f in csrc/*cuda_glue.cpp; do
    echo "compile_cu: g++ -fsyntax-only $f"
    c++ -fsyntax-only -std=c++20 -Icsrc -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" \
        -I"$out/stub" -I"$cuda_inc" "$f"
  done
  echo "compile_cu: CUDA glue syntax OK"
else
  echo "compile_cu: CUDA or torch headers not found, skipping the glue syntax check"
fi
