"""Fixtures of every recipe test."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Recipes run tiny models here: their ops are too small for intra-op threads, which on a shared machine only slow
    them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
