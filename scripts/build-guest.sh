#!/usr/bin/env bash
# Builds the guest workspace (guest/) for x86_64-unknown-none into the shared target
# directory: target/x86_64-unknown-none/release/{wasmvisor-guest,test-guest}.
# vmm/src/images.rs is the one place that knows this path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/guest"
cargo build --release --locked --quiet "$@"
