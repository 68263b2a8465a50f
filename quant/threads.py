"""Big kernels on every thread, the small ops between them on one.

Under `OMP_WAIT_POLICY=PASSIVE` (what fanformer-serve sets) an idle OpenMP worker sleeps, and
every aten op big enough to split (32k elements and more) wakes it with a futex: tens of
microseconds. An eager step of ~100 tokens is hundreds of such ops (norms, RoPE, residuals,
SwiGLU) around its GEMMs, and the wake-ups cost more than the second thread saves on them
(docs/ENGINE.md "Threads"). Inside `small_ops_on_one_thread(n)` torch runs on one thread
except within `all_threads()`, which the linears and the attention kernel enter around their
kernel. Elementwise ops and row reductions compute each element the same way on any number
of threads, so the bits do not change.
"""

from __future__ import annotations

import contextlib

import torch

_threads = 0  # inside small_ops_on_one_thread: the count all_threads() restores


@contextlib.contextmanager
def small_ops_on_one_thread(threads: int):
    """Within: torch on one thread, `all_threads()` blocks on `threads`."""
    global _threads
    saved, _threads = _threads, threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _threads = saved
        torch.set_num_threads(threads)


@contextlib.contextmanager
def all_threads():
    """Within: every thread (a no-op outside `small_ops_on_one_thread`)."""
    if not _threads:
        yield
        return
    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
