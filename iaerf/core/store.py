"""Every result iaerf stores and later trusts, in one place: each carries the SHA-256 of its content and the
settings it was computed under, and is checked against both on every read (a damaged or stale entry is a warning
naming the file and a recompute, never a wrong answer).

- :func:`save_checked` / :func:`load_checked`: one torch file with the digest of its content (run-directory
  checkpoints and vectors, LiSSA checkpoints, results-folder units); read with ``torch.load(weights_only=True)``,
  so no code runs from a file.
- :class:`ResultCache`: a cache folder of settings-keyed tensor entries (influence results, inverse-HVP solutions,
  K-FAC factors). An entry is ``<cache_dir>/<stage>-<key>.safetensors`` (the tensors, with the settings they were
  computed under and their SHA-256 in the file's metadata: safetensors has no checksum of its own) plus
  ``<stage>-<key>.json`` (the same settings in readable form, never read back); ``key`` is the SHA-256 of the
  settings, so an entry is reused only when the model's parameters and buffers, the data and every setting match.
  A cache folder may be shared or edited by hand: an entry is returned only when the file parses, records exactly
  this entry's settings, holds the expected tensors with the expected shape and dtype and only finite values, and
  their bytes match the recorded SHA-256.
- :class:`ResultsFolder`: one evaluation's resumable folder (``out_dir``)::

    settings.json        what the evaluation depends on and its SHA-256 (written first, atomically)
    units/<name>.pt      one finished unit (a PBRF chunk, one subset re-training): a dict of tensors, with the
                         folder's settings key, the unit's name and a SHA-256 of all three
    results.json         the evaluation's summary (written last; never read back)

  A rerun with the same settings reads the finished units back, so an interrupted evaluation resumes where it
  stopped; a rerun with different settings raises :class:`SettingsMismatchError` (``rerun=True`` discards the
  stored units). A damaged unit is recomputed and overwritten, a damaged settings.json discards every unit.

Every write is atomic (:func:`iaerf.core.io.atomic_write`): an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iaerf.core.identity import state_digest
from iaerf.core.io import (atomic_write, canonical_json, ensure_writable_dir, load_tensor_file, read_json, settings_key,
                           write_json)

__all__ = ["save_checked", "load_checked", "ResultCache", "ResultsFolder", "SettingsMismatchError"]

_CHECKSUM_KEY = "sha256"


def save_checked(path: str, state: dict) -> None:
    """Atomically ``torch.save`` the dict ``state`` (tensors and plain values, nested) with the SHA-256 of its
    content (:func:`iaerf.core.identity.state_digest`) under the key ``"sha256"``: ``torch.load`` does not check the
    zip CRCs, so a flipped bit in a tensor would otherwise load as a valid value. Read it with :func:`load_checked`.
    """
    import torch

    if _CHECKSUM_KEY in state:
        raise ValueError(f"state may not hold the key {_CHECKSUM_KEY!r}: it is the checksum's")
    sealed = {**state, _CHECKSUM_KEY: state_digest(state)}

    def write(tmp: str) -> None:
        # through a file object: the archive's inner folder is then "archive" rather than the temporary file's
        # random name, so equal content gives equal bytes (a resumed run's outputs match an uninterrupted one's)
        with open(tmp, "wb") as f:
            torch.save(sealed, f)

    atomic_write(path, write)


def load_checked(path: str, what: str) -> dict:
    """The dict :func:`save_checked` wrote at ``path`` (without its checksum), read by :func:`load_tensor_file`.
    Raises a ``ValueError`` naming ``what`` and ``path`` when the file cannot be read or its content does not match
    the checksum it records (a damaged file, or one not written by :func:`save_checked`)."""
    state = load_tensor_file(path, what)
    stored = state.pop(_CHECKSUM_KEY, None) if isinstance(state, dict) else None
    if stored is None:
        raise ValueError(f"{what} {path} is damaged or was not written by this iaerf version: it records no checksum")
    if stored != state_digest(state):
        raise ValueError(f"{what} {path} is damaged: its content does not match the checksum it records")
    return state


_SETTINGS_METADATA = "iaerf_settings"
_CHECKSUM_METADATA = "iaerf_sha256"


class ResultCache:
    """Load / store named tensors for one settings dict under ``cache_dir`` (no-op when ``cache_dir`` is None).

    A given ``cache_dir`` is created if needed and must be writable (checked here, before any work is done).
    """

    def __init__(self, cache_dir: str | os.PathLike | None, stage: str, settings: dict):
        self.settings = settings
        self.key = settings_key(settings)
        self.stage = stage
        self.dir = None if cache_dir is None else ensure_writable_dir(cache_dir, "cache_dir")

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def path(self, suffix: str) -> str:
        return os.path.join(self.dir, f"{self.stage}-{self.key}{suffix}")

    def load(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None when there is no valid entry.

        ``expected`` maps every tensor name the entry must hold (and no other) to its ``(shape, dtype)``. An entry
        that fails any check (unreadable, settings other than this key's, other names, tensors other than its
        checksum's, shapes or dtypes, non-finite values) gives a warning naming the file and None, so that the
        caller recomputes and overwrites it.
        """
        if not self.enabled:
            return None
        path = self.path(".safetensors")
        if not os.path.exists(path):
            return None
        tensors, problem = self._read(path, expected)
        if problem is not None:
            warnings.warn(f"influence cache entry {path} is damaged or stale ({problem}); recomputing it, the entry "
                          f"will be overwritten", RuntimeWarning, stacklevel=2)
        return tensors

    def _read(self, path: str, expected) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                names = set(f.keys())
                if metadata.get(_SETTINGS_METADATA) != canonical_json(self.settings):
                    return None, ("it records no settings" if _SETTINGS_METADATA not in metadata
                                  else "the settings it records are not this entry's settings")
                if names != set(expected):
                    return None, f"it holds tensors {sorted(names)}, expected {sorted(expected)}"
                tensors = {name: f.get_tensor(name) for name in expected}
        except Exception as exc:  # safetensors raises SafetensorError, OSError or others on a damaged file
            return None, f"not a readable safetensors file: {type(exc).__name__}: {exc}"
        if metadata.get(_CHECKSUM_METADATA) != _checksum(tensors):
            return None, "its tensors do not match the checksum it records"
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                return None, (f"{name!r} is {t.dtype} of shape {list(t.shape)}, expected {dtype} of shape "
                              f"{list(shape)}")
            if not bool(torch.isfinite(t).all()):
                return None, f"{name!r} holds non-finite values"
        return tensors, None

    def store(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {_SETTINGS_METADATA: canonical_json(self.settings), _CHECKSUM_METADATA: _checksum(cpu)}
        atomic_write(self.path(".safetensors"), lambda p: save_file(cpu, p, metadata=metadata))
        # the readable copy holds exactly what the metadata records (values JSON cannot hold as their str)
        write_json(self.path(".json"), json.loads(canonical_json(self.settings)))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the named tensors (names, dtypes, shapes, bytes), whatever order they come in."""
    return state_digest(dict(sorted(tensors.items())))


_UNIT_FORMAT = "iaerf-results-unit/1"


class SettingsMismatchError(ValueError):
    """``out_dir`` holds results computed under other settings."""


class ResultsFolder:
    """``out_dir`` of one evaluation (see the module docstring); ``ResultsFolder(None, ...)`` stores nothing.

    ``settings`` must be JSON-serialisable (tensors become lists, other objects their ``str``): it is compared
    after a JSON round trip, so what is stored is exactly what is checked.
    """

    def __init__(self, out_dir, evaluation: str, settings: dict, *, rerun: bool = False):
        if not isinstance(rerun, bool):
            raise TypeError(f"rerun must be a bool, got {type(rerun).__name__}")
        self.path = None if out_dir is None else ensure_writable_dir(out_dir, "out_dir")
        self.settings = {"evaluation": evaluation, **json.loads(canonical_json(settings))}
        if self.path is None:
            return
        self.key = settings_key(self.settings, 64)
        stored_path = os.path.join(self.path, "settings.json")
        if os.path.exists(stored_path):
            stored = self._read_settings(stored_path)
            if stored != self.settings:
                if stored is not None and not rerun:
                    differ = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
                    raise SettingsMismatchError(
                        f"out_dir={self.path!r} holds results computed with other settings (differing: {differ}); "
                        f"pass rerun=True to discard them, or another out_dir")
                shutil.rmtree(os.path.join(self.path, "units"), ignore_errors=True)
                results = os.path.join(self.path, "results.json")
                if os.path.exists(results):
                    os.remove(results)
        write_json(stored_path, {"settings": self.settings, "sha256": self.key})

    @staticmethod
    def _read_settings(path: str) -> dict | None:
        """The settings recorded in ``path``, or None (with a warning) when the file is damaged."""
        try:
            stored = read_json(path, keys=("settings", "sha256"))
            if stored["sha256"] != settings_key(stored["settings"], 64):
                raise ValueError(f"{path} is damaged: its settings do not match the checksum it records")
        except ValueError as exc:
            warnings.warn(f"{exc}; the results stored beside it are discarded and recomputed", RuntimeWarning,
                          stacklevel=4)
            return None
        return stored["settings"]

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _unit_path(self, name: str) -> str:
        return os.path.join(self.path, "units", f"{name}.pt")

    def load(self, name: str) -> dict | None:
        """The stored unit ``name`` (a dict of tensors), or None when it is not there (or nothing is stored), or
        when it is damaged or not this folder's unit ``name`` (with a warning naming the file; the caller
        recomputes it and :meth:`store` overwrites it)."""
        path = None if self.path is None else self._unit_path(name)
        if path is None or not os.path.exists(path):
            return None
        try:
            unit = load_checked(path, f"results unit {name!r}")
            if (unit.get("format"), unit.get("settings"), unit.get("name")) != (_UNIT_FORMAT, self.key, name) \
                    or not isinstance(unit.get("tensors"), dict):
                raise ValueError(f"results unit {name!r} {path} is not this folder's unit {name!r}")
        except ValueError as exc:
            warnings.warn(f"{exc}; recomputing it (the file will be overwritten)", RuntimeWarning, stacklevel=2)
            return None
        return unit["tensors"]

    def store(self, name: str, tensors: dict) -> None:
        if self.path is not None:
            tensors = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
                       for k, v in tensors.items()}
            save_checked(self._unit_path(name), {"format": _UNIT_FORMAT, "settings": self.key, "name": name,
                                                 "tensors": tensors})

    def write_results(self, results: dict) -> None:
        if self.path is not None:
            write_json(os.path.join(self.path, "results.json"), results)
