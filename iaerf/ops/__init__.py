"""Fused energy (paper Eq. 2) and energy-regularized cross-entropy (Algorithm 1) ops.

- :func:`logsumexp`, :func:`energy` / :class:`Energy`
- :func:`energy_regularized_cross_entropy` / :class:`EnergyRegularizedCrossEntropy` (+ :class:`EnergyCEParts`)
- reference implementations in :mod:`iaerf.ops.reference`

Native ops (torch.ops.iaerf.logsumexp, logsumexp_backward, energy_ce_forward, energy_ce_backward) get fake
implementations here so that torch.compile can trace them.
"""
from iaerf.ops import _fake  # noqa: F401  (registers fake impls of the native ops)
from iaerf.ops.energy_cross_entropy import (
    EnergyCEParts,
    EnergyRegularizedCrossEntropy,
    energy_regularized_cross_entropy,
)
from iaerf.ops.logsumexp import Energy, energy, logsumexp

__all__ = [
    "Energy",
    "EnergyCEParts",
    "EnergyRegularizedCrossEntropy",
    "energy",
    "energy_regularized_cross_entropy",
    "logsumexp",
]
