#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py says what each step does and where the results go).
#
#   bash benchmarks/gpu_suite.sh             # on a GPU machine, from a copy of the working tree
#   bash benchmarks/gpu_suite.sh --dry-run   # anywhere: every step up to the first GPU call
#
# PYTHON picks the interpreter (default: python3, which on the lent GPU machines holds torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
