#!/usr/bin/env bash
# Runs the official WASI test suite's wasm32-wasip1 tests (C, Rust, AssemblyScript; prebuilt
# in WebAssembly/wasi-testsuite, branch prod/testsuite-base) under `wasmvisor run`, with the
# suite's own runner. Needs a checkout of that branch (CI has no access to GitHub: this is a
# measurement, run on demand) and Python 3.12+ with colorama and requests.
#
#   tools/wasi-testsuite/run.sh /path/to/wasi-testsuite [python3.12]
#
# The runner deletes the tests' fs-tests.dir directories as it cleans up: use a fresh checkout
# (or `git checkout -- tests`) for each run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
suite="${1:?usage: run.sh WASI_TESTSUITE_CHECKOUT [PYTHON]}"
python="${2:-python3}"
export WASMVISOR="${WASMVISOR:-$root/target/x86_64-unknown-linux-gnu/release/wasmvisor run}"
cd "$suite"
"$python" run-tests -r "$root/tools/wasi-testsuite/wasmvisor.py" --disable-colors
