"""Fused energy (paper Eq. 2) and energy-regularized cross-entropy (Algorithm 1) ops, and the head Hessian-vector
product of the Hessian engine.

One file per op, holding its ops' declarations (schema, fake, Triton CUDA kernel: one
:func:`iaerf.ops.registry.register_op` call each), its kernels' launchers, its autograd and its public function:

- :mod:`~iaerf.ops.logsumexp`: :func:`logsumexp` (torch.ops.iaerf.logsumexp, logsumexp_backward)
- :mod:`~iaerf.ops.energy`: :func:`energy` / :class:`Energy` (over the logsumexp op)
- :mod:`~iaerf.ops.energy_cross_entropy`: :func:`energy_regularized_cross_entropy` /
  :class:`EnergyRegularizedCrossEntropy` (+ :class:`EnergyCEParts`) (torch.ops.iaerf.energy_ce_forward, _backward)

Shared pieces: the op registry and backend choice (:mod:`~iaerf.ops.registry`, with :func:`backend_info`),
argument checks (:mod:`~iaerf.ops._checks`), the Triton kernels (:mod:`~iaerf.ops._triton_kernels`), the reference
implementations (:mod:`iaerf.ops.reference`, the tests' ground truth). Every other public module here is an op
file: it is imported, so its ops register, and its ``__all__`` is re-exported, so adding an op needs no line here.
"""
import importlib
import pkgutil

from iaerf.ops.registry import backend_info

_NOT_OPS = {"reference", "registry"}

__all__ = ["backend_info"]
for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_") or _info.name in _NOT_OPS:
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += _module.__all__
__all__.sort()
del _info, _module, _name
