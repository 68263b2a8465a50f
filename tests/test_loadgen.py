"""clients/loadgen.py's request bodies: sampling fields are sent only when asked for; each
request's prompt differs from the first token on unless --same_prompt."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))
import loadgen  # noqa: E402


def body(*argv: str, i: int = 0) -> dict:
    return loadgen.request_body(loadgen.build_parser().parse_args(list(argv)), i)


def test_top_p_is_sent_only_when_given():
    assert "top_p" not in body()
    with_top_p = body("--top_p", "0.95", "--temperature", "0.8")
    assert with_top_p.pop("top_p") == 0.95
    assert with_top_p == body("--temperature", "0.8")  # nothing else changes


def test_prompt_ids_differ_per_request_from_the_first_token_within_their_range():
    ids = ["--prompt_ids", "300,301,5000,29999,300"]
    prompts = [body(*ids, i=i)["prompt"] for i in range(200)]
    assert prompts[0] == [300, 301, 5000, 29999, 300]
    assert len({p[0] for p in prompts}) == 200  # no two share even their first token
    assert all(len(p) == 5 and 300 <= min(p) and max(p) <= 29999 for p in prompts)
    assert {tuple(body(*ids, "--same_prompt", i=i)["prompt"]) for i in range(5)} == {
        tuple(prompts[0])}
    assert body(i=3)["prompt"] != body(i=4)["prompt"]  # text prompts are numbered too
