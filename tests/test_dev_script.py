"""scripts/dev.py installs once, and again only when pyproject.toml changes (or when `test`
needs the dev extras a first `serve` did not install); `serve` after `test` installs nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dev.py"


def test_reinstalls_only_when_pyproject_changes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("dev_script", SCRIPT)
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    venv_dir = tmp_path / ".venv"
    (venv_dir / "bin").mkdir(parents=True)
    (venv_dir / "bin" / "python").touch()
    installs: list[tuple[str, ...]] = []
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    monkeypatch.setattr(dev, "VENV", venv_dir)
    monkeypatch.setattr(dev, "BIN", venv_dir / "bin")
    monkeypatch.setattr(dev, "run", lambda *cmd: installs.append(cmd))

    def installed_now(extras: set[str]) -> list[str]:
        installs.clear()
        dev.setup(extras)
        return [cmd[-1] for cmd in installs]

    assert installed_now({"dev"}) == ["torch==2.13.0", ".[dev]"]  # `dev.py test`
    assert installed_now(set()) == []  # `dev.py serve` after it
    assert installed_now({"dev"}) == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert installed_now(set()) == ["torch==2.13.0", ".[dev]"]  # keeps the dev extras
    assert installed_now({"dev"}) == []


def test_the_command_takes_over_the_process(tmp_path, monkeypatch):
    """`serve` (and `test`) exec the server (pytest) in this process, from the repo root: a
    SIGTERM sent to the PID that was started reaches the server and drains it."""
    import os
    import sys

    spec = importlib.util.spec_from_file_location("dev_script", SCRIPT)
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    execs = []
    monkeypatch.setattr(dev, "setup", lambda extras: None)
    monkeypatch.setattr(dev.os, "execv", lambda path, argv: execs.append((path, argv,
                                                                         os.getcwd())))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dev.py", "serve", "--port", "9"])
    dev.main()
    server = str(dev.BIN / "fanformer-serve")
    assert execs == [(server, [server, "--port", "9"], str(dev.ROOT))]
