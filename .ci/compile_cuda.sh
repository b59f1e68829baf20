#!/usr/bin/env bash
# Compile-only check of every CUDA source under csrc/ for sm_80 and sm_90.
#
# Works without a GPU: it needs nvcc and a torch install (a CPU build is
# enough, it ships the ATen/cuda and c10/cuda headers). Objects go to a
# temporary directory that is removed on exit.
#
#   PYTHON=/path/to/python .ci/compile_cuda.sh
set -euo pipefail

PYTHON="${PYTHON:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
else
  echo "error: nvcc not found on PATH or in /usr/local/cuda/bin; install the CUDA toolkit" >&2
  exit 1
fi

# Torch's include paths, the Python headers, the C++ ABI torch was built with,
# and whether torch ships the generated c10/cuda/impl/cuda_cmake_macros.h (CPU
# builds do not; the header only holds Windows export and version macros that
# no header we use needs, so it is skipped with C10_CUDA_NO_CMAKE_CONFIGURE_FILE),
# and the C++ standard torch's own extension builder passes to nvcc: C++17, or
# C++20 for newer torch, whose headers warn under C++17. $CUDA_STD overrides it.
if ! torch_info="$("$PYTHON" - <<'EOF'
import os
import sysconfig

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import include_paths

paths = include_paths()
for path in paths:
    print(path)
print(sysconfig.get_paths()["include"])
print("ABI", int(torch._C._GLIBCXX_USE_CXX11_ABI))
macros = "c10/cuda/impl/cuda_cmake_macros.h"
print("MACROS", int(any(os.path.isfile(os.path.join(p, macros)) for p in paths)))
with open(cpp_extension.__file__) as f:
    print("STD", "c++20" if "-std=c++20" in f.read() else "c++17")
EOF
)"; then
  echo "error: $PYTHON could not import torch (set PYTHON to an interpreter with torch)" >&2
  exit 1
fi

includes=()
abi=""
macros=1
std=c++17
while IFS= read -r line; do
  if [[ "$line" == ABI\ * ]]; then
    abi="${line#ABI }"
  elif [[ "$line" == MACROS\ * ]]; then
    macros="${line#MACROS }"
  elif [[ "$line" == STD\ * ]]; then
    std="${line#STD }"
  else
    includes+=("-I$line")
  fi
done <<<"$torch_info"

flags=(
  -c "-std=${CUDA_STD:-$std}" -O3 --expt-relaxed-constexpr -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  "-D_GLIBCXX_USE_CXX11_ABI=$abi"
)
if [[ "$macros" == 0 ]]; then
  flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

outdir="$(mktemp -d)"
trap 'rm -rf "$outdir"' EXIT

mapfile -t sources < <(cd "$root" && find csrc -name '*.cu' -type f | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "error: no .cu files under $root/csrc" >&2
  exit 1
fi

echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 1)), -std=${CUDA_STD:-$std}"
n=0
for src in "${sources[@]}"; do
  echo "compiling $src"
  obj="$outdir/$n.o"
  "$NVCC" "${flags[@]}" "${includes[@]}" "$root/$src" -o "$obj"
  n=$((n + 1))
done
echo "compiled $n .cu files for sm_80 and sm_90"
