"""Atomic file writes: nothing on disk is ever left half-written.

Every file iaerf writes (caches, checkpoints, run directories, reports) goes through :func:`atomic_write`: the
content is written to a temporary file in the destination folder and moved into place with ``os.replace``, which
is atomic on POSIX file systems, so an interrupted write leaves the previous version intact.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """Create or replace ``path`` by calling ``writer(tmp_path)`` on a temporary file beside it, then renaming."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Atomically write ``text`` to ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
