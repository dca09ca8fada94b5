"""The Python examples in README.md run as written."""
import pathlib

import pytest

from _docs import doc_path, python_blocks

README = pathlib.Path(doc_path("README.md"))
BLOCKS = python_blocks(README.read_text())


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()
