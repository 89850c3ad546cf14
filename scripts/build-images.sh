#!/usr/bin/env bash
# Builds the example and test components (images/) with the stock wasm32-wasip2 toolchain into
# target/wasm32-wasip2/release/*.wasm. vmm/src/images.rs is the one place that knows this path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/images"
cargo build --release --locked --quiet --workspace "$@"
