"""On-disk cache of influence results and inverse-HVP solutions, keyed by every input that changes them.

A cache entry is ``<cache_dir>/<stage>-<key>.safetensors`` (the tensors, with the settings they were computed under
in the file's metadata) plus ``<stage>-<key>.json`` (the same settings in readable form, including the fingerprints
of the model state and of the data). ``key`` is the SHA-256 of those settings, so an entry is reused only when the
model parameters and buffers, the data and every setting match exactly. Writes go to a temporary file in the same
folder followed by ``os.replace``, so an interrupted run never leaves a half-written entry behind.

A cache folder may be shared or edited by hand, so nothing read from it is trusted: an entry is returned only when
the tensor file parses, records exactly this entry's settings, holds the expected tensors with the expected
shape and dtype and only finite values, and their bytes match the SHA-256 the file's metadata records (safetensors
itself has no checksum, so a flipped bit would otherwise load as a valid value). Anything else is reported with a
warning naming the file and treated as a miss, so the caller recomputes and :meth:`ResultCache.store` overwrites
the damaged entry.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iaerf.core.identity import state_digest
from iaerf.core.io import atomic_write, canonical_json, ensure_writable_dir, settings_key, write_json

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
