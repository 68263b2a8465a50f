"""The data pipeline: reading corpora, the token cache, batches, rank shards, bits per byte."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fanformer.data import (
    EVAL_TEXT,
    DataError,
    PackedBatches,
    TokenCache,
    bits_per_byte,
    document_positions,
    evaluate_tokens,
    iter_documents,
    read_eval_text,
    resolve_files,
    split_tokens,
    strip_gutenberg,
    token_byte_lengths,
)
from tests.conftest import FIXTURES, make_model


def test_resolve_files_expands_folders_and_rejects_bad_input(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee")
    (tmp_path / "corpus" / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "corpus" / "notes.bin").write_bytes(b"\0")
    assert [p.name for p in resolve_files([tmp_path / "corpus"])] == ["b.txt", "a.jsonl"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        resolve_files([tmp_path / "empty.txt"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        resolve_files([tmp_path / "nothing"])


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(iter_documents([good])) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 has no string field 'text'"):
        list(iter_documents([bad]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:1 is not valid JSON"):
        list(iter_documents([broken]))


def test_token_cache_packs_documents_with_eos_and_is_reused(tmp_path, tokenizer):
    docs = ["The Queen said hello.", "Alice ran off.\nThe end."]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cache = TokenCache.build([corpus], tokenizer, tmp_path / "cache", show_progress=False)
    expected = []
    for d in docs:
        expected += tokenizer.encode(d) + [tokenizer.eos_id]
    assert cache.tokens.tolist() == expected
    assert cache.tokens.dtype == np.uint16
    again = TokenCache.build([corpus], tokenizer, tmp_path / "cache", show_progress=False)
    assert again.path == cache.path  # same inputs and tokenizer: the same file, not rebuilt
    moved = tmp_path / "moved.jsonl"  # a copy elsewhere, with a new mtime: same contents
    moved.write_bytes(corpus.read_bytes())
    os.utime(moved, (1, 1))
    assert TokenCache.build([moved], tokenizer, tmp_path / "cache",
                            show_progress=False).path == cache.path
    corpus.write_text(json.dumps({"text": "changed"}) + "\n")
    changed = TokenCache.build([corpus], tokenizer, tmp_path / "cache", show_progress=False)
    assert changed.path != cache.path


def test_long_documents_stream_in_pieces_without_losing_text(tmp_path, tokenizer, monkeypatch):
    import fanformer.data as data

    monkeypatch.setattr(data, "_CHUNK_CHARS", 200)  # force many pieces
    text = (FIXTURES / "tiny.txt").read_text()[:5000]
    (tmp_path / "a.txt").write_text(text)
    cache = TokenCache.build([tmp_path / "a.txt"], tokenizer, tmp_path / "c",
                             show_progress=False)
    assert cache.tokens[-1] == tokenizer.eos_id
    assert tokenizer.decode(cache.tokens[:-1].tolist()) == text


def test_batches_are_shifted_deterministic_and_cover_an_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = PackedBatches(tokens, seq_len=10, seed=3)
    inputs, targets = batches.batch(0, 4)
    assert inputs.shape == targets.shape == (4, 10)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(PackedBatches(tokens, 10, seed=3).batch(0, 4)[0], inputs)
    assert not torch.equal(PackedBatches(tokens, 10, seed=4).batch(0, 4)[0], inputs)
    starts = sorted(int(row[0]) for row in batches.batch(0, batches.n_windows)[0])
    assert starts == list(range(0, 1000, 10))  # one epoch visits every window once
    second_epoch = sorted(int(r[0]) for r in batches.batch(batches.n_windows, 100)[0])
    assert second_epoch == starts


def test_rank_shards_make_up_the_single_process_batch():
    batches = PackedBatches(np.arange(5000, dtype=np.uint16), seq_len=8, seed=0)
    for step in (0, 7):
        alone = torch.cat([batches.rank_batch(step, m, 0, 3, accum=2, world=1)[0]
                           for m in range(2)])
        ranks = torch.cat([batches.rank_batch(step, 0, r, 3, accum=1, world=2)[0]
                           for r in range(2)])
        assert torch.equal(alone, ranks)
    mine = batches.rank_batch(0, 0, 0, 3, 1, 2)[0]
    other = batches.rank_batch(0, 0, 1, 3, 1, 2)[0]
    assert not torch.equal(mine, other)


def test_split_holds_out_the_tail():
    train, held = split_tokens(np.arange(1000), 0.1)
    assert len(train) == 900 and held[0] == 900


def test_token_byte_lengths_count_utf8_bytes(tokenizer):
    text = "Café — naïve 東京 🙂 said Alice."
    ids = tokenizer.encode(text)
    assert int(token_byte_lengths(tokenizer)[ids].sum()) == len(text.encode("utf-8"))
    assert token_byte_lengths(tokenizer)[tokenizer.eos_id] == 0


def test_evaluate_tokens_matches_bits_per_byte(tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    text = EVAL_TEXT.read_text()[:6000]
    reference = bits_per_byte(model, tokenizer, text, seq_len=64)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.uint16)
    ours = evaluate_tokens(model, tokens, token_byte_lengths(tokenizer), seq_len=64)
    assert ours["tokens"] == reference["tokens"]
    assert ours["bytes"] == reference["bytes"]
    assert ours["bits_per_byte"] == pytest.approx(reference["bits_per_byte"], rel=1e-5)


def test_document_positions_restart_after_each_eos():
    E = 0
    ids = torch.tensor([[5, E, 3, 4, E, E, 7], [1, 2, 3, 4, 5, 6, E]])
    assert document_positions(ids, E).tolist() == [[0, 1, 0, 1, 2, 0, 0],
                                                    [0, 1, 2, 3, 4, 5, 6]]


def test_eval_text_loses_exactly_the_two_gutenberg_credits():
    raw = EVAL_TEXT.read_text(encoding="utf-8")
    text = read_eval_text()
    assert "Produced by" in raw and "Produced by" not in text
    assert text.startswith("THE ADVENTURES OF SHERLOCK HOLMES")
    credits = [p for p in raw.split("\n\n") if p.startswith("Produced by")]
    assert len(credits) == 2 and "David Widger" in credits[1]
    # nothing else: the removed bytes are the two paragraphs and one separator each
    assert len(raw) - len(text) == sum(len(c) + 2 for c in credits)
    assert strip_gutenberg(text) == text


def test_document_masked_eval_equals_plain_eval_without_eos(tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    tokens = np.asarray(tokenizer.encode(EVAL_TEXT.read_text()[:3000]), dtype=np.uint16)
    lengths = token_byte_lengths(tokenizer)
    plain = evaluate_tokens(model, tokens, lengths, seq_len=64)
    masked = evaluate_tokens(model, tokens, lengths, seq_len=64, eos_id=tokenizer.eos_id)
    assert masked["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], rel=1e-5)
    with_eos = tokens.copy()
    with_eos[100] = tokenizer.eos_id  # now one window holds two documents
    masked = evaluate_tokens(model, with_eos, lengths, seq_len=64, eos_id=tokenizer.eos_id)
    plain = evaluate_tokens(model, with_eos, lengths, seq_len=64)
    assert masked["bits_per_byte"] != pytest.approx(plain["bits_per_byte"], rel=1e-6)
