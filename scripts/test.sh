#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (host and guest), the guest build and all
# tests. Tests that need /dev/kvm fail (not skip) when CI=true.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh --no-boot
scripts/build-images.sh
scripts/install-python-tools.sh
cargo fmt --all --check
(cd guest && cargo fmt --check)
(cd images && cargo fmt --check)
cargo clippy --locked --all-targets --quiet -- -D warnings
(cd guest && cargo clippy --release --locked --quiet -- -D warnings)
cargo test --locked --workspace --all-targets
