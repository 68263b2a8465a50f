"""Byte-level BPE tokenizer on the `tokenizers` library, with end-of-text and chat tokens.

Byte-level BPE maps any UTF-8 text to tokens and back losslessly (emoji, CJK, accents).
A tokenizer is saved as `tokenizer.json` (the `tokenizers` format, loadable unchanged by
`transformers.PreTrainedTokenizerFast`) plus `tokenizer_config.json`, which carries the
special tokens and the chat template so that Hugging Face tools apply the same template.
This module knows nothing about models or serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

# ChatML, as Jinja for Hugging Face tools; `Tokenizer.apply_chat_template` renders the same.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A thin wrapper: ids in and out, the special ids, save/load, and the chat template."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eos_id: int = backend.token_to_id(EOS_TOKEN)
        self.im_start_id: int = backend.token_to_id(IM_START)
        self.im_end_id: int = backend.token_to_id(IM_END)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        return {self.eos_id, self.im_start_id, self.im_end_id}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """ChatML text for `messages` ({"role", "content"} dicts); same as CHAT_TEMPLATE."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    # ---- persistence ----
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        hf_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
            "bos_token": None,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a `tokenizer.json` file or a directory that holds one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        return cls(HFTokenizer.from_file(str(file)))

    # ---- training ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def train_from_files(cls, files: Sequence[str | Path], vocab_size: int,
                         show_progress: bool = True) -> Tokenizer:
        def lines() -> Iterable[str]:
            for file in files:
                with open(file, encoding="utf-8", errors="replace") as f:
                    yield from f
        return cls.train(lines(), vocab_size, show_progress=show_progress)
