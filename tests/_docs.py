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


def section_python_blocks(name: str, heading: str) -> list[str]:
    """The python blocks of the ``## heading`` section of markdown file ``name`` (up to the next ``## ``), so that
    each section's example is run by the test of what it documents; fails when the section or its example is gone."""
    with open(doc_path(name)) as f:
        text = f.read()
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, f"{name} has no '## {heading}' section"
    blocks = python_blocks(section.group(1))
    assert blocks, f"the '## {heading}' section of {name} has no python example"
    return blocks
