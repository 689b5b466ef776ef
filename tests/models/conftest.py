"""Shared fixtures of the model tests."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch's intra-op threads spin-wait; on a small shared CPU box (2 cores, JAX running
    too) one thread is ~10x faster for these tiny reference forwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
