#!/usr/bin/env bash
# Sets up a fresh machine for wasmvisor, boots the guest once and runs hello.wasm in a micro-VM.
#   scripts/setup.sh            install what is missing, build, boot, run
#   scripts/setup.sh --no-boot  install and build the guest only (used by scripts/test.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v rustup >/dev/null || ! command -v cargo >/dev/null; then
    echo "setup: rustup and cargo are needed (https://rustup.rs); install them and run this again" >&2
    exit 1
fi
if ! command -v cc >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq gcc >/dev/null
    else
        echo "setup: a C compiler (cc) is needed to link host binaries; install gcc" >&2
        exit 1
    fi
fi

# The toolchain, components and targets pinned in rust-toolchain.toml.
rustup toolchain install >/dev/null
echo "setup: toolchain $(rustc --version), targets: $(rustup target list --installed | tr '\n' ' ')"

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; wasmvisor needs KVM to boot guests" >&2
fi

scripts/build-guest.sh
echo "setup: built the guest images in target/x86_64-unknown-none/release/"

if [ "${1:-}" != "--no-boot" ]; then
    scripts/build-images.sh
    echo "setup: built the example components in target/wasm32-wasip2/release/"
    cargo build --release --locked --quiet --bin wasmvisor
    wasmvisor=target/x86_64-unknown-linux-gnu/release/wasmvisor
    echo "setup: built $wasmvisor"
    echo "setup: \$ $wasmvisor boot -- hello from wasmvisor"
    "$wasmvisor" boot -- hello from wasmvisor
    echo "setup: \$ $wasmvisor run target/wasm32-wasip2/release/hello.wasm"
    exec "$wasmvisor" run target/wasm32-wasip2/release/hello.wasm
fi
