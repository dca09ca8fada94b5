"""The inverse-HVP solvers, one module each, registered by subclassing :class:`Solver` (see
:mod:`~iaerf.hessian.solvers.registry`): importing a solver's module is what makes its name known to
:func:`iaerf.hessian.inverse_hvp` and the influence functions.
"""
from iaerf.hessian.solvers.registry import INFO_KEYS, Solver, get_solver, make_options, solver_names
from iaerf.hessian.solvers.lissa import LissaAccuracyWarning, LissaDivergenceError, LissaOptions
from iaerf.hessian.solvers.cg import CGOptions, conjugate_gradients
from iaerf.hessian.solvers.exact import ExactOptions, clear_exact_cache, exact_solve_cost
from iaerf.hessian.solvers.kfac import EKFACSolver, KFACSolver
from iaerf.hessian.solvers import arnoldi  # noqa: F401  (registers method="arnoldi")
from iaerf.hessian.solvers import nystrom  # noqa: F401  (registers method="nystrom")

__all__ = [
    "CGOptions",
    "EKFACSolver",
    "ExactOptions",
    "INFO_KEYS",
    "KFACSolver",
    "LissaAccuracyWarning",
    "LissaDivergenceError",
    "LissaOptions",
    "Solver",
    "clear_exact_cache",
    "conjugate_gradients",
    "exact_solve_cost",
    "get_solver",
    "make_options",
    "solver_names",
]
