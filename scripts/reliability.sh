#!/usr/bin/env bash
# The reliability suite in its long mode (CI runs the same tests short, within scripts/test.sh):
# 1,000 launch/remove cycles checked for leaks, schemathesis with 500 examples per operation,
# and the kill -9, hostile-guest and front-door abuse tests, each a few times over.
#   scripts/reliability.sh            long mode
#   RELIABILITY_ROUNDS=N ...          repeats the fixed-length tests N times (default 3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-python-tools.sh >/dev/null
export WASMVISOR_RELIABILITY_CYCLES="${WASMVISOR_RELIABILITY_CYCLES:-1000}"
export WASMVISOR_SCHEMATHESIS_EXAMPLES="${WASMVISOR_SCHEMATHESIS_EXAMPLES:-500}"
cargo test --locked -p wasmvisor-cli --test daemon -- --nocapture \
    launch_and_remove_cycles_leak_nothing the_api_takes_schemathesis
for round in $(seq 1 "${RELIABILITY_ROUNDS:-3}"); do
    echo "reliability: round $round"
    cargo test --locked -p wasmvisor-cli --test http -- --nocapture \
        killing_a_tenants_vmm_children every_acknowledged_increment hostile_guests hundreds_of_idle \
        limits_hold a_guest_that_answers
    cargo test --locked -p wasmvisor-cli --test daemon -- --nocapture \
        a_counter_survives a_crashing_tenant a_tenant_that_allocates
done
