"""iaerf: a fast influence engine for energy regularization (IAERF) in PyTorch.

Public API (imported lazily so that ``import iaerf`` stays cheap):

- fused ops: :func:`logsumexp`, :func:`energy`, :func:`energy_regularized_cross_entropy`, :func:`head_hvp`
- Hessian engine: :class:`ModuleHessian`, :class:`HeadHessian`, :func:`inverse_hvp`
- influence (paper Eq. 7-9): :func:`energy_influence`, :func:`energy_influence_on_test`, :func:`loss_influence`
- :func:`backend_info`: which implementation each op uses on which device, and why
- Algorithm 1 (from :mod:`iaerf.longtail`): :func:`finetune`, :func:`select_beta`, and :class:`IAERFLoss` for a
  user's own training loop
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "logsumexp": "iaerf.ops",
    "energy": "iaerf.ops",
    "energy_regularized_cross_entropy": "iaerf.ops",
    "EnergyRegularizedCrossEntropy": "iaerf.ops",
    "Energy": "iaerf.ops",
    "EnergyCEParts": "iaerf.ops",
    "head_hvp": "iaerf.ops",
    "backend_info": "iaerf.ops",
    "ModuleHessian": "iaerf.hessian",
    "HeadHessian": "iaerf.hessian",
    "inverse_hvp": "iaerf.hessian",
    "LissaOptions": "iaerf.hessian",
    "CGOptions": "iaerf.hessian",
    "ExactOptions": "iaerf.hessian",
    "energy_influence": "iaerf.influence",
    "energy_influence_on_test": "iaerf.influence",
    "loss_influence": "iaerf.influence",
    "loss_influence_on_test": "iaerf.influence",
    "top_influences": "iaerf.influence",
    "InfluenceTask": "iaerf.influence",
    "InfluenceSettings": "iaerf.influence",
    "IAERFLoss": "iaerf.longtail",
    "finetune": "iaerf.longtail",
    "select_beta": "iaerf.longtail",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iaerf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
