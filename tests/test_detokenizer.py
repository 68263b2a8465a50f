"""Incremental detokenization: no half UTF-8 characters, stop strings across token boundaries
never leak, held-back text is released at the end, and the engine applies the same rules."""

from __future__ import annotations

import pytest

from server.detokenizer import IncrementalDetokenizer
from server.engine import EngineConfig, LLMEngine
from server.sampling import SamplingParams
from tests.conftest import make_model

MULTIBYTE = "héllo wörld 🙂 日本語, Ünïcödé ✓"


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        pieces.append(detok.add_token(token))
        if detok.stopped:
            break
    if not detok.stopped:
        pieces.append(detok.flush())
    return pieces


def test_multibyte_characters_split_across_tokens_are_never_half_emitted(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test needs split chars"
    pieces = stream(IncrementalDetokenizer(tokenizer), ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE == tokenizer.decode(ids)


def test_a_trailing_half_character_is_dropped_at_the_end(tokenizer):
    ids = tokenizer.encode("ab🙂")
    pieces = stream(IncrementalDetokenizer(tokenizer), ids[:-1])  # cut inside the emoji
    assert "".join(pieces) == "ab"


def test_invalid_bytes_do_not_stall_the_stream(tokenizer):
    """A run of lone continuation bytes can never become a character: it is emitted (as
    U+FFFD) after MAX_HELD_TOKENS tokens instead of holding the stream back forever."""
    from server.detokenizer import MAX_HELD_TOKENS

    lone = tokenizer.encode("🙂")[-1]  # an emoji's last byte alone is invalid UTF-8
    assert tokenizer.decode([lone]) == "\ufffd"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add_token(lone) for _ in range(2 * MAX_HELD_TOKENS)]
    assert "".join(pieces).startswith("\ufffd") and pieces[MAX_HELD_TOKENS - 1] != ""
    assert detok.add_token(tokenizer.encode("ok")[0]) != ""  # valid text flows again


@pytest.mark.parametrize("stop", ["stop here", "p he", "s", "ow", "here now!"])
def test_stop_strings_across_tokens_never_leak(tokenizer, stop):
    text = "Alice said: stop here now"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop=[stop])
    emitted = ""
    for token in ids:
        piece = detok.add_token(token)
        emitted += piece
        assert stop not in emitted
        assert text.startswith(emitted)
        if detok.stopped:
            break
    if not detok.stopped:
        emitted += detok.flush()
    cut = text.find(stop)
    assert emitted == (text[:cut] if cut >= 0 else text)
    assert detok.stopped == (cut >= 0)


def test_stop_string_can_be_included_and_earliest_stop_wins(tokenizer):
    text = "Alice said: stop here now"
    ids = tokenizer.encode(text)
    pieces = stream(IncrementalDetokenizer(tokenizer, stop=["here", "said"],
                                           include_stop_str_in_output=True), ids)
    assert "".join(pieces) == "Alice said"


def test_held_back_prefix_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer.encode("Alice said: st")
    detok = IncrementalDetokenizer(tokenizer, stop=["stop"])
    emitted = "".join(detok.add_token(t) for t in ids)
    assert emitted == "Alice said: "  # "st" may still become "stop"
    assert detok.flush() == "st"


def test_engine_applies_stop_strings_and_multibyte_rules(tokenizer):
    """Force the model to spell a chosen text with logit_bias, one token at a time."""
    model = make_model()
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype="float32", max_num_seqs=4))
    text = "wörld 🙂 said: stop here"
    ids = tokenizer.encode(text)
    outs = []
    # one request per prefix length, each biased to emit exactly the next token of `text`
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=len(ids), temperature=0,
                                                   stop=["stop"], ignore_eos=True,
                                                   logit_bias={ids[0]: 100.0}))
    seq = engine.scheduler.by_id["a"]
    while engine.has_unfinished():
        step_out = engine.step()
        outs += step_out
        n = len(seq.output_ids)
        if n < len(ids):
            seq.params.logit_bias = {ids[n]: 100.0}
    emitted = "".join(o.text for o in outs)
    assert all("\ufffd" not in o.text for o in outs)
    assert emitted == "wörld 🙂 said: " and outs[-1].finish_reason == "stop"


def spell(engine: LLMEngine, text: str, tokenizer, **params) -> list:
    """Run one request forced (logit_bias) to spell `text`; return its outputs."""
    ids = tokenizer.encode(text)
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=len(ids), temperature=0,
                                                   logit_bias={ids[0]: 100.0}, **params))
    request = engine.scheduler.by_id["r"]
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        n = len(request.output_ids)
        if n < len(ids):
            request.params.logit_bias = {ids[n]: 100.0}
    return outs


@pytest.mark.parametrize("min_tokens", [0, 3, 8])
def test_min_tokens_holds_back_stop_strings_as_vllm_does(tokenizer, min_tokens):
    """A stop string counts only if it ends in the text of the min_tokens-th token or later
    (vLLM); before that it is ordinary text."""
    text = "one stop two stop three stop four stop five stop six"
    ids = tokenizer.encode(text)
    engine = LLMEngine(make_model(), tokenizer, EngineConfig(dtype="float32", max_num_seqs=2))
    outs = spell(engine, text, tokenizer, stop=["stop"], min_tokens=min_tokens,
                 ignore_eos=True)
    armed_at = len(tokenizer.decode(ids[:max(min_tokens - 1, 0)]))
    first_stop = min(i for i in range(len(text)) if text.startswith("stop", i)
                     and i + len("stop") > armed_at)
    assert "".join(o.text for o in outs) == text[:first_stop]
    assert outs[-1].finish_reason == "stop" and outs[-1].num_generated_tokens >= min_tokens


def test_min_tokens_masks_eos_and_stop_ids(tokenizer):
    """EOS and stop_token_ids cannot be drawn before min_tokens, even when forced."""
    engine = LLMEngine(make_model(), tokenizer, EngineConfig(dtype="float32", max_num_seqs=2))
    eos = tokenizer.eos_id
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=10, min_tokens=4, temperature=0,
                                                   stop_token_ids=[5],
                                                   logit_bias={eos: 100.0, 5: 90.0}))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == 5 and tokens[-1] == eos and eos not in tokens[:4]
    assert 5 not in tokens[:4] and outs[-1].finish_reason == "stop"
