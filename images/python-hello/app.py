"""A command component written in Python, built by componentize-py (scripts/build-images.sh).

It exercises what a real CPython program needs from WASI 0.2: arguments, environment,
stdout and stderr, the clocks, random bytes, the standard library (json, hashlib, re) and
an exit code.
"""

import hashlib
import json
import os
import re
import sys
import time

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        args = sys.argv[1:]
        digest = hashlib.sha256(" ".join(args).encode()).hexdigest()
        words = re.findall(r"[a-z]+", " ".join(args).lower())
        report = {
            "python": "%d.%d" % sys.version_info[:2],
            "args": args,
            "words": len(words),
            "sha256": digest,
            "greeting": os.environ.get("GREETING", "none"),
            "random_bytes": len(os.urandom(16)),
            "clock_ok": time.time() > 1.6e9 and time.monotonic() >= 0,
        }
        print("hello from python")
        print(json.dumps(report, sort_keys=True))
        print("to stderr", file=sys.stderr)
        sys.stdout.flush()
        code = int(os.environ.get("EXIT_CODE", "0"))
        if code:
            sys.exit(code)
