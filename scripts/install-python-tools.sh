#!/usr/bin/env bash
# Installs the Python tools the build and the tests use, pinned, into target/pytools (a venv):
# openapi-spec-validator checks the daemon's OpenAPI document (tests/daemon.rs);
# schemathesis fuzzes the daemon's API from that document (tests/daemon.rs);
# componentize-py builds the Python example component (scripts/build-images.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/pytools"
openapi_spec_validator=0.9.0
componentize_py=0.25.1
schemathesis=4.32.5
if "$venv/bin/python" -c "import openapi_spec_validator" 2>/dev/null \
    && [ "$("$venv/bin/componentize-py" --version 2>/dev/null)" = "componentize-py $componentize_py" ] \
    && [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $schemathesis" ]; then
    exit 0
fi
if ! command -v python3 >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
    else
        echo "install-python-tools: python3 is needed; install it" >&2
        exit 1
    fi
fi
rm -rf "$venv"
if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian keeps ensurepip in python3-venv.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
    else
        echo "install-python-tools: python3 -m venv failed; install python3-venv" >&2
        exit 1
    fi
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
    "openapi-spec-validator==$openapi_spec_validator" "componentize-py==$componentize_py" \
    "schemathesis==$schemathesis"
echo "install-python-tools: openapi-spec-validator $openapi_spec_validator, componentize-py $componentize_py, schemathesis $schemathesis in $venv"
