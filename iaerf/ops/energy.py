"""Energy (paper Eq. 2): E_i = -T logsumexp_k(z_ik / T), the public :func:`energy` and :class:`Energy`.

It has no kernel of its own: it runs the logsumexp op (iaerf.ops.logsumexp), on a max-shifted scaled copy of the
logits when T != 1.
"""
from __future__ import annotations

import torch

from iaerf.ops import _checks, registry
from iaerf.ops.logsumexp import logsumexp
from iaerf.ops.reference import shifted_scaled_logits

__all__ = ["Energy", "energy"]

registry.register_public_function("energy", "logsumexp")


def energy(logits: torch.Tensor, temperature: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Energy E_i = -T logsumexp_k(z_ik / T) (paper Eq. 2; T = 1 there).

    Args:
        logits: [N, K] floating (see :func:`iaerf.ops.logsumexp`).
        temperature: T, a positive real number that is a normal number of the accumulation dtype (float32, float64
            for float64 logits); others raise ValueError. T != 1 makes one scaled copy of the logits, in the
            accumulation dtype, computed as -(m_i + T logsumexp_k((z_ik - m_i) / T)) with m_i the row max, so
            that neither a small T nor fp16 logits overflow the scaled copy.
        backend: as in :func:`iaerf.ops.logsumexp`.
    Returns:
        [N] float32 (float64 for float64 logits). An all -inf row gives +inf.
    """
    _checks.check_logits(logits)
    t = _checks.check_temperature(temperature, logits)
    if t == 1.0:
        return -logsumexp(logits, backend=backend)
    m, scaled = shifted_scaled_logits(logits, t)
    return -(m + t * logsumexp(scaled, backend=backend))


class Energy(torch.nn.Module):
    """Module form of :func:`energy`: [N, K] logits -> [N] energies."""

    def __init__(self, temperature: float = 1.0, backend: str | None = None):
        super().__init__()
        self.temperature = temperature
        self.backend = backend

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return energy(logits, self.temperature, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
