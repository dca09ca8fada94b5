"""Choosing a subset of a model's parameters and moving between parameter dicts and flat vectors.

Every Hessian operator in :mod:`iaerf.hessian` works on flat vectors ``[P]`` or batches ``[b, P]`` whose layout is
the concatenation of the selected parameters, each flattened row-major, in ``model.named_parameters()`` order.
For an ``nn.Linear`` head that is ``[weight.flatten(), bias]``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn


def select_parameters(model: nn.Module, params: Iterable[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that the Hessian is taken over, in ``named_parameters()`` order.

    Args:
        model: any module.
        params: None for every parameter with ``requires_grad``; otherwise names or name prefixes (``"fc"``
            selects ``fc.weight`` and ``fc.bias``; a prefix matches whole dotted components only).

    Returns:
        ``{name: parameter}`` (the parameters themselves, not copies).

    Raises:
        ValueError: a name matches nothing, or the selection is empty.
        TypeError: ``params`` is not None, a string or an iterable of strings.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if params is None:
        chosen = {name: p for name, p in named if p.requires_grad}
        if not chosen:
            raise ValueError("params=None selects the parameters with requires_grad=True, and model has none")
        return chosen
    if isinstance(params, str):
        params = [params]
    try:
        wanted = list(params)
    except TypeError:
        raise TypeError(f"params must be None, a name or an iterable of names, got {type(params).__name__}") from None
    if not wanted:
        raise ValueError("params is empty: give parameter names or prefixes, or None for all trainable parameters")
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"params must contain strings (parameter names or prefixes), got {type(w).__name__}")

    def matches(name: str, w: str) -> bool:
        return name == w or name.startswith(w + ".") or w == ""

    unknown = [w for w in wanted if not any(matches(name, w) for name, _ in named)]
    if unknown:
        raise ValueError(
            f"params {unknown} match no parameter of {type(model).__name__}; "
            f"known names: {[name for name, _ in named][:20]}"
        )
    return {name: p for name, p in named if any(matches(name, w) for w in wanted)}


def flatten(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (a dict in its order, or a list) into one flat vector ``[P]``."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not values:
        raise ValueError("flatten needs at least one tensor")
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector ``[P]`` (or a batch ``[b, P]``) into tensors shaped like ``like`` (views of ``vec``).

    A batch keeps its leading dimension: each value has shape ``[b, *like[name].shape]``.
    """
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"vec must be a tensor, got {type(vec).__name__}")
    if vec.dim() not in (1, 2):
        raise ValueError(f"vec must have shape [P] or [b, P], got {tuple(vec.shape)}")
    total = sum(t.numel() for t in like.values())
    if vec.shape[-1] != total:
        raise ValueError(f"vec has {vec.shape[-1]} entries per vector, but the parameters hold {total}")
    lead = tuple(vec.shape[:-1])
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vec[..., offset: offset + t.numel()].reshape(lead + tuple(t.shape))
        offset += t.numel()
    return out


def trainable_selection(model: nn.Module, params) -> dict[str, torch.Tensor]:
    """The parameters an influence computation differentiates: :func:`select_parameters` of ``params`` that require
    grad and are non-empty, ``{name: parameter}``; a ValueError naming ``params`` when none is left."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if params is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("params=None: no trainable parameter (requires_grad=True) in the model")
    chosen = {name: p for name, p in select_parameters(model, params).items() if p.requires_grad and p.numel() > 0}
    if not chosen:
        raise ValueError(f"params={params!r}: no trainable parameter (requires_grad=True) in the chosen subset")
    return chosen
