"""A resumable results folder: one evaluation's settings, its finished units of work and its final results.

Layout of ``out_dir``::

    settings.json        what the evaluation depends on (written first, atomically)
    units/<name>.pt      one finished unit (a PBRF chunk, one subset re-training): a dict of tensors
    results.json         the evaluation's summary (written last)

A rerun with the same settings reads the finished units back instead of recomputing them, so an interrupted
evaluation resumes where it stopped; a rerun with different settings raises (``rerun=True`` discards the stored
units and starts over), so results computed under other settings are never mixed in.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from iaerf._io import atomic_write, canonical_json, ensure_writable_dir, load_tensor_file, read_json, write_json


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
        stored_path = os.path.join(self.path, "settings.json")
        if os.path.exists(stored_path):
            stored = read_json(stored_path)
            if stored != self.settings:
                if not rerun:
                    differ = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
                    raise SettingsMismatchError(
                        f"out_dir={self.path!r} holds results computed with other settings (differing: {differ}); "
                        f"pass rerun=True to discard them, or another out_dir")
                shutil.rmtree(os.path.join(self.path, "units"), ignore_errors=True)
                results = os.path.join(self.path, "results.json")
                if os.path.exists(results):
                    os.remove(results)
        write_json(stored_path, self.settings)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _unit_path(self, name: str) -> str:
        return os.path.join(self.path, "units", f"{name}.pt")

    def load(self, name: str) -> dict | None:
        """The stored unit ``name`` (a dict of tensors), or None when it is not there (or nothing is stored)."""
        if self.path is None or not os.path.exists(self._unit_path(name)):
            return None
        return load_tensor_file(self._unit_path(name), f"results unit {name!r}")

    def store(self, name: str, tensors: dict) -> None:
        if self.path is not None:
            tensors = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
                       for k, v in tensors.items()}
            atomic_write(self._unit_path(name), lambda tmp: torch.save(tensors, tmp))

    def write_results(self, results: dict) -> None:
        if self.path is not None:
            write_json(os.path.join(self.path, "results.json"), results)
