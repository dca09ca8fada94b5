"""What an influence computation computes: one small settings object that the public influence functions, the
pipeline and the caches share.

:class:`InfluenceSettings` holds the solver and its options, the damping, the weight decay, the parameter scope, the
task, the batch size, the seed, the cache folder and the process group. The influence functions take it as
``settings=`` and accept its fields as keywords too (``energy_influence(model, train, val, solver="cg")`` is
``energy_influence(model, train, val, InfluenceSettings(solver="cg"))``; keywords given beside a settings object
replace its fields). Everything is validated when the object is built, before any pass over the data, and every
error names the field.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

from iaerf.core.checks import check_count, check_number
from iaerf.core.io import ensure_writable_dir
from iaerf.hessian.solvers import make_options, solver_names
from iaerf.influence.task import InfluenceTask, resolve_task

__all__ = ["InfluenceSettings", "TEST_CHUNK_BYTES", "default_test_chunk"]

# The budget of the pairwise functions' right-hand-side block [chunk, P] when test_chunk is None (256 MiB). The
# solvers hold a few blocks of that shape (CG: five, LiSSA: two per repeat) and the JVP pass one more.
TEST_CHUNK_BYTES = 256 * 2**20

# never options: each is a field of its own (or, for progress, an argument of the call)
_NOT_OPTIONS = ("damping", "seed", "progress", "method")


@dataclass(frozen=True)
class InfluenceSettings:
    """The settings of an influence computation (paper Eq. 4, 8, 9); see :func:`iaerf.energy_influence` for each
    field's meaning in full.

    Fields:
        params: the parameter names or prefixes the influence is taken over (None: every trainable parameter).
        weight_decay: L2 term of the training objective, (weight_decay / 2) ||theta||^2, >= 0.
        damping: added to H before the solve, >= 0.
        solver: a registered inverse-HVP solver (:func:`iaerf.inverse_hvp`'s ``method``).
        solver_options: that solver's typed options, or a dict of their fields (None: the defaults).
        gauss_newton: the Gauss-Newton matrix instead of the Hessian.
        task: an :class:`iaerf.InfluenceTask` (None: the paper's task).
        batch_size: batch size of the data passes, >= 1.
        seed: seed of the stochastic solvers.
        cache_dir: where results are stored and reused (None: nowhere); created and checked writable on build.
        process_group: a torch.distributed group, "auto" or None.
        test_chunk: test points per batched solve of the pairwise functions (:func:`iaerf.loss_influence_on_test`,
            :func:`iaerf.energy_influence_on_test`), >= 1; None: :func:`default_test_chunk`, the most whose
            right-hand-side block ``[chunk, P]`` fits :data:`TEST_CHUNK_BYTES`. Bounds their memory for any number of
            test points; the other functions ignore it.

    Only the first eight decide the numbers: :meth:`describe` is their part of every cache key (the task enters
    the key by its callables' identity, the model and data by their fingerprints). ``test_chunk`` enters the pairwise
    keys only when it splits the test points (see :func:`iaerf.loss_influence_on_test`).
    """

    params: tuple[str, ...] | None = None
    weight_decay: float = 0.0
    damping: float = 0.0
    solver: str = "lissa"
    solver_options: object = None
    gauss_newton: bool = False
    task: InfluenceTask | None = None
    batch_size: int = 256
    seed: int = 0
    cache_dir: str | os.PathLike | None = None
    process_group: object = None
    test_chunk: int | None = None
    # the validated options the solver runs with (iaerf.hessian.solvers.make_options of solver and solver_options)
    options: object = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "weight_decay", check_number("weight_decay", self.weight_decay))
        object.__setattr__(self, "damping", check_number("damping", self.damping))
        check_count("batch_size", self.batch_size)
        if self.test_chunk is not None:
            check_count("test_chunk", self.test_chunk, why=" (test points per batched solve) or None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.gauss_newton, bool):
            raise TypeError(f"gauss_newton must be a bool, got {type(self.gauss_newton).__name__}")
        resolve_task(self.task)  # a TypeError naming task for anything but an InfluenceTask or None
        if self.solver not in solver_names():
            raise ValueError(f"solver must be one of {solver_names()}, got {self.solver!r}")
        if isinstance(self.solver_options, dict):
            for key in _NOT_OPTIONS:
                if key in self.solver_options:
                    raise ValueError(f"solver_options must not contain {key!r}: pass it as the keyword argument "
                                     f"instead")
        object.__setattr__(self, "options", make_options(self.solver, self.solver_options, argument="solver_options"))
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        elif self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))
        if self.cache_dir is not None:
            # before any pass over the data: an unwritable cache would otherwise fail only when a result is stored
            ensure_writable_dir(self.cache_dir, "cache_dir")

    @classmethod
    def of(cls, settings: InfluenceSettings | None, overrides: dict, *, caller: str) -> InfluenceSettings:
        """``settings`` (None: the defaults) with the keyword ``overrides`` of ``caller`` replacing its fields; a
        keyword that is no field is a TypeError naming it and the fields."""
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"{caller}: settings must be an iaerf.InfluenceSettings or None, got "
                            f"{type(settings).__name__}")
        names = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; the settings are {names} "
                            f"(plus the call's own device and progress)")
        if settings is None:
            return cls(**overrides)
        return dataclasses.replace(settings, **overrides) if overrides else settings

    @property
    def resolved_task(self) -> InfluenceTask:
        """``task``, or the paper's default task."""
        return resolve_task(self.task)

    def given_options(self) -> dict:
        """The solver options as given: a dict's items, or a typed object's fields that differ from the defaults
        (so that ``LissaOptions(depth=50)`` and ``{"depth": 50}`` share a cache key)."""
        if self.solver_options is None or isinstance(self.solver_options, dict):
            return dict(sorted((self.solver_options or {}).items()))
        return {f.name: getattr(self.options, f.name) for f in sorted(fields(self.options), key=lambda f: f.name)
                if getattr(self.options, f.name) != f.default}

    def test_chunk_for(self, num_params: int, itemsize: int) -> int:
        """Test points per batched solve for ``num_params`` parameters of ``itemsize`` bytes: ``test_chunk``, else
        :func:`default_test_chunk`."""
        return self.test_chunk if self.test_chunk is not None else default_test_chunk(num_params, itemsize)

    def describe(self) -> dict:
        """The settings' part of every cache key (pinned: changing it orphans every stored result)."""
        return {
            "params": list(self.params) if self.params is not None else None,
            "weight_decay": self.weight_decay,
            "damping": self.damping,
            "solver": self.solver,
            "solver_options": self.given_options(),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "gauss_newton": self.gauss_newton,
        }


def default_test_chunk(num_params: int, itemsize: int) -> int:
    """The most test points whose right-hand sides ``[chunk, num_params]`` of ``itemsize`` bytes each fit
    :data:`TEST_CHUNK_BYTES` (at least 1)."""
    check_count("num_params", num_params)
    check_count("itemsize", itemsize)
    return max(1, TEST_CHUNK_BYTES // (num_params * itemsize))
