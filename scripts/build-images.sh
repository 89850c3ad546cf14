#!/usr/bin/env bash
# Builds the example and test components (images/) into target/wasm32-wasip2/release/*.wasm
# (and hello, echo, exit-code, cat, fs-probe as wasip1 modules into target/wasm32-wasip1/release/):
# the Rust ones with the stock wasm32-wasip2 toolchain, and python_hello.wasm (an 18 MB CPython
# command) with componentize-py, pinned in scripts/install-python-tools.sh.
# vmm/src/images.rs is the one place that knows this path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/images"
cargo build --release --locked --quiet --workspace "$@"
# A few of them as wasm32-wasip1 core modules too (target/wasm32-wasip1/release/), which
# wasmvisor makes components with the preview 1 adapter.
cargo build --release --locked --quiet --target wasm32-wasip1 --bin hello --bin echo --bin exit-code --bin cat --bin fs-probe

"$root/scripts/install-python-tools.sh" >/dev/null
out="$root/target/wasm32-wasip2/release/python_hello.wasm"
src="$root/images/python-hello"
componentize="$root/target/pytools/bin/componentize-py"
# Rebuilt when the app, its world, the WIT it includes or the tool is newer than the output.
if [ ! -e "$out" ] || [ -n "$(find "$src" "$root/guest/wit/deps" "$componentize" -newer "$out" -print -quit)" ]; then
    # componentize-py reads a WIT directory: the example's world beside the repository's
    # one copy of the WASI interfaces.
    wit="$root/target/python-hello-wit"
    rm -rf "$wit" && mkdir -p "$wit"
    cp "$src/world.wit" "$wit/"
    ln -s "$root/guest/wit/deps" "$wit/deps"
    "$componentize" -d "$wit" -w command componentize -p "$src" app -o "$out.tmp"
    mv "$out.tmp" "$out"
fi
