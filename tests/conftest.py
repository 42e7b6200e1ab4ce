"""Shared pytest set-up: the repo root on sys.path and the fixtures several test modules use.

Builders and helper functions live in tests/helpers.py (test modules import from there, not from here).
"""

import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers import SHARED_DATA  # noqa: E402  (needs the root on sys.path)


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Small LAPACK calls on a shared 2-core machine stall badly with 2 OpenMP threads; 1 is fast and stable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
