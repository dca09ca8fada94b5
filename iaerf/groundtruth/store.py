"""A resumable results folder: one evaluation's settings, its finished units of work and its final results.

Layout of ``out_dir``::

    settings.json        what the evaluation depends on and its SHA-256 (written first, atomically)
    units/<name>.pt      one finished unit (a PBRF chunk, one subset re-training): a dict of tensors, with the
                         folder's settings key, the unit's name and a SHA-256 of all three
    results.json         the evaluation's summary (written last; never read back)

A rerun with the same settings reads the finished units back instead of recomputing them, so an interrupted
evaluation resumes where it stopped; a rerun with different settings raises (``rerun=True`` discards the stored
units and starts over), so results computed under other settings are never mixed in. A file that fails its
checksum is damaged (``torch.load`` does not check the zip CRCs, so a flipped bit would otherwise load as a valid
value): a damaged unit is recomputed and overwritten, a damaged settings.json discards every unit (nothing tells
which settings they were computed under); both with a ``RuntimeWarning`` naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from iaerf.core.io import (canonical_json, ensure_writable_dir, load_checked, read_json, save_checked, settings_key,
                       write_json)

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
