"""Runtime adapter for the official WASI test suite's runner (WebAssembly/wasi-testsuite,
branch prod/testsuite-base): `wasmvisor run` on its wasm32-wasip1 command tests.

Written for this project from the runner's adapter interface (get_name, get_version,
get_wasi_versions, get_wasi_worlds, compute_argv). `run.sh` beside it runs the suite.
"""

import os
import shlex
import subprocess
from typing import Dict, List, Optional, Tuple

COMMAND = shlex.split(os.getenv("WASMVISOR", "wasmvisor run"))


def get_name() -> str:
    return "wasmvisor"


def get_version() -> str:
    out = subprocess.run([COMMAND[0], "--version"], capture_output=True, encoding="utf-8", check=True)
    return out.stdout.split()[-1]


def get_wasi_versions() -> List[str]:
    return ["wasm32-wasip1"]


def get_wasi_worlds() -> List[str]:
    return ["wasi:cli/command"]


def compute_argv(test_path: str,
                 args_env_root: Tuple[List[str], Dict[str, str], Optional[str]],
                 proposals: List[str],
                 wasi_world: str,
                 wasi_version: str) -> List[str]:
    args, env, root = args_env_root
    argv = list(COMMAND)
    for name, value in env.items():
        argv += ["--env", f"{name}={value}"]
    if root:
        argv += ["--dir", f"{root}::/"]
    return argv + [test_path] + list(args)
