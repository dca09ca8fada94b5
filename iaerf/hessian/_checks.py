"""Input validation shared by the Hessian operators and the inverse-HVP solvers.

Every check runs before any kernel does, and every error names the offending argument.
"""
from __future__ import annotations

import dataclasses

import torch


def check_vectors(vectors, *, num_params: int, dtype: torch.dtype, device: torch.device, name: str = "vectors",
                  batched_dims: int = 1, allow_single: bool = True) -> tuple[torch.Tensor, bool]:
    """Validate a batch of flat parameter vectors.

    Args:
        vectors: ``[*lead, P]`` with ``len(lead) == batched_dims`` and every lead dim >= 1, or ``[P]`` when
            ``allow_single``.
    Returns:
        ``(vectors with the leading dims, was_single)``.
    """
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(vectors).__name__}")
    single = allow_single and vectors.dim() == 1
    if single:
        vectors = vectors.reshape((1,) * batched_dims + (-1,))
    if vectors.dim() != batched_dims + 1:
        want = "[P] or " if allow_single else ""
        lead = ", ".join("rbm"[i] for i in range(batched_dims))
        raise ValueError(f"{name} must have shape {want}[{lead}, P], got {tuple(vectors.shape)}")
    if any(d == 0 for d in vectors.shape[:-1]):
        # an empty batch is almost always an upstream bug (an empty validation set, a bad slice); refusing it here
        # names the argument instead of failing inside vmap
        raise ValueError(f"{name} holds no vectors (shape {tuple(vectors.shape)}); pass at least one")
    if vectors.shape[-1] != num_params:
        raise ValueError(f"{name} has length {vectors.shape[-1]} along the last dim, but the operator has P={num_params} parameters")
    if vectors.dtype != dtype:
        raise TypeError(f"{name} has dtype {vectors.dtype}, but the operator works in {dtype}; convert with .to({dtype})")
    if vectors.device != torch.device(device):
        raise ValueError(f"{name} is on {vectors.device}, but the operator is on {device}")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return vectors, single


def check_indices(indices, *, num_samples: int, repeats: int, name: str = "indices") -> torch.Tensor:
    """Validate minibatch indices ``[r, m]`` into the local data (int64, 0 <= i < n, m >= 1)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor [r, m], got {type(indices).__name__}")
    if indices.dtype != torch.long:
        raise TypeError(f"{name} must have dtype torch.int64, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != repeats or indices.shape[1] < 1:
        raise ValueError(f"{name} must have shape [r={repeats}, m>=1], got {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        raise ValueError(f"{name} must lie in [0, {num_samples}) (the local data), got [{int(indices.min())}, {int(indices.max())}]")
    return indices


def check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def build_options(cls, options, kwargs, *, name: str, what: str, other: str = ""):
    """A validated ``cls`` (a solver's options dataclass) from an instance or dict of its fields plus keyword
    overrides. ``name``: the argument the options came in; ``what``: the solver, for messages; ``other``: appended
    to the type error (e.g. which solver a wrong options class belongs to)."""
    if options is None:
        fields = {}
    elif isinstance(options, cls):
        fields = dataclasses.asdict(options)
    elif isinstance(options, dict):
        fields = dict(options)
    else:
        raise TypeError(f"{name} for {what} must be a {cls.__name__} or a dict of its fields, got "
                        f"{type(options).__name__}{other}")
    fields.update(kwargs or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown} for {what}; known: {sorted(known)}")
    opts = cls(**fields)
    opts.validate()
    return opts


class HessianNotFiniteError(FloatingPointError):
    """A Hessian-vector product of finite vectors came out NaN/Inf: the data, weights or loss are not finite."""


def not_finite_error(where: str) -> HessianNotFiniteError:
    """The error a solver raises when a product of finite vectors came out NaN/Inf (``where``: which product)."""
    return HessianNotFiniteError(
        f"{where}: a Hessian-vector product came out NaN/Inf from finite vectors, so the operator itself is not "
        "finite: check the training data (inputs, features), the model's weights and buffers, and the loss for "
        "NaN/Inf or overflow")
