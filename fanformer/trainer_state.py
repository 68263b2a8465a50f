"""Training checkpoints: model + optimizer + schedule position + data position + RNG, no pickles.

A training checkpoint is a `step_NNNNNNNN` directory under `<out_dir>/checkpoints/`: the
model checkpoint that `fanformer.checkpoint.save_checkpoint` writes (fp32, so a resume is
exact), plus `optimizer.safetensors` (the optimizer's tensors, flattened to named tensors),
`rng.safetensors` (each rank's torch/CUDA generator states) and `trainer_state.json` (step,
samples seen, optimizer hyper-parameters, Python RNG, the arguments a resume must match).
The directory appears by an atomic rename, so a crash mid-save (even SIGKILL) leaves only a
dot-prefixed temporary directory, which `latest_checkpoint` never picks and
`remove_incomplete` deletes at the next start. Only the newest `keep` are kept; older ones are
renamed to a dot-prefixed name before they are deleted, for the same reason.
This module knows nothing about data or the training loop; `train.py` calls it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from fanformer.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    check_state,
    load_tokenizer,
    read_config,
    read_json,
    read_tensors,
    save_checkpoint,
)
from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer

STATE_FILE, RNG_FILE = "trainer_state.json", "rng.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for source in (tensors, rest["scalars"]):
        for name, value in source.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], list]:
    """This process's generator states: torch CPU (+ CUDA) as tensors, Python's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, list(random.getstate()[1])


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    random.setstate((3, tuple(python_state), None))


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def save_training_checkpoint(out_dir: str | Path, step: int, model: FANformer,
                             tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any], rank_rng: list[dict[str, torch.Tensor]],
                             keep: int) -> Path:
    """Write step `step` atomically, then delete all but the newest `keep` step directories.

    `rank_rng` holds one {"torch": ..., "cuda": ...} dict per data-parallel rank.
    """
    opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
    rng = {f"rank{r}.{k}": v.cpu() for r, d in enumerate(rank_rng) for k, v in d.items()}
    body = {**state, "step": step, "optimizer": opt_rest}
    target = save_checkpoint(step_dir(out_dir, step), model, tokenizer, extra_files={
        OPTIMIZER_FILE: save(opt_tensors), RNG_FILE: save(rng),
        STATE_FILE: json.dumps(body, indent=1) + "\n"})
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        # renamed first, so a kill mid-delete leaves a dot-prefixed leftover, never a
        # half-deleted directory under a checkpoint's name
        doomed = old.with_name(f".{old.name}.deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def remove_incomplete(out_dir: str | Path) -> list[Path]:
    """Delete what an interrupted save or rotation left in `<out_dir>/checkpoints` (the
    dot-prefixed temporaries); return what was removed. Rank 0 calls it before a run."""
    root = Path(out_dir) / "checkpoints"
    leftovers = sorted(root.glob(".step_*")) if root.is_dir() else []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete step directories, oldest first (temporaries start with a dot and never match)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def check_training_checkpoint(directory: Path) -> None:
    """Raise CheckpointError if any file of the checkpoint cannot be read back: the JSON
    files parse, the tokenizer loads, and each safetensors file's header matches its size
    (what a truncated or overwritten file fails). Reads headers, not the tensors."""
    read_training_state(directory)
    read_config(directory)
    load_tokenizer(directory)
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE):
        try:
            with safe_open(directory / name, framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{directory / name} is missing, truncated or corrupt "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                  ) from None


def read_training_state(directory: Path) -> dict[str, Any]:
    return read_json(directory, STATE_FILE)


def load_training_checkpoint(directory: Path, model: FANformer,
                             optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Load weights and optimizer state in place, restore this rank's RNG; return the state."""
    state = read_training_state(directory)
    if read_config(directory) != model.config:
        raise CheckpointError(f"{directory} was trained with a different model config")
    weights = read_tensors(directory)
    check_state(model, weights, directory / "model.safetensors")
    model.load_state_dict(weights, strict=False)
    try:
        opt_tensors = load((directory / OPTIMIZER_FILE).read_bytes())
        rng = load((directory / RNG_FILE).read_bytes())
    except Exception as e:
        raise CheckpointError(
            f"{directory} has an unreadable optimizer or RNG file ({e})") from None
    device = next(model.parameters()).device
    opt_tensors = {k: v.to(device) if not k.endswith(".step") else v
                   for k, v in opt_tensors.items()}
    optimizer.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
    restore_rng(mine, state["python_rng"][rank])
    return state
