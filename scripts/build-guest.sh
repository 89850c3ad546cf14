#!/usr/bin/env bash
# Builds the guest workspace (guest/) for x86_64-unknown-none into the shared target
# directory: target/x86_64-unknown-none/release/{wasmvisor-guest,test-guest}.
# vmm/src/images.rs is the one place that knows this path.
#
# The guest's wasmtime carries the patches in guest/patches/ (guest/Cargo.toml says why): they
# are applied to the pristine crate from cargo's registry cache, checked against the checksum in
# Cargo.lock, in target/guest-wasmtime/, where guest/Cargo.toml's [patch] points.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(sed -n 's/^pub const WASMTIME_VERSION: &str = "\(.*\)";/\1/p' engine/src/lib.rs)"
patched="$root/target/guest-wasmtime"
stamp="$patched/.wasmvisor-patched"
want="$version $(cat guest/patches/*.patch | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    checksum="$(grep -A3 '^name = "wasmtime"$' Cargo.lock | sed -n "/^version = \"$version\"/,/^checksum/s/^checksum = \"\(.*\)\"/\1/p")"
    [ -n "$checksum" ] || { echo "build-guest: Cargo.lock has no checksum for wasmtime $version" >&2; exit 1; }
    cache="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
    crate="$(ls "$cache"/*/"wasmtime-$version.crate" 2>/dev/null | head -n 1 || true)"
    if [ -z "$crate" ]; then
        cargo fetch --locked --quiet
        crate="$(ls "$cache"/*/"wasmtime-$version.crate" | head -n 1)"
    fi
    echo "$checksum  $crate" | sha256sum --check --quiet
    rm -rf "$patched" "$patched.tmp" && mkdir -p "$patched.tmp"
    tar -xzf "$crate" -C "$patched.tmp"
    for p in guest/patches/*.patch; do
        patch --quiet --forward -p1 -d "$patched.tmp/wasmtime-$version" < "$p"
    done
    mv "$patched.tmp/wasmtime-$version" "$patched" && rm -rf "$patched.tmp"
    echo "$want" > "$stamp"
fi

cd "$root/guest"
cargo build --release --locked --quiet "$@"
