"""The python examples of the project's markdown files, for the tests that run them as written."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def doc_path(name: str) -> str:
    """The path of ``name`` (e.g. ``"docs/ops.md"``) in this checkout."""
    return str(REPO / name)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)
