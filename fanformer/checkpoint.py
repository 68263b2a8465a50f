"""Self-describing checkpoint directories, written atomically, loaded with clear errors.

A checkpoint is a directory holding `config.json` (format version + model config),
`model.safetensors`, `tokenizer.json` (+ `tokenizer_config.json`), and `quant_config.json`
when the `quant` package wrote it. No pickles. Every directory is also a Hugging Face model
folder: config.json is flat and HF-style (model_type, architectures, auto_map, torch_dtype,
token ids, our ModelConfig fields at the top level), and the remote code of `fanformer/hf/`
is written beside it, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
loads it (docs/HF.md). Format 1 (fields nested under "model") is still read. Saving writes
a temporary sibling directory and renames it into place, so a crash never leaves half a
checkpoint under the real name.
Loading a missing, truncated or mismatched checkpoint raises `CheckpointError` with one
sentence naming the file and the problem. This module does not know how to load quantized
weights: `quant` builds on `read_config`/`read_tensors` for that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fanformer import hf
from fanformer.config import VOCAB_MULTIPLE, ModelConfig, field_names
from fanformer.model import FANformer
from fanformer.outputs import MARKER
from fanformer.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 1: ModelConfig nested under "model" (still read); 2: flat, HF-style
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
QUANT_CONFIG_FILE = "quant_config.json"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo"


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; the message is one sentence for the user."""


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` by rename.

    On an exception the temporary directory is removed and `target` is left untouched.
    The result gets the modes a plain `mkdir` and `open` would give under the umask
    (mkdtemp makes 0700, safetensors writes 0600), so another account that may read the
    parent folder (a server's user, a container) may read the checkpoint too.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for file in tmp.iterdir():  # make the contents durable before the rename
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tensor tied to an earlier key (the LM head) is dropped."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor
    return state


def write_config(directory: Path, config: ModelConfig, tokenizer: Tokenizer,
                 dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = True,
                 **extra: Any) -> None:
    """Write config.json and the HF remote code (configuration/modeling_fanformer.py).

    `dtype` is what the weights are stored in (HF's torch_dtype); `tie_word_embeddings`
    is False when the LM head is stored on its own (a quantized head). `extra` adds keys
    such as `metadata` or `quantization_config`. End-of-text is also BOS and padding: our
    tokenizer has no BOS, and training separates documents with EOS (as GPT-2 does).
    """
    body = {"format_version": FORMAT_VERSION, "model_type": "fanformer",
            "architectures": hf.ARCHITECTURES, "auto_map": hf.AUTO_MAP,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.eos_id, "tie_word_embeddings": tie_word_embeddings,
            "vocab_multiple": VOCAB_MULTIPLE, **config.to_dict()}
    clash = sorted(set(body) & set(extra))
    if clash:
        raise ValueError(f"write_config: {clash} are written from the model, not from extra")
    body.update(extra)
    (directory / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n")
    for name in hf.REMOTE_CODE_FILES:
        shutil.copyfile(hf.SOURCE_DIR / name, directory / name)


def save_checkpoint(directory: str | Path, model: FANformer, tokenizer: Tokenizer,
                    dtype: torch.dtype | None = None, metadata: dict[str, Any] | None = None,
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write model + tokenizer (+ any `extra_files`) atomically to `directory`."""
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(tmp)
        write_config(tmp, model.config, tokenizer, state["embed.weight"].dtype,
                     metadata=metadata or {})
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return Path(directory)


def export_checkpoint(source: str | Path, output: str | Path) -> Path:
    """Write `source` (format 1 or 2, plain or quantized) to a new directory `output` in the
    current format: config.json rewritten, remote code added, every other file of `source`
    copied byte for byte (the weights stay bit-identical). Keys of the old config.json that
    are not model fields (metadata, quantization_config, ...) are carried over."""
    source, output = Path(source), Path(output)
    config, tokenizer = read_config(source), load_tokenizer(source)
    if output.exists():
        raise CheckpointError(f"{output} already exists; choose a new directory")
    body = read_json(source, CONFIG_FILE)
    with safe_open(str(source / WEIGHTS_FILE), "pt") as f:
        dtype = f.get_slice("embed.weight").get_dtype()
        tied = not any(name.startswith("lm_head.") for name in f.keys())
    ours = {"format_version", "model", "model_type", "architectures", "auto_map",
            "torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings", "vocab_multiple", "transformers_version", *field_names()}
    extra = {k: v for k, v in body.items() if k not in ours}
    with atomic_directory(output) as tmp:
        for file in source.iterdir():  # not the source's marker: it names the source's writer
            if file.is_file() and file.name not in (CONFIG_FILE, MARKER):
                shutil.copyfile(file, tmp / file.name)
        write_config(tmp, config, tokenizer, _SAFETENSORS_DTYPES[dtype], tied, **extra)
    return output


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_json(directory: str | Path, name: str) -> dict[str, Any]:
    path = Path(directory) / name
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this is not a complete checkpoint directory")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint in format 2 (flat, HF-style) or 1 (nested "model")."""
    body = read_json(directory, CONFIG_FILE)
    path = Path(directory) / CONFIG_FILE
    version = body.get("format_version")
    if version == 1:
        fields = body.get("model")
    elif version == FORMAT_VERSION:
        missing = [name for name in field_names() if name not in body]
        if missing:
            raise CheckpointError(f"{path} lacks the model fields {missing}")
        # the other top-level keys belong to transformers (auto_map, token ids, ...)
        fields = {name: body[name] for name in field_names()}
    else:
        raise CheckpointError(
            f"{path} has format_version {version!r}; "
            f"this version of fanformer reads 1 and {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config ({e})") from None


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this is not a complete checkpoint directory")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this is not a complete checkpoint directory")
    try:
        return Tokenizer.load(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid tokenizer ({e})") from None


def is_quantized(directory: str | Path) -> bool:
    return (Path(directory) / QUANT_CONFIG_FILE).is_file()


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise a CheckpointError if `state` does not fit `model` (names and shapes)."""
    expected = {k: v.shape for k, v in unique_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config.json: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{path} does not match its config.json: {name} has shape "
                f"{tuple(state[name].shape)} but the config needs {tuple(shape)}")


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[FANformer, Tokenizer]:
    """Load a plain (unquantized) checkpoint; the model comes back in eval mode."""
    directory = Path(directory)
    if is_quantized(directory):
        raise CheckpointError(
            f"{directory} is a quantized checkpoint ({QUANT_CONFIG_FILE}); "
            "load it with quant.load_quantized_checkpoint")
    config = read_config(directory)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but "
            f"config.json's vocab_size is {config.vocab_size}")
    state = read_tensors(directory)
    model = build_empty_model(config)
    check_state(model, state, directory / WEIGHTS_FILE)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    finish_loading(model, device)
    return model, tokenizer


def build_empty_model(config: ModelConfig) -> FANformer:
    """The model on the meta device: no memory, no init, ready for `assign=True` loading."""
    with torch.device("meta"):
        return FANformer(config)


def finish_loading(model: FANformer, device: str | torch.device) -> FANformer:
    """Re-tie the head, rebuild the non-persistent RoPE table, move to `device`, eval mode."""
    if isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.embed.weight
    model.reset_buffers(device)
    return model.to(device).eval()
