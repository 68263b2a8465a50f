"""clients/loadgen.py's request bodies: sampling fields are sent only when asked for."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))
import loadgen  # noqa: E402


def body(*argv: str) -> dict:
    return loadgen.request_body(loadgen.build_parser().parse_args(list(argv)), 0)


def test_top_p_is_sent_only_when_given():
    assert "top_p" not in body()
    with_top_p = body("--top_p", "0.95", "--temperature", "0.8")
    assert with_top_p.pop("top_p") == 0.95
    assert with_top_p == body("--temperature", "0.8")  # nothing else changes
