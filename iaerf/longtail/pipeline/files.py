"""What a run directory holds on disk: checkpoints, saved tensors and the readers that check every output a stage
wrote (each raises ValueError naming the file when it is damaged, so its stage runs again).

Every tensor file a stage writes (checkpoints, influence and energy vectors) is written by
:func:`iaerf.core.store.save_checked`: it records the SHA-256 of its own content and its reader checks it, because
``torch.load`` does not check the zip CRCs and would load a flipped bit as a valid weight."""
from __future__ import annotations

import os

import torch

from iaerf.core.io import read_json
from iaerf.core.store import load_checked, save_checked
from iaerf.longtail.models import build_model, with_normed_head

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "save_vector", "read_settings", "read_vector",
           "read_table", "check_png"]

CHECKPOINT_FORMAT = "iaerf-checkpoint-2"  # 2: the file records the SHA-256 of its content


def read_settings(path: str) -> dict:
    """The stored settings of a run (``settings.json``) as a dict; a damaged file is a ValueError that names it and
    the fix."""
    try:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is damaged: expected a JSON object of settings, got {type(obj).__name__}")
    except ValueError as exc:
        raise ValueError(f"{exc}; repair it, or delete it and give the run's settings on the command line") from None
    return obj


def save_checkpoint(path: str, model: torch.nn.Module, arch: dict, meta: dict | None = None) -> None:
    """Save ``{"format", "arch": {"name", "num_classes", **kwargs}, "state_dict", "meta"}`` and the SHA-256 of all of
    it, atomically and byte-reproducibly (:func:`iaerf.core.store.save_checked`)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checked(path, {"format": CHECKPOINT_FORMAT, "arch": arch, "state_dict": state, "meta": meta or {}})


def save_vector(path: str, values: torch.Tensor) -> None:
    """Save a stage's float32 tensor (``[n]`` or ``[r, n]``) as ``{"values": values}`` with its SHA-256, atomically
    and byte-reproducibly; :func:`read_vector` reads it back."""
    save_checked(path, {"values": values.detach().cpu().float()})


def build_from_arch(arch: dict) -> torch.nn.Module:
    """The untrained model an ``arch`` dict ({"name", "num_classes", **kwargs}) describes; a ``--model`` factory's
    ({"name": "factory", "factory", "num_classes", "head", "identity"[, "normed_fc"]}) is the factory's network,
    with LDAM's cosine classifier in place of its head when ``normed_fc``."""
    if arch["name"] == "factory":
        from iaerf.longtail.pipeline.factories import model_from_factory

        model = model_from_factory(arch["factory"], arch["num_classes"])
        return with_normed_head(model, arch["head"]) if arch.get("normed_fc") else model
    return build_model(arch["name"], arch.get("num_classes"),
                       **{k: v for k, v in arch.items() if k not in ("name", "num_classes")})


def load_checkpoint(path: str, expect_arch: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved by :func:`save_checkpoint`. Raises a ValueError for a corrupt file (one whose content
    does not match the SHA-256 it records included), a file that is not an iaerf checkpoint, or one whose
    architecture / class count differs from ``expect_arch``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = load_checked(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an iaerf checkpoint (format {CHECKPOINT_FORMAT})")
    arch, state, meta = obj.get("arch"), obj.get("state_dict"), obj.get("meta", {})
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(state, dict)
            and isinstance(meta, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"checkpoint {path} is corrupt: its arch / state_dict / meta entries are malformed")
    if expect_arch is not None and arch != expect_arch:
        raise ValueError(f"checkpoint {path} does not match this run: it holds {arch}, expected {expect_arch}")
    try:
        model = build_from_arch(arch)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt: its arch {arch} builds no model ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit model {arch['name']}: {exc}") from exc
    return model.eval(), meta


def read_vector(path: str, what: str, rows: tuple[int, int] | None, n: int, *, finite: bool = False) -> torch.Tensor:
    """The float32 tensor :func:`save_vector` saved: [n] when ``rows`` is None, else [r, n] with
    rows[0] <= r <= rows[1]; ``finite``: NaN / inf count as damage."""
    t = load_checked(path, what).get("values")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} {path} is damaged: expected a float32 tensor, got a {got}")
    ok = t.shape == (n,) if rows is None else (t.dim() == 2 and t.shape[1] == n and rows[0] <= t.shape[0] <= rows[1])
    if not ok:
        want = f"[{n}]" if rows is None else f"[{rows[0]}..{rows[1]}, {n}]"
        raise ValueError(f"{what} {path} is damaged: shape {list(t.shape)}, expected {want}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} {path} is damaged: it holds NaN or inf")
    return t


def read_table(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        text = ""
    if not text.startswith("| model |"):
        raise ValueError(f"{path} is damaged: not the results table")
    return text


def check_png(path: str) -> None:
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{path} is damaged: not a PNG image")
