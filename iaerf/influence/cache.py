"""On-disk cache of influence results and inverse-HVP solutions, keyed by every input that changes them.

A cache entry is ``<cache_dir>/<stage>-<key>.safetensors`` (the tensors) plus ``<stage>-<key>.json`` (the settings
in readable form, including the fingerprints of the model state and of the data). ``key`` is the SHA-256 of that
JSON, so an entry is reused only when the model parameters and buffers, the data and every setting match exactly.
Writes go to a temporary file in the same folder followed by ``os.replace``, so an interrupted run never leaves a
half-written entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from iaerf._io import atomic_write
from iaerf.influence.data import _hash_tensor


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's architecture (its repr) and every parameter and buffer (names and exact values)."""
    h = hashlib.sha256()
    h.update(repr(model).encode())
    for name, t in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def settings_key(settings: dict) -> str:
    """Stable hash of a JSON-serialisable settings dict."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:32]


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


class ResultCache:
    """Load / store named tensors for one settings dict under ``cache_dir`` (no-op when ``cache_dir`` is None)."""

    def __init__(self, cache_dir: str | os.PathLike | None, stage: str, settings: dict):
        self.settings = settings
        self.key = settings_key(settings)
        self.stage = stage
        self.dir = None if cache_dir is None else os.fspath(cache_dir)
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def path(self, suffix: str) -> str:
        return os.path.join(self.dir, f"{self.stage}-{self.key}{suffix}")

    def load(self) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or None when absent or stored under different settings."""
        if not self.enabled or not os.path.exists(self.path(".safetensors")):
            return None
        try:
            with open(self.path(".json")) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return None
        if _canonical(stored) != _canonical(self.settings):  # guards against a (theoretical) key collision
            return None
        return load_file(self.path(".safetensors"))

    def store(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(self.path(".safetensors"), lambda p: save_file(cpu, p))
        atomic_write(self.path(".json"), lambda p: _write_json(p, self.settings))


def _write_json(path: str, settings: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(settings, sort_keys=True, indent=1, default=str))


