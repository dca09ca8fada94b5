"""The python examples of docs/groundtruth.md run as written."""
from __future__ import annotations

from _docs import doc_path, python_blocks


def test_groundtruth_docs_examples_run(tmp_path, monkeypatch):
    doc = doc_path("docs/groundtruth.md")
    with open(doc) as f:
        blocks = python_blocks(f.read())
    assert blocks, "docs/groundtruth.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own documentation
