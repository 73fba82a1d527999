"""Fixtures shared by the core's test modules (plugin authors' fixtures live in nvlcore.testing)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Two shared cores: torch's two OpenMP threads spin against other processes; one is much faster here.
    Modules that train use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
