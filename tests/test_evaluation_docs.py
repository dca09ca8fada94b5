"""The python examples of docs/evaluation.md run as written."""
from __future__ import annotations

import os
import re


def test_evaluation_docs_examples_run(tmp_path, monkeypatch):
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "evaluation.md")
    with open(doc) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "docs/evaluation.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation
