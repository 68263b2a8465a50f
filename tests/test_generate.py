"""The reference loop: cached == uncached, sampling filters, min/max length, seeds, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fanformer.generate import generate, main, sample_next
from tests.conftest import make_model


def test_cache_and_no_cache_agree_greedy(model, device):
    model = model.to(device)
    prompt = [5, 17, 42, 9]
    a = generate(model, prompt, 20, temperature=0, use_cache=True)
    b = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert a == b and len(a) == 20


def test_seeded_sampling_is_reproducible(model, device):
    model = model.to(device)
    prompt = [1, 2, 3]
    runs = [generate(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9,
                     generator=torch.Generator(device).manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]
    other = generate(model, prompt, 15, temperature=1.0,
                     generator=torch.Generator(device).manual_seed(8))
    assert other != runs[0]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)  # [0.64, 0.24, ...]: top_p 0.7 keeps the first two
    assert probs[0] < 0.7 < probs[:2].sum()
    assert {sample_next(logits, 1.0, top_p=0.7, generator=g) for _ in range(200)} == {0, 1}
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)} == {0}
    assert sample_next(logits, 0.0) == 0
    # a top_p that is 0 in float32 (found by schemathesis: 5e-324 was a 500) keeps the top
    assert {sample_next(logits, 1.0, top_p=5e-324, generator=g) for _ in range(20)} == {0}


def test_min_length_blocks_eos_and_eos_stops():
    model = make_model()
    eos = generate(model, [3, 4], 1, temperature=0)[0]  # the greedy first token, call it EOS
    assert generate(model, [3, 4], 10, temperature=0, eos_id=eos) == [eos]
    out = generate(model, [3, 4], 10, min_new_tokens=4, temperature=0, eos_id=eos)
    assert eos not in out[:4] and len(out) >= 5


def test_context_overflow_is_an_error(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate(model, [1] * 100, 50)


def test_cli_generates_from_a_checkpoint(checkpoint_dir, capsys):
    assert main(["--checkpoint", str(checkpoint_dir), "--prompt", "Alice", "--max_length", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Alice")


@pytest.mark.parametrize("args, message", [
    (["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--min_length", "500"], "--min_length must be in [0, max_length=100]"),
    (["--checkpoint", "/nonexistent"], "does not exist"),
])
def test_cli_errors_are_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "fanformer.generate", "--prompt", "x", *args],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_bits_per_byte_is_cross_entropy_rescaled(model, tokenizer):
    import math

    from fanformer.data import bits_per_byte

    text = (Path(__file__).parent / "fixtures" / "eval_sample.txt").read_text()[:3000]
    whole = bits_per_byte(model, tokenizer, text, seq_len=64, batch_size=3)
    assert whole["tokens"] == len(tokenizer.encode(text)) - 1
    expected = whole["cross_entropy"] * whole["tokens"] / (math.log(2) * whole["bytes"])
    assert abs(whole["bits_per_byte"] - expected) < 1e-9
    # batching and window padding do not change the numbers
    again = bits_per_byte(model, tokenizer, text, seq_len=64, batch_size=1)
    assert abs(again["cross_entropy"] - whole["cross_entropy"]) < 1e-4
    # an untrained model is close to uniform over the 512 tokens
    assert abs(whole["cross_entropy"] - math.log(512)) < 0.5
