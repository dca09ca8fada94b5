"""Fused energy (paper Eq. 2) and energy-regularized cross-entropy (Algorithm 1) ops.

One file per public op, holding its torch.library ops (schema, fake, Triton CUDA kernel: see
:mod:`iaerf.ops._library`), its kernels' launchers, its autograd and its public function:

- :mod:`~iaerf.ops.logsumexp`: :func:`logsumexp` (torch.ops.iaerf.logsumexp, logsumexp_backward)
- :mod:`~iaerf.ops.energy`: :func:`energy` / :class:`Energy` (over the logsumexp op)
- :mod:`~iaerf.ops.energy_cross_entropy`: :func:`energy_regularized_cross_entropy` /
  :class:`EnergyRegularizedCrossEntropy` (+ :class:`EnergyCEParts`) (torch.ops.iaerf.energy_ce_forward, _backward)

Shared pieces: argument checks and backend choice (:mod:`~iaerf.ops._checks`), the Triton kernels
(:mod:`~iaerf.ops._triton_kernels`), the reference implementations (:mod:`iaerf.ops.reference`, the tests' ground
truth). Every public module here except ``reference`` is an op file: it is imported, so its ops register, and its
``__all__`` is re-exported, so adding an op needs no line here.
"""
import importlib
import pkgutil

_NOT_OPS = {"reference"}

__all__ = []
for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_") or _info.name in _NOT_OPS:
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += _module.__all__
__all__.sort()
del _info, _module, _name
