"""Hessian engine (paper Eq. 7-9): batched Hessian-vector products and inverse-HVP solvers.

- :mod:`~iaerf.hessian.params`: :func:`select_parameters`, :func:`flatten`, :func:`unflatten`
- :class:`HessianOperator`: the interface (``matvec``, ``minibatch_matvec``, ``dense``)
- :class:`ModuleHessian`: any ``nn.Module`` (torch.func forward-over-reverse, or GGN)
- :class:`HeadHessian`: a linear softmax classifier on fixed features (native C++/CUDA kernel)
- :func:`inverse_hvp`: ``(H + damping I)^{-1} V`` by any solver of the registry :mod:`~iaerf.hessian.solvers`
  (LiSSA, CG optionally preconditioned by K-FAC / EK-FAC / the Gauss-Newton diagonal, a dense float64 solve,
  K-FAC / EK-FAC, ...; :func:`solver_names` lists them)
"""
from iaerf.hessian._checks import HessianNotFiniteError
from iaerf.hessian.head_hessian import HeadHessian
from iaerf.hessian.inverse import inverse_hvp
from iaerf.hessian.solvers import CGOptions, ExactOptions, LissaDivergenceError, LissaOptions, solver_names
from iaerf.hessian.solvers.common import estimate_lambda_max
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
    "solver_names",
    "unflatten",
]
