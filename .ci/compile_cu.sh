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
