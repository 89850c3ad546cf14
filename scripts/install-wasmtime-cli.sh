#!/usr/bin/env bash
# Installs the peers of the comparisons in `cargo bench --bench run` and `--bench http` into
# target/wasmtime-cli/bin: the wasmtime CLI of the version wasmvisor embeds, and
# wasmtime-phases (tools/wasmtime-phases), a small embedding of the same wasmtime that times
# `wasmtime run`'s phases. Not needed to build or test wasmvisor.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^pub const WASMTIME_VERSION: &str = "\(.*\)";/\1/p' "$root/engine/src/lib.rs")"
if [ "$("$root/target/wasmtime-cli/bin/wasmtime" --version 2>/dev/null)" != "wasmtime $version" ]; then
    cargo install "wasmtime-cli@$version" --locked --root "$root/target/wasmtime-cli"
fi
CARGO_TARGET_DIR="$root/target/wasmtime-phases-build" \
    cargo install --path "$root/tools/wasmtime-phases" --locked --root "$root/target/wasmtime-cli"
