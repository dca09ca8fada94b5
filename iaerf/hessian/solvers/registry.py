"""The solver registry: every inverse-HVP solver ``x = (H + damping I)^{-1} v`` (paper Eq. 7-9: s = H^{-1} g_val)
is a :class:`Solver` subclass with a ``name``, and defining the subclass registers it.

What a solver declares once, the rest of iaerf reads from here: the method names ``inverse_hvp`` and the influence
functions accept (:func:`solver_names`), its options dataclass (:func:`make_options`), whether it takes a callback,
whether it runs the operator's products (the native head kernel's dtype limit), which parameters it can cover
(:meth:`Solver.check_selection`) and what it keeps beside cached results (:meth:`Solver.with_storage`).

Every solver returns the same info dict: the keys of :data:`INFO_KEYS` (``seconds`` is set by the dispatcher,
:func:`iaerf.hessian.inverse_hvp`) plus its own extras.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from iaerf.hessian._checks import build_options

# The keys every solver's info holds:
#   method:     the solver's name
#   hvps:       operator products spent, counted per vector (a product of b vectors at once counts b; a dense
#               build of H counts P; fitted approximations such as K-FAC, which run data passes, count 0)
#   iterations: the solver's own steps (CG / LiSSA iterations, Lanczos steps; 0 for a direct solve)
#   converged:  whether the solver's own stopping rule was met (a direct solve: True)
#   seconds:    wall time of the solve (set by inverse_hvp unless the solver reports its own: a LiSSA run resumed
#               from a checkpoint reports the whole run's)
INFO_KEYS = ("method", "hvps", "iterations", "converged", "seconds")

_REGISTRY: dict[str, Solver] = {}


class Solver:
    """One inverse-HVP method. Subclass it with a ``name`` (that line registers it) and implement :meth:`solve`.

    Class attributes:
        name: the ``method`` / ``solver`` string that selects it.
        options_class: its options dataclass (fields with defaults, a ``validate()`` method).
        summary: one line for the documentation's solver table and error messages.
        takes_callback: whether :meth:`solve` accepts a per-iteration ``callback``.
        runs_operator_products: whether it multiplies by the operator (``matvec`` / ``minibatch_matvec``): the
            native head Hessian's kernel computes in float32 / float64 only, so such a solver is refused for a
            half-precision head before any pass.
        exclusive_options: ``{prefix: what}`` option names (by prefix) that only this solver takes; another solver
            given one says so by name instead of "unknown option".
    """

    name: ClassVar[str]
    options_class: ClassVar[type]
    summary: ClassVar[str] = ""
    takes_callback: ClassVar[bool] = False
    runs_operator_products: ClassVar[bool] = True
    exclusive_options: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return                                      # an abstract intermediate class
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered ({type(_REGISTRY[name]).__name__})")
        if not (dataclasses.is_dataclass(cls.options_class) and callable(getattr(cls.options_class, "validate", None))):
            raise TypeError(f"solver {name!r}: options_class must be a dataclass with a validate() method")
        _REGISTRY[name] = cls()

    def solve(self, operator, V: torch.Tensor, damping: float, options, *, seed: int, progress: bool,
              callback=None) -> tuple[torch.Tensor, dict]:
        """``(H + damping I)^{-1} V`` for ``V [b, P]`` (checked: finite, the operator's dtype and device, detached)
        -> ``(x [b, P], info)``; info holds :data:`INFO_KEYS` but ``seconds``, plus the solver's extras."""
        raise NotImplementedError

    def check_selection(self, model, chosen: dict, what: str) -> None:
        """Refuse, before any pass over the data, a parameter selection ``chosen`` ({name: tensor} of ``model``)
        this solver cannot cover (``what``: how the selection was given, for the message). Default: any."""

    def with_storage(self, options, given: dict, *, cache_dir, path_for):
        """The options with what this solver keeps beside the influence functions' cached results (fitted factors,
        checkpoints) filled in, unless the caller ``given`` those options; ``path_for(suffix)`` is the path of a
        file beside the cached solution. Default: the options unchanged."""
        return options


def solver_names() -> tuple[str, ...]:
    """The registered solvers' names, in registration order."""
    return tuple(_REGISTRY)


def get_solver(name: str) -> Solver:
    """The registered solver called ``name``; a ValueError listing the registered ones otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def make_options(name: str, options=None, overrides=None, *, argument: str = "options"):
    """The validated options dataclass of solver ``name`` from an options object or dict (``options``) plus keyword
    ``overrides``; raises TypeError / ValueError naming a bad option before any solve runs. ``argument``: the
    argument the options came in (``options`` in :func:`iaerf.hessian.inverse_hvp`, ``solver_options`` in the
    influence functions)."""
    solver = get_solver(name)
    names = list(options) if isinstance(options, dict) else []
    names += list(overrides or {})
    for other in _REGISTRY.values():
        if other is solver:
            continue
        for prefix, what in other.exclusive_options.items():
            misplaced = [k for k in names if isinstance(k, str) and k.startswith(prefix)]
            if misplaced:
                raise TypeError(f"{argument}: {misplaced[0]!r} is an option of the {other.name!r} solver ({what}) "
                                f"only, not of {name!r}; solve with {other.name!r} to use it, or leave it out")
    given = next((f" (the options of {s.name!r})" for s in _REGISTRY.values()
                  if isinstance(options, s.options_class)), "")
    return build_options(solver.options_class, options, overrides, name=argument, what=repr(name), other=given)


def callback_solvers() -> tuple[str, ...]:
    """The names of the solvers that take a per-iteration callback."""
    return tuple(name for name, solver in _REGISTRY.items() if solver.takes_callback)
