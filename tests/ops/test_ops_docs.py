"""The python examples of docs/ops.md run as written."""
from __future__ import annotations


import torch

from _docs import doc_path, python_blocks

DOC = doc_path("docs/ops.md")


def test_python_examples_run():
    with open(DOC) as f:
        blocks = python_blocks(f.read())
    assert blocks, "docs/ops.md has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, DOC, "exec"), namespace)  # noqa: S102 - our own documentation
    # the first example ends with a backward through the fused loss
    assert isinstance(namespace.get("logits"), torch.Tensor) and namespace["logits"].grad is not None
