#!/usr/bin/env python3
"""Set up the project's virtual environment (once) and run a command in it.

    python3 scripts/dev.py serve [fanformer-serve flags]   # set up, then serve the demo model
    python3 scripts/dev.py test  [pytest flags]            # set up, then run the test suite

Needs only Python 3.10+. It creates `.venv/` next to this repository's pyproject.toml,
installs the CPU build of torch first (so nothing pulls a multi-GB CUDA build), then the
project itself in editable mode. It reinstalls only when pyproject.toml changes (or when
`test` needs the dev extras that an earlier `serve` did not install); `serve` after `test`
installs nothing. Set
FANFORMER_TORCH_INDEX_URL to take torch from another index (e.g. PyTorch's CPU or CUDA
wheel index, see README "GPU").
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def setup(extras: set[str]) -> None:
    """Install once; again only when pyproject.toml changes or `extras` were not installed
    yet (so `serve` after `test` reuses the dev install instead of reinstalling)."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this script may run on an old python3
        sys.exit(f"fanformer needs Python 3.10 or newer, this is {sys.version.split()[0]}")
    stamp = VENV / ".fanformer-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        installed = json.loads(stamp.read_text())
    except (OSError, ValueError):
        installed = {}
    have = set(installed.get("extras", [])) if isinstance(installed, dict) else set()
    if isinstance(installed, dict) and installed.get("pyproject") == digest and extras <= have:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    index = os.environ.get("FANFORMER_TORCH_INDEX_URL")
    run(*pip, TORCH, *(["--index-url", index] if index else []))
    wanted = extras | have  # never drop what an earlier command installed
    run(*pip, "-e", f".[{','.join(sorted(wanted))}]" if wanted else ".")
    stamp.write_text(json.dumps({"pyproject": digest, "extras": sorted(wanted)}) + "\n")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "test", "setup"):
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    setup({"dev"} if command in ("test", "setup") else set())
    if command == "setup":
        return 0
    if command == "serve":
        argv = [str(BIN / "fanformer-serve"), *rest]
    else:
        argv = [str(BIN / "python"), "-m", "pytest", *rest]
    print("+", " ".join(argv), flush=True)
    os.chdir(ROOT)
    # the server (or pytest) takes over this process, so a SIGTERM sent to the PID a user or
    # a service manager knows reaches it (and drains the server) instead of orphaning it
    os.execv(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
