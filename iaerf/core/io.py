"""Atomic file writes (nothing on disk is ever left half-written) and an early writability check for output folders.

Every file iaerf writes (caches, checkpoints, run directories, reports) goes through :func:`atomic_write`: the
content is written to a temporary file in the destination folder and moved into place with ``os.replace``, which
is atomic on POSIX file systems, so an interrupted write leaves the previous version intact. The file gets the mode
an ordinary ``open(path, "w")`` would give it (``0o666`` less the umask), so shared caches and run directories stay
readable by whoever the umask admits.

JSON goes through :func:`write_json` / :func:`read_json` (run directories, stage markers, cache settings), and
every settings key -- a pipeline stage's and an influence cache entry's -- is :func:`settings_key` of the
:func:`canonical_json` of its inputs, and tensor files are read with :func:`load_tensor_file`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Callable

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "settings_key", "canonical_json", "ensure_writable_dir",
           "load_tensor_file", "first_sentence"]

_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask`` can only be read by setting it, which for a moment gives every other thread's new files the
    temporary value; Linux reports it in /proc/self/status instead, so the set-and-restore is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """Create or replace ``path`` by calling ``writer(tmp_path)`` on a temporary file beside it, then renaming.

    The file ends with mode ``0o666 & ~umask`` (``mkstemp`` creates it ``0o600`` whatever the umask).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
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


def _json_default(o):
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str, obj) -> None:
    """Atomically write ``obj`` as indented JSON with sorted keys and a final newline (tensors become lists).

    Raises TypeError for a value JSON cannot hold, before anything is written.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_text(path, text)


def read_json(path: str, keys: tuple[str, ...] | None = None):
    """The JSON value in ``path``; with ``keys``, it must be an object holding them. A damaged file is a ValueError
    naming the file (json's own "Expecting value" does not)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is damaged: not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once per nesting level, so a deep enough file exhausts the stack
        raise ValueError(f"{path} is damaged: its JSON is nested too deeply to read") from None
    if keys is not None:
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is damaged: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ValueError(f"{path} is damaged: missing keys {missing}")
    return obj


def canonical_json(settings) -> str:
    """One-line JSON of ``settings`` with sorted keys: the identity of a stage's or a cache entry's inputs.

    Tensors become lists; any other value JSON cannot hold (a path, a dtype) becomes its ``str``, so a key can
    always be formed.
    """
    return json.dumps(settings, sort_keys=True, default=_key_default)


def _key_default(o):
    try:
        return _json_default(o)
    except TypeError:
        return str(o)


def settings_key(settings, length: int = 32) -> str:
    """The first ``length`` hex digits of the SHA-256 of :func:`canonical_json` ``(settings)``."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:length]


def ensure_writable_dir(path: str | os.PathLike, what: str) -> str:
    """Create the folder ``path`` if needed and check that a file can be created in it; returns ``os.fspath(path)``.

    Call it before any long computation whose results go to ``path``, so that an unwritable folder fails at once
    instead of after the work is done. ``what`` names the setting in the error (e.g. ``"cache_dir"``). Raises the
    ``OSError`` subclass the file system gave (``PermissionError``, ``NotADirectoryError``, ...), with a message
    naming ``what`` and ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what}={path!r} exists and is not a folder; pass a folder path")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        message = f"{what}={path!r} is not a writable folder ({exc.strerror or exc}); pass a folder you can write to"
        raise (type(exc)(exc.errno, message) if exc.errno is not None else type(exc)(message)) from exc
    return path


def load_tensor_file(path: str, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU, with any failure turned into one ``ValueError`` naming
    ``what`` and ``path``.

    ``weights_only=True`` admits only tensors and plain containers, so a crafted file cannot run code. torch's own
    message for a refused file advises ``weights_only=False``, which would run whatever the file holds, so only the
    reason is kept from it.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise  # the file could not be opened: its own message names it
    except Exception as exc:  # a damaged file can fail anywhere in torch's reader
        if isinstance(exc, pickle.UnpicklingError):
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln
                     and not ln.startswith("Check the documentation")]
            reason = lines[0] if lines else "not a torch.save file of tensors and plain containers"
            raise ValueError(f"cannot read {what} {path}: it is damaged or holds objects other than tensors and "
                             f"plain containers, which iaerf refuses to load ({reason})") from None
        raise ValueError(f"cannot read {what} {path}: damaged or not a torch.save file "
                         f"({type(exc).__name__}: {first_sentence(exc)})") from exc


def first_sentence(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message (at most 200 characters): readers of damaged files tend to follow
    the reason with advice to load the file unsafely, which iaerf must not pass on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:200]


