"""The per-example losses of the engine and the one check that a loss is per-example.

Every loss iaerf takes (:attr:`iaerf.InfluenceTask.train_loss` / ``measurement``, the ``loss_fn`` of
:class:`iaerf.ModuleHessian` and :class:`iaerf.hessian.kfac.KFACOperator`) follows one convention:
``loss(logits [b, K], labels [b]) -> [b]``, one value per example; the consumer takes the mean over a batch itself.
The defaults live here, below the Hessian engine and the influence functions that both use them
(:mod:`iaerf.influence.gradients` re-exports them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["energy_from_logits", "loss_from_logits", "check_per_example"]


def energy_from_logits(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """E(x) = -logsumexp_k f(x)[k] (paper Eq. 2, T = 1): ``[b, K] -> [b]``.

    torch.logsumexp (not the fused ``iaerf.ops.energy``) because the forward-mode pass needs a forward-AD formula,
    which the composite op has.
    """
    return -torch.logsumexp(logits, dim=-1)


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``[b, K], [b] -> [b]`` (the loss L of Eq. 4 / Eq. 8)."""
    return F.cross_entropy(logits, labels, reduction="none")


# Cache keys, operator fingerprints and results folders identify a callable by its module and code
# (iaerf.core.identity.callable_identity), and keys were stored while these two lived in iaerf.influence.gradients
# (which re-exports them): keeping that name keeps every stored key valid.
energy_from_logits.__module__ = loss_from_logits.__module__ = "iaerf.influence.gradients"


def check_per_example(out, batch: int, name: str) -> torch.Tensor:
    """``out`` (what the loss ``name`` returned on a probe batch of ``batch`` examples) when it is a tensor ``[batch]``.

    Raises:
        ValueError: naming ``name``, for any other shape or type, as a mean-reduced loss (a scalar) returns.
    """
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must return one value per example, shape [{batch}] on a batch of {batch}, "
                         f"got {got} (a reduced loss? use reduction='none')")
    return out
