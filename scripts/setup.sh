#!/usr/bin/env bash
# Sets up a fresh machine for wasmvisor, boots the guest once, runs hello.wasm in a micro-VM,
# then serves the HTTP example through the front door and fetches it once.
#   scripts/setup.sh            install what is missing, build, boot, run, serve
#   scripts/setup.sh --no-boot  install and build the guest only (used by scripts/test.sh)
# WASMVISOR_SETUP_HTTP sets the front door's address for the last step (default 127.0.0.1:8080).
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
    "$wasmvisor" run target/wasm32-wasip2/release/hello.wasm

    # The front door: a daemon of its own (its state under target/), serving one component.
    addr="${WASMVISOR_SETUP_HTTP:-127.0.0.1:8080}"
    state="$root/target/setup-serve"
    rm -rf "$state" && mkdir -p "$state"
    # The daemon jails its VMM children, which takes root; as another user this demo runs
    # them unjailed (seccomp still applies) and says so.
    jail=()
    if [ "$(id -u)" != 0 ]; then
        jail=(--insecure-no-jail)
        echo "setup: not root: the demo daemon runs its VMM children unjailed (--insecure-no-jail)"
    fi
    echo "setup: \$ $wasmvisor serve ${jail[*]} --http-listen $addr target/wasm32-wasip2/release/http_hello.wasm"
    "$wasmvisor" serve "${jail[@]}" --data-dir "$state/data" --api-socket "$state/api.sock" --http-listen "$addr" \
        target/wasm32-wasip2/release/http_hello.wasm 2>"$state/serve.log" &
    daemon=$!
    trap 'kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null' EXIT
    for _ in $(seq 1 300); do
        grep -q "Serving HTTP on" "$state/serve.log" && break
        if ! kill -0 "$daemon" 2>/dev/null; then
            cat "$state/serve.log" >&2
            echo "setup: wasmvisor serve failed (is $addr taken? set WASMVISOR_SETUP_HTTP)" >&2
            exit 1
        fi
        sleep 0.1
    done
    grep "Serving HTTP on" "$state/serve.log"
    echo "setup: \$ curl http://$addr/"
    if command -v curl >/dev/null; then
        curl -sS "http://$addr/"
    else
        # bash alone, on a machine without curl.
        exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
        printf 'GET / HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
        sed '1,/^\r$/d' <&3
        exec 3<&-
    fi
fi
