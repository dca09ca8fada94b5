"""Test-wide setup: Triton kernels run under TRITON_INTERPRET=1 on CPU tensors when there is no GPU.

The variable must be set before triton is first imported, hence here, before any test module is collected.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems: a second thread only adds synchronisation there
    (10x slower on a loaded 2-core box). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

