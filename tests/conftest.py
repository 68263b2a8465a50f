"""Shared fixtures: tiny random models, a tokenizer trained in-process on a committed text, and
the devices the relational tests run on (CUDA skipped, visibly, where there is none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fanformer.config import ModelConfig
from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer
from quant import native_cpu

FIXTURES = Path(__file__).parent / "fixtures"

#: The devices a relational test (engine == reference, alone == batched, quantized ==
#: dequantized reference) runs on. The CUDA case is always collected, so a machine without
#: a GPU reports it as "SKIPPED ... no CUDA device" instead of silently running less;
#: `pytest -k cuda` selects exactly the CUDA cases (bench/gpu_check.py runs them).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu" or "cuda": build the model, the reference and the engine on it."""
    return request.param


@pytest.fixture(params=list(native_cpu.ISAS))
def native_build(request):
    """Each build of the native CPU kernels (quant/native_cpu.py) that this CPU runs, loaded
    (an AVX-512 machine runs both); skipped where it does not run."""
    if not native_cpu.ISAS[request.param][1] <= native_cpu.cpu_flags() or \
            native_cpu.library() is None:
        pytest.skip(f"the {request.param} build does not run here")
    return native_cpu.load(request.param)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A 512-token byte-level BPE trained on Alice in Wonderland (takes ~50 ms)."""
    return Tokenizer.train_from_files([FIXTURES / "tiny.txt"], 512, show_progress=False)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, tokenizer) -> str:
    """The `tokenizer` fixture saved, for `fanformer-train --tokenizer`."""
    directory = tmp_path_factory.mktemp("tok")
    tokenizer.save(directory)
    return str(directory / "tokenizer.json")


def make_model(preset: str = "test", seed: int = 0, **overrides) -> FANformer:
    torch.manual_seed(seed)
    return FANformer(ModelConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture
def model() -> FANformer:
    return make_model()


@pytest.fixture
def checkpoint_dir(tmp_path, tokenizer, model) -> Path:
    from fanformer.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "ckpt", model, tokenizer)
