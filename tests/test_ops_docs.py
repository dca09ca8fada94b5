"""The python examples of docs/ops.md run as written."""
from __future__ import annotations

import os
import re

import torch

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "ops.md")


def test_python_examples_run():
    with open(DOC) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "docs/ops.md has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, DOC, "exec"), namespace)  # noqa: S102 - our own documentation
    # the first example ends with a backward through the fused loss
    assert isinstance(namespace.get("logits"), torch.Tensor) and namespace["logits"].grad is not None
