#!/usr/bin/env bash
# Builds bench/cutlass_conv_probe.cu into $1 (default .cutlass/probe) with CUTLASS 4.2's headers,
# taken from PyPI's nvidia-cutlass wheel (only the wheel, not its dependencies). The CUTLASS in
# TVM's wheel (4.1) lacks tools/util, which the sm90 conv collective includes.
# The probe then runs on a machine with a Hopper GPU and no CUDA toolkit:
#   python bench/fp8_headroom.py --cutlass .cutlass/probe
set -euo pipefail
out=${1:-.cutlass/probe}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "nvidia-cutlass>=4.2,<5"
python3 -m zipfile -e "$work"/nvidia_cutlass-*.whl "$work/wheel"
src=$(dirname "$(find "$work/wheel" -path "*cutlass_library/source/include/cutlass" -type d | head -1)")
src=$(dirname "$src")
mkdir -p "$(dirname "$out")"
nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
     -I"$src/include" -I"$src/tools/util/include" "$here/cutlass_conv_probe.cu" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out"
