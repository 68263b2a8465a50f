"""quant/threads.py: small ops on one thread, the kernels on all; the bits do not change."""

from __future__ import annotations

import pytest
import torch

from quant.threads import all_threads, small_ops_on_one_thread
from server.cpu_linear import use_cpu_linears
from tests.conftest import make_model


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_one_thread_inside_all_threads_within_the_kernels(two_threads):
    with all_threads():  # outside the context: nothing changes
        assert torch.get_num_threads() == 2
    with small_ops_on_one_thread(2):
        assert torch.get_num_threads() == 1
        with all_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_a_forward_gives_the_same_bits_with_its_small_ops_on_one_thread(two_threads):
    """Big enough that aten splits the elementwise ops over both threads (> 32k elements):
    each element and each row's reduction is computed the same way on one thread."""
    model = make_model(d_ff=256).to(torch.bfloat16)
    use_cpu_linears(model)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator()
                        .manual_seed(0))
    with torch.inference_mode():
        want = model(ids)
        with small_ops_on_one_thread(2):
            got = model(ids)
    assert torch.equal(got, want)
