"""Tokenizer round-trips and HF compatibility; checkpoints save/load exactly and fail clearly."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from fanformer.checkpoint import (
    CheckpointError,
    atomic_directory,
    load_checkpoint,
    save_checkpoint,
)
from fanformer.tokenizer import CHAT_TEMPLATE, Tokenizer
from tests.conftest import make_model

TRICKY = [
    "plain ascii",
    "accents: café, naïve, Ångström, ß",
    "emoji 🎉👩‍👩‍👧‍👦 and flags 🇺🇦",
    "CJK 日本語の文章 한국어 中文",
    "  leading spaces\ttabs\r\nwindows lines\n\n",
    "special <|endoftext|> inside <|im_start|>",
    "\u200b zero width, combining e\u0301, rtl שלום",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_and_save_load(tokenizer, tmp_path):
    assert len({tokenizer.eos_id, tokenizer.im_start_id, tokenizer.im_end_id}) == 3
    tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(TRICKY[2]) == tokenizer.encode(TRICKY[2])
    assert again.vocab_size == tokenizer.vocab_size == 512


def test_loads_in_transformers_unchanged(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for text in TRICKY:
        assert hf.encode(text) == tokenizer.encode(text)
        assert hf.decode(tokenizer.encode(text)) == text
    assert hf.eos_token_id == tokenizer.eos_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == tokenizer.apply_chat_template(messages)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] \
        == CHAT_TEMPLATE


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        Tokenizer.train(["abc"], 100)


def test_save_load_gives_identical_logits(checkpoint_dir, model):
    loaded, tok = load_checkpoint(checkpoint_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.embed.weight and not loaded.training
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [
        "config.json", "configuration_fanformer.py", "model.safetensors",
        "modeling_fanformer.py", "tokenizer.json", "tokenizer_config.json"]


def test_bf16_save(tmp_path, tokenizer, model):
    path = save_checkpoint(tmp_path / "bf16", model, tokenizer, dtype=torch.bfloat16)
    loaded, _ = load_checkpoint(path)
    assert loaded.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is truncated or corrupt"),
    (lambda d: _edit_config(d, format_version=99), "format_version 99"),
    (lambda d: _edit_config(d, format_version=1, model={"d_model": 64, "bogus": 1}),
     "unknown ModelConfig keys"),
    (lambda d: _edit_config(d, d_model=None), "lacks the model fields \\['d_model'\\]"),
    (lambda d: _edit_config(d, n_layers=3), "does not match its config.json: missing"),
    (lambda d: _edit_config(d, d_ff=96), "does not match its config.json: .* has shape"),
])
def test_damaged_checkpoints_fail_with_one_clear_sentence(checkpoint_dir, damage, message):
    damage(checkpoint_dir)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(checkpoint_dir)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_atomic_save_leaves_the_old_checkpoint_on_failure(checkpoint_dir, tokenizer):
    before = (checkpoint_dir / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_directory(checkpoint_dir) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert (checkpoint_dir / "model.safetensors").read_bytes() == before
    assert [p.name for p in checkpoint_dir.parent.iterdir()] == ["ckpt"]
    save_checkpoint(checkpoint_dir, make_model(seed=1), tokenizer)  # overwrite works
    assert (checkpoint_dir / "model.safetensors").read_bytes() != before


def test_a_saved_checkpoint_is_readable_under_the_umask_like_any_file(tmp_path, tokenizer):
    """Not mkdtemp's 0700 nor safetensors' 0600: a server running as another user (or a
    container) must be able to read an export when the umask lets it."""
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt", make_model(), tokenizer)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(d, **changes):
    """Set keys of config.json; a value of None deletes the key."""
    body = json.loads((d / "config.json").read_text())
    body.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in body.items() if v is not None}))


def test_export_does_not_copy_the_source_output_marker(tmp_path, checkpoint_dir):
    from fanformer.checkpoint import export_checkpoint
    from fanformer.outputs import MARKER, write_marker, written_by

    write_marker(checkpoint_dir, "fanformer-quantize")
    out = export_checkpoint(checkpoint_dir, tmp_path / "exported")
    assert not (out / MARKER).exists() and written_by(out) is None
    assert (out / "model.safetensors").read_bytes() == (
        checkpoint_dir / "model.safetensors").read_bytes()
