"""Imports flow one way: fanformer <- quant <- server. Checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = {
    "fanformer": ["quant", "server", "fastapi", "pydantic", "uvicorn", "sse_starlette"],
    "quant": ["server", "fastapi", "pydantic", "uvicorn", "sse_starlette"],
    "server": ["ray"],  # Ray Serve only with --ray (server/ray_app.py)
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    modules = {"fanformer": "fanformer.checkpoint, fanformer.generate, fanformer.train",
               "quant": "quant, quant.cli",
               "server": "server.cli, server.api, server.engine"}[package]
    code = (f"import sys, {modules}; "
            f"print(' '.join(m for m in {FORBIDDEN[package]!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"{package} imports {result.stdout.strip()}"


@pytest.mark.parametrize("command", ["fanformer-train", "fanformer-quantize", "fanformer-serve",
                                     "fanformer-generate"])
def test_every_command_has_help(command):
    module = {"fanformer-train": "fanformer.train", "fanformer-quantize": "quant.cli",
              "fanformer-serve": "server.cli", "fanformer-generate": "server.generate_cli"}[command]
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {command}")
