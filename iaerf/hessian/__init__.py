"""Hessian engine (paper Eq. 7-9): batched Hessian-vector products and inverse-HVP solvers.

- :mod:`~iaerf.hessian.params`: :func:`select_parameters`, :func:`flatten`, :func:`unflatten`
- :class:`HessianOperator`: the interface (``matvec``, ``minibatch_matvec``, ``dense``)
- :class:`ModuleHessian`: any ``nn.Module`` (torch.func forward-over-reverse, or GGN)
- :class:`HeadHessian`: a linear softmax classifier on fixed features (native C++/CUDA kernel)
- :func:`inverse_hvp`: ``(H + damping I)^{-1} V`` by LiSSA, CG (optionally preconditioned by K-FAC / EK-FAC / the
  Gauss-Newton diagonal, :mod:`~iaerf.hessian.preconditioners`) or a dense float64 solve
"""
from iaerf.hessian._checks import HessianNotFiniteError
from iaerf.hessian.head_hessian import HeadHessian
from iaerf.hessian.inverse import (
    CGOptions,
    ExactOptions,
    LissaDivergenceError,
    LissaOptions,
    estimate_lambda_max,
    inverse_hvp,
)
from iaerf.core.heads import eval_mode
from iaerf.hessian.operators import HessianOperator, ModuleHessian
from iaerf.hessian.params import flatten, select_parameters, unflatten

__all__ = [
    "CGOptions",
    "ExactOptions",
    "HeadHessian",
    "HessianNotFiniteError",
    "HessianOperator",
    "LissaDivergenceError",
    "LissaOptions",
    "ModuleHessian",
    "estimate_lambda_max",
    "eval_mode",
    "flatten",
    "inverse_hvp",
    "select_parameters",
    "unflatten",
]
