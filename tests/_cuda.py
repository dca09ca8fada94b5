"""What a CUDA test does when the CUDA path it checks is not there.

Without a GPU the CUDA tests are skipped, and pytest reports them as skipped. On the GPU machine
``benchmarks/gpu_check`` sets ``IAERF_REQUIRE_CUDA=1``: then a missing GPU, a missing CUDA kernel or any other
fallback to a non-CUDA implementation is a test failure, so a run that exercised nothing cannot come back green.
"""
from __future__ import annotations

import os

import pytest
import torch

REQUIRE_CUDA = os.environ.get("IAERF_REQUIRE_CUDA", "0") == "1"

# Marks a test that needs a CUDA device: skipped without one, except under IAERF_REQUIRE_CUDA=1, where the test
# runs and fails on its first CUDA call.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRE_CUDA, reason="needs a CUDA GPU")


def cuda_path_missing(what: str) -> None:
    """Call where a CUDA test would otherwise fall back silently: fails under IAERF_REQUIRE_CUDA=1, else skips."""
    if REQUIRE_CUDA:
        pytest.fail(f"IAERF_REQUIRE_CUDA=1 but {what}")
    pytest.skip(what)
