#!/usr/bin/env bash
# Installs the wasmtime CLI of the version wasmvisor embeds into target/wasmtime-cli, for the
# comparisons in `cargo bench --bench run`. Not needed to build or test wasmvisor.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^pub const WASMTIME_VERSION: &str = "\(.*\)";/\1/p' "$root/engine/src/lib.rs")"
cargo install "wasmtime-cli@$version" --locked --root "$root/target/wasmtime-cli"
