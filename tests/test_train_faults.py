"""SIGKILL of fanformer-train, at chosen points inside a checkpoint save and at random
moments, then `--resume`: each kill loses at most the steps since the last complete
checkpoint, no incomplete checkpoint is ever picked up, and the run that finishes after all
the kills is the uninterrupted run (same losses, same weights).

The chosen points are injected by a small runner (RUNNER below) that starts the real
`fanformer.train.main` in a subprocess after wrapping one function so the process SIGKILLs
itself at that point: halfway through writing `model.safetensors`, just before the atomic
rename, and halfway through deleting a rotated-out checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fanformer import trainer_state as ts
from fanformer.checkpoint import load_checkpoint
from fanformer.train import main
from tests.test_train import common, losses

RUNNER = r"""
import os, shutil, signal, sys, time
from pathlib import Path

import fanformer.checkpoint as checkpoint
import fanformer.trainer as trainer
from fanformer.train import main

fault, _, step = os.environ["FAULT"].partition(":")
name = f"step_{int(step or 0):08d}"


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_save_file, real_replace, real_rmtree = checkpoint.save_file, os.replace, shutil.rmtree


def save_file(tensors, path, metadata=None):  # the weights file, inside the temporary dir
    real_save_file(tensors, path, metadata=metadata)
    if fault == "write" and f".{name}.tmp-" in path:
        os.truncate(path, os.path.getsize(path) // 2)
        die()


def replace(src, dst):
    if fault == "rename" and Path(dst).name == name:
        die()
    return real_replace(src, dst)


def rmtree(path, *args, **kwargs):
    if fault == "rotate" and Path(path).name.startswith(f".{name}.deleting"):
        next(p for p in Path(path).iterdir() if p.suffix == ".safetensors").unlink()
        die()
    return real_rmtree(path, *args, **kwargs)


checkpoint.save_file, os.replace, shutil.rmtree = save_file, replace, rmtree
if fault == "slow":  # room for random kills to land anywhere, saves included
    step_once = trainer.Trainer.train_step
    trainer.Trainer.train_step = lambda self: (time.sleep(0.05), step_once(self))[1]
sys.exit(main(sys.argv[1:]))
"""

STEPS = 16


def flags(tokenizer_file: str, out_dir: Path, *extra: str) -> list[str]:
    args = common(tokenizer_file, out_dir, "--save_every", "2", "--keep_last", "2", *extra)
    args[args.index("--max_steps") + 1] = str(STEPS)
    return args


def start(args: list[str], fault: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], text=True,
                            env={**os.environ, "FAULT": fault, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def step_of(path: Path | None) -> int:
    return int(path.name.removeprefix("step_")) if path is not None else 0


def assert_every_checkpoint_loads(out_dir: Path) -> None:
    for directory in ts.list_checkpoints(out_dir):
        load_checkpoint(directory)
        assert ts.read_training_state(directory)["step"] == step_of(directory)


def leftovers(out_dir: Path) -> list[str]:
    root = out_dir / "checkpoints"
    return [p.name for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []


def starts_logged(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return path.read_text().count('"event": "start"') if path.is_file() else 0


def kill_at_random_moments(out: Path, args: list[str], kills: int, seed: int) -> dict[str, int]:
    """SIGKILL `kills` resumed runs at random moments after their start; -> where they landed
    (judged by what each kill left behind)."""
    rng, landed = random.Random(seed), {"in a save": 0, "in a rotation": 0, "elsewhere": 0}
    for _ in range(kills):
        before = step_of(ts.latest_checkpoint(out))
        starts = starts_logged(out)
        proc = start(args, "slow")
        deadline = time.monotonic() + 60
        while starts_logged(out) == starts and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        left = leftovers(out)
        landed["in a save" if any(".tmp-" in n for n in left) else
               "in a rotation" if left else "elsewhere"] += 1
        assert step_of(ts.latest_checkpoint(out)) >= before  # a kill never goes backwards
        assert_every_checkpoint_loads(out)
    return landed


def finish_and_compare(out: Path, straight: Path, args: list[str], steps: int) -> None:
    """Resume once more without faults: the result is the uninterrupted run's."""
    proc = start(args, "none")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert not leftovers(out)
    assert sorted(losses(out)) == list(range(1, steps + 1))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)
    final = f"checkpoints/step_{steps:08d}"
    a, b = load_checkpoint(straight / final)[0], load_checkpoint(out / final)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


def test_sigkill_and_resume_loses_nothing_after_the_last_checkpoint(tmp_path, tokenizer_file):
    out, straight = tmp_path / "killed", tmp_path / "straight"
    assert main(flags(tokenizer_file, straight)) == 0
    chosen = [  # (fault, resume?, latest complete checkpoint after the kill, leftover)
        ("write:4", False, 2, ".step_00000004.tmp-"),  # half the weights written
        ("rename:6", True, 4, ".step_00000006.tmp-"),  # all written, not yet renamed
        ("rotate:4", True, 8, ".step_00000004.deleting"),  # 8 saved, 4 half deleted
    ]
    for fault, resume, latest, leftover in chosen:
        proc = start(flags(tokenizer_file, out, *(["--resume"] if resume else [])), fault)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        assert step_of(ts.latest_checkpoint(out)) == latest, fault
        assert any(name.startswith(leftover) for name in leftovers(out))
        if fault.startswith("rotate"):  # never a half-deleted dir under a checkpoint's name
            assert not (out / "checkpoints" / "step_00000004").exists()
        assert_every_checkpoint_loads(out)
    resume = flags(tokenizer_file, out, "--resume")
    kill_at_random_moments(out, resume, kills=3, seed=0)
    finish_and_compare(out, straight, resume, STEPS)


@pytest.mark.slow
def test_many_random_sigkills(tmp_path, tokenizer_file):
    """The long version (not in CI): 30 kills at random moments of a 200-step run."""
    steps, out, straight = 200, tmp_path / "killed", tmp_path / "straight"
    args = [*flags(tokenizer_file, straight)]
    args[args.index("--max_steps") + 1] = str(steps)
    assert main(args) == 0
    resume = [*flags(tokenizer_file, out, "--resume")]
    resume[resume.index("--max_steps") + 1] = str(steps)
    landed = kill_at_random_moments(out, resume, kills=30, seed=int(time.time()))
    print(f"30 random SIGKILLs landed: {landed}")
    finish_and_compare(out, straight, resume, steps)
