"""Inverse Hessian-vector products ``x = (H + damping I)^{-1} v`` (paper Eq. 7-9: s = H^{-1} g_val).

Three methods share one meaning of ``damping``:

- ``"lissa"`` (Agarwal et al.; the original Koh & Liang convention, also dattri's): with d = damping / scale,

      h_0 = v,   h_j = v + (1 - d) h_{j-1} - H_{B_j} h_{j-1} / scale,   estimate x = h / scale,

  averaged over repeats. The fixed point h = v + (1 - d) h - H h / scale gives (H + damping I) h / scale = v,
  i.e. ``x = (H + damping I)^{-1} v``: a user damping of 0.01 with scale 50 is d = 2e-4 in that update. B_j is a
  minibatch drawn with replacement; every repeat draws its own, from its own seeded generator, and all repeats
  x vectors advance together through ONE batched ``minibatch_matvec`` per step. The iteration contracts when
  scale >= lambda_max(H_B + damping I) for the minibatch Hessians; ``scale=None`` picks
  ``scale_margin * (lambda_max + damping)`` from a power iteration on a few minibatch Hessians (their largest
  eigenvalue bounds the full-data one on average, lambda_max being convex). The same products carry a Lanczos
  estimate of the smallest eigenvalue, and LiSSA refuses when H + damping I is not positive definite: the
  recursion then grows along the negative directions and would return a plausible, wrong answer.
- ``"cg"``: conjugate gradients on the full-data operator, batched over vectors, stopped at a relative residual;
  with ``preconditioner="kfac" | "ekfac" | "diagonal"`` (:class:`CGOptions`) preconditioned by a curvature
  approximation fitted on the operator's own model and data (:mod:`iaerf.hessian.preconditioners`): the same
  system, answer and stopping rule, in fewer operator products where the approximation fits (on an
  over-parameterised network at small damping it takes more: docs/hessian.md).
- ``"exact"``: dense float64 solve by one Cholesky factorisation (an eigendecomposition, kept for further dampings,
  when the same operator is solved again); the reference for the others (P <= 20,000 by default).

All three accept the same systems: H + damping I positive definite, as at a minimum of the training objective,
which Eq. 7-9 linearise around. Each refuses any other with the same ValueError (:func:`_not_positive_definite`):
CG when p^T A p <= 0, LiSSA from its Lanczos estimate, exact from the eigenvalues (and, for an H that is not
positive semi-definite by construction, from a Lanczos estimate before the dense build).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from iaerf.core.distributed import collective_device
from iaerf.core.identity import UnidentifiableCallableError
from iaerf.core.store import load_checked, save_checked
from iaerf.core.progress import progress_bar
from iaerf.hessian._checks import build_options, check_nonnegative, check_vectors, not_finite_error
from iaerf.hessian.head_hessian import HeadHessian
from iaerf.hessian.kfac import KFACOptions, kfac_inverse_hvp
from iaerf.hessian.operators import HessianOperator
from iaerf.core.indexed_data import named_digest


class LissaDivergenceError(FloatingPointError):
    """LiSSA's iterate became non-finite or grew geometrically: the update is not a contraction."""


class LissaAccuracyWarning(RuntimeWarning):
    """A LiSSA run with automatic settings stopped with an estimated relative error above ``target_error``."""


@dataclass
class LissaOptions:
    """Settings of the LiSSA solver.

    ``depth``, ``repeats`` and ``batch_size`` default to None, "automatic", chosen so that a default call lands
    within ``target_error`` of ``(H + damping I)^{-1} v`` or warns (:class:`LissaAccuracyWarning`) with its
    estimated error; a value you give keeps its plain meaning.

    Attributes:
        depth: recursion steps (the paper uses 5000 on CIFAR, 2500 for classifier-only runs). None: run until the
            estimated relative error of every vector is below ``target_error``, at most
            ``min(20000, max(1000, ceil(3 * kappa * ln(1 / target_error))))`` steps, kappa = scale / mu and mu the
            lower bound of lambda_min(H + damping I) described at ``target_error``.
        repeats: independent runs averaged (the paper uses 10); all advance in one batched product per step.
            None: 1 with full-data products (they are deterministic), 4 with minibatches (their spread is the
            noise estimate).
        batch_size: examples per minibatch B_j (drawn with replacement from the local data); when it is at least
            the number of local examples, every step uses the full-data product instead (deterministic). None: the
            full data when n <= 4096 (a minibatch run at a 2 % error would need more examples per step than that
            on any problem with kappa above a few hundred), else 512.
        target_error: the relative error ||x - x*|| / ||x*|| an automatic depth aims at and above which a run
            warns. Estimated as truncation + noise: with full-data products the truncation is at most
            ``(1 - mu / scale) / mu * ||h_j - h_(j-1)|| / ||x_j||`` (exact for the Neumann series), with
            minibatches ``(1 - mu / scale)^(j+1)``; the noise is 3 x the standard error of the mean over repeats (3 x
            covers the spread of a 4-sample standard deviation). mu = damping + weight_decay (the floor of a
            convex loss's H), or damping + the Lanczos estimate of lambda_min when that is smaller.
        scale: None = automatic (power iteration); otherwise must exceed lambda_max(H + damping I).
        tol: stop once the relative change ||h_j - h_{j-1}|| / ||h_j|| of every vector and repeat is below tol
            (0 disables; with small minibatches the change stays at the noise level and the run uses all of depth).
        first_repeat: index of the first repeat (its generator is derived from (seed, repeat index)), so repeats
            can be split over several calls or machines and averaged afterwards.
        scale_margin, power_iters, power_probes: the automatic scale is scale_margin * (lambda_max + damping),
            lambda_max the largest of power_probes minibatch estimates after power_iters iterations.
        growth_limit: divergence is declared when ||h_j|| > growth_limit * (j + 1) / (k + 1) * ||h_k||, k the
            checked step nearest j / 2 (a contraction keeps the ratio within (j + 1) / (k + 1)), when the
            full-data increment h_j - h_(j-1) (the residual) exceeds ||v||, or when h is not finite.
        check_curvature: before the run, estimate the smallest eigenvalue of H (Lanczos, power_iters steps on the
            power_probes minibatch Hessians' mean, or on the full-data H when a minibatch holds all data) and
            refuse when H + damping I is not positive definite: LiSSA then does not converge to the solution.
        check_every: steps between divergence / tolerance checks and progress-bar updates.
        checkpoint_path, checkpoint_every: when a path is given, the state (h, step, generator states) is written
            there atomically every checkpoint_every steps and at the end, with a key of everything the solution
            depends on: ``operator.fingerprint()`` (settings, parameter values, data), every option here except
            depth / checkpoint_path / checkpoint_every, damping, seed and a digest of the vectors. A later call
            resumes only when the key matches (a larger depth continues the run); otherwise, or when the file is
            damaged, it warns with the reason and starts afresh, overwriting the file. The file is read with
            ``torch.load(weights_only=True)``, which cannot run code, and carries a SHA-256 of its content
            (``iaerf.core.store.save_checked``), checked on every read, so a flipped bit counts as damage. The loss of a
            ``ModuleHessian`` enters the key by :func:`iaerf.core.identity.callable_identity`; a loss holding an object
            whose content cannot be read is refused with checkpoints. Under a process group each rank writes
            ``<path>.rank<r>`` and the ranks resume only when all are at the same step.
    """

    depth: int | None = None
    repeats: int | None = None
    batch_size: int | None = None
    target_error: float = 0.02
    scale: float | None = None
    tol: float = 1e-6
    first_repeat: int = 0
    scale_margin: float = 1.1
    power_iters: int = 30
    power_probes: int = 8
    growth_limit: float = 2.0
    check_curvature: bool = True
    check_every: int = 10
    checkpoint_path: str | None = None
    checkpoint_every: int = 100

    def validate(self):
        for name in ("depth", "repeats", "batch_size", "power_iters", "power_probes", "check_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is None and name in ("depth", "repeats", "batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                auto = " (or None for automatic)" if name in ("depth", "repeats", "batch_size") else ""
                raise ValueError(f"LiSSA option {name} must be a positive int{auto}, got {value!r}")
        target = check_nonnegative(self.target_error, "target_error")
        if not 0 < target < 1:
            raise ValueError(f"LiSSA option target_error must lie in (0, 1), got {self.target_error!r}")
        if isinstance(self.first_repeat, bool) or not isinstance(self.first_repeat, int) or self.first_repeat < 0:
            raise ValueError(f"LiSSA option first_repeat must be an int >= 0, got {self.first_repeat!r}")
        if self.scale is not None:
            if check_nonnegative(self.scale, "scale") <= 0:
                raise ValueError("LiSSA option scale must be > 0 (or None for automatic)")
        check_nonnegative(self.tol, "tol")
        if check_nonnegative(self.scale_margin, "scale_margin") < 1.0:
            raise ValueError(f"LiSSA option scale_margin must be >= 1, got {self.scale_margin}")
        if check_nonnegative(self.growth_limit, "growth_limit") < 1.0:
            raise ValueError(f"LiSSA option growth_limit must be >= 1, got {self.growth_limit}")
        if not isinstance(self.check_curvature, bool):
            raise TypeError(f"LiSSA option check_curvature must be a bool, got {self.check_curvature!r}")
        if self.checkpoint_path is not None:
            if not isinstance(self.checkpoint_path, (str, os.PathLike)):
                raise TypeError(f"LiSSA option checkpoint_path must be a file path or None, got {self.checkpoint_path!r}")
            if not os.fspath(self.checkpoint_path):
                raise ValueError("LiSSA option checkpoint_path must not be empty (None disables checkpoints)")


@dataclass
class CGOptions:
    """Conjugate gradients: stop when every vector's ||r|| / ||v|| <= tol, or after max_iter iterations.

    Attributes:
        tol, max_iter: the stopping rule (the same with and without a preconditioner: r is always the residual
            ``v - (H + damping I) x`` of the system itself).
        preconditioner: None (plain CG), or ``"kfac"``, ``"ekfac"``, ``"diagonal"``: preconditioned CG with a
            curvature approximation ``M`` of the Gauss-Newton matrix fitted on the operator's own model, loss, data
            and parameters, applied as ``(M + weight_decay I + damping I)^{-1}`` in closed form
            (:mod:`iaerf.hessian.preconditioners`). The answer is the same system's, to the same ``tol``; only the
            number of operator products changes (fewer where curvature scales differ between parameters and n K
            >> P; more on an over-parameterised network at small damping, see docs/hessian.md). K-FAC / EK-FAC cover ``nn.Linear`` / ``nn.Conv2d`` (groups=1)
            weights and biases; every other selected parameter (batch norm's, ...) gets the Gauss-Newton diagonal
            block instead, so no parameter leaves the solve. ``"diagonal"``: the Gauss-Newton diagonal for all of
            them, from per-example gradients (not a Hutchinson estimate). Needs an :class:`iaerf.ModuleHessian` or
            :class:`iaerf.HeadHessian`.
        preconditioner_fisher: how the preconditioner's curvature is sampled: ``"sampled"`` (labels drawn from
            the model's softmax, one per example and pass; default), ``"expected"`` (the exact Gauss-Newton output
            factor, K backward passes per batch) or ``"empirical"`` (the training labels).
        preconditioner_batch_size: examples per batch of the preconditioner's fitting passes.
    """

    tol: float = 1e-8
    max_iter: int = 1000
    preconditioner: str | None = None
    preconditioner_fisher: str = "sampled"
    preconditioner_batch_size: int = 256

    def validate(self):
        from iaerf.hessian.kfac_factors import FISHER_MODES
        from iaerf.hessian.preconditioners import PRECONDITIONERS

        if check_nonnegative(self.tol, "tol") <= 0:
            raise ValueError("CG option tol must be > 0")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"CG option max_iter must be a positive int, got {self.max_iter!r}")
        if self.preconditioner is not None and self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"CG option preconditioner must be one of {PRECONDITIONERS} or None, got "
                             f"{self.preconditioner!r}")
        if self.preconditioner_fisher not in FISHER_MODES:
            raise ValueError(f"CG option preconditioner_fisher must be one of {FISHER_MODES}, got "
                             f"{self.preconditioner_fisher!r}")
        size = self.preconditioner_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"CG option preconditioner_batch_size must be a positive int, got {size!r}")


@dataclass
class ExactOptions:
    """Dense float64 solve: one Cholesky factorisation of ``H + damping I`` for all vectors at once.

    ``H + damping I`` must be positive definite, as for CG and LiSSA; otherwise the solve raises their ValueError
    with its exact smallest eigenvalue. For an operator whose H is not positive semi-definite by construction (not
    a Gauss-Newton matrix or a linear head's cross-entropy Hessian) a 30-step Lanczos estimate on the full data runs
    first, so that a clearly indefinite one is refused before the P products of the dense build (measured: 2 s
    against 24 s for the build on a P = 496 CNN).

    Attributes:
        max_exact_params: refuse larger P. The dense ``[P, P]`` float64 Hessian takes 8 P^2 bytes and the solve
            holds two such matrices at its peak (``H + damping I`` and its factor): 20,000 (the default) is 3.0 GiB
            per matrix, 6.0 GiB at the peak. Building H costs P Hessian-vector products; the factorisation P^3 / 3
            flops.
        reuse_eigendecomposition: keep one eigendecomposition ``H = Q diag(w) Q^T`` (the most recent one, for one
            operator fingerprint) so that further solves of the same H at any damping cost two ``[P, P] x [P, b]``
            products instead of a dense build and a factorisation. True: once the same
            ``operator.fingerprint()`` (weights, data and settings unchanged, checked on every call) is solved at a
            second damping value (a repeat at the same damping repeats the Cholesky solve, bit for bit): that call
            pays one ``torch.linalg.eigh`` (roughly an order of magnitude more than a Cholesky factorisation,
            often still less than building H), later ones reuse it. False: never keep
            anything between calls. The kept matrix (8 P^2 bytes) is freed by :func:`clear_exact_cache` or by the
            next decomposition of another operator; operators without ``fingerprint()`` (or whose loss cannot be
            identified, see :func:`iaerf.core.identity.callable_identity`) are never cached.
    """

    max_exact_params: int = 20000
    reuse_eigendecomposition: bool = True

    def validate(self):
        if isinstance(self.max_exact_params, bool) or not isinstance(self.max_exact_params, int) or self.max_exact_params < 1:
            raise ValueError(f"exact option max_exact_params must be a positive int, got {self.max_exact_params!r}")
        if not isinstance(self.reuse_eigendecomposition, bool):
            raise TypeError(f"exact option reuse_eigendecomposition must be a bool, got {self.reuse_eigendecomposition!r}")


_OPTIONS = {"lissa": LissaOptions, "cg": CGOptions, "exact": ExactOptions, "kfac": KFACOptions, "ekfac": KFACOptions}


def make_solver_options(method: str, options=None, kwargs=None, *, name: str = "options"):
    """The validated options dataclass of ``method`` ("lissa", "cg", "exact") from an options object or dict plus
    keyword overrides; raises TypeError / ValueError naming a bad option before any solve runs. ``name`` is the
    argument the options came in (``options`` here, ``solver_options`` in the influence functions)."""
    cls = _OPTIONS[method]
    if method != "cg":
        # a preconditioner belongs to CG alone: say so, rather than only "unknown option"
        names = list(options) if isinstance(options, dict) else []
        names += list(kwargs or {})
        misplaced = [k for k in names if isinstance(k, str) and k.startswith("preconditioner")]
        if misplaced:
            raise TypeError(f"{name}: {misplaced[0]!r} is an option of the 'cg' solver (preconditioned conjugate "
                            f"gradients) only, not of {method!r}; solve with 'cg' to use it, or leave it out")
    given = next((f" (the options of {m!r})" for m, c in _OPTIONS.items() if isinstance(options, c)), "")
    return build_options(cls, options, kwargs, name=name, what=repr(method), other=given)


def inverse_hvp(operator: HessianOperator, vectors: torch.Tensor, method: str = "lissa", *, damping: float = 0.0,
                seed: int = 0, progress: bool = True, options=None, return_info: bool = False, callback=None,
                **method_options):
    """Solve ``(H + damping I) x = v`` for a batch of vectors.

    Args:
        operator: a :class:`HessianOperator` (``H`` already includes its weight decay).
        vectors: ``[b, P]`` or ``[P]`` in the operator's dtype and device, finite.
        method: ``"lissa"``, ``"cg"``, ``"exact"``, or ``"kfac"`` / ``"ekfac"`` (:mod:`iaerf.hessian.kfac`: the
            Kronecker-factored Gauss-Newton approximation of the operator's model and loss, fitted on its data).
        damping: >= 0, added to H (same meaning for every method).
        seed: seeds LiSSA's minibatch generators and the power iteration (and the Lanczos start of exact's check),
            and the labels a CG preconditioner samples.
        progress: show a tqdm bar (LiSSA: ||x|| of the running estimate; CG: the largest relative residual).
        options: a :class:`LissaOptions` / :class:`CGOptions` / :class:`ExactOptions` or a dict of their fields;
            keyword arguments (``depth=...``) override it. ``preconditioner="kfac" | "ekfac" | "diagonal"`` (CG
            only) runs preconditioned CG: see :class:`CGOptions`.
        return_info: also return a dict of diagnostics (scale, steps, converged, residuals). CG's holds
            ``iterations``, ``hvps`` (operator products: iterations x vectors, every iteration multiplies all
            vectors at once), ``preconditioner``, ``preconditioner_fit_seconds`` (0 without one),
            ``preconditioner_blocks`` (which parameters got K-FAC / diagonal blocks) and
            ``preconditioner_apply_seconds``.
        callback: CG only: ``callback(iteration, x, relative_residual)`` after every iteration, with the iterate
            ``x [b, P]`` (the live tensor: read it, do not modify it) and the relative residuals ``[b]``. Returning
            ``True`` ends the solve there (``info["stopped_by_callback"]``, no max_iter warning; e.g. to stop at an
            accuracy measured against a reference); an exception it raises propagates.

    Returns:
        ``x`` with the shape of ``vectors`` (and the info dict when ``return_info``).
    """
    if not isinstance(operator, HessianOperator):
        missing = [a for a in ("matvec", "minibatch_matvec", "dense", "num_params", "num_samples", "dtype", "device")
                   if not hasattr(operator, a)]
        if missing:
            raise TypeError(f"operator must implement HessianOperator; {type(operator).__name__} lacks {missing}")
    if method not in _OPTIONS:
        raise ValueError(f"method must be one of {sorted(_OPTIONS)}, got {method!r}")
    damping = check_nonnegative(damping, "damping")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    opts = make_solver_options(method, options, method_options)
    if callback is not None and (method != "cg" or not callable(callback)):
        raise TypeError(f"callback must be a callable and is taken by method='cg' only, got "
                        f"{type(callback).__name__} with method={method!r}")
    if method in ("kfac", "ekfac"):
        return kfac_inverse_hvp(operator, vectors, method, damping=damping, seed=seed, progress=progress,
                                options=opts, return_info=return_info)
    V, single = check_vectors(vectors, num_params=operator.num_params, dtype=operator.dtype, device=operator.device)
    V = V.detach()  # the solve is not differentiated: a graph through the vectors would grow with every iteration
    if method == "exact":
        x, info = _exact(operator, V, damping, seed, opts)
    elif method == "cg":
        x, info = _cg(operator, V, damping, opts, progress, seed=seed, callback=callback)
    else:
        x, info = _lissa(operator, V, damping, seed, opts, progress)
    x = x[0] if single else x
    return (x, info) if return_info else x


# -- exact --------------------------------------------------------------------------------------------------------
# What method="exact" keeps between calls (ExactOptions.reuse_eigendecomposition): "last", (fingerprint, damping)
# of the most recent dense solve (a solve of that fingerprint at another damping switches to an eigendecomposition;
# at the same damping it repeats the Cholesky solve, bit for bit), and "decomposition",
# (fingerprint, w [P], Q [P, P]) of at most one operator, so at most one P x P matrix is ever held.
_EXACT_CACHE: dict = {}


def clear_exact_cache() -> None:
    """Free the eigendecomposition that ``method="exact"`` keeps for repeated solves (8 P^2 bytes)."""
    _EXACT_CACHE.clear()


def exact_solve_cost(num_params: int) -> str:
    """What a dense solve over ``num_params`` parameters costs, in words (memory, products, flops)."""
    P = num_params
    gib = 8 * P * P / 2**30
    return (f"a dense {P} x {P} float64 Hessian: {gib:.3g} GiB, {2 * gib:.3g} GiB at the peak of the solve "
            f"(H + damping I and its Cholesky factor), built from {P} Hessian-vector products, then "
            f"{P ** 3 / 3:.3g} flops for the factorisation")


def _fingerprint_or_none(op):
    fingerprint = getattr(op, "fingerprint", None)
    if fingerprint is None:
        return None
    try:
        return fingerprint()
    except (NotImplementedError, UnidentifiableCallableError):   # no fingerprint: nothing is kept for reuse
        return None


def _psd_by_construction(op) -> bool:
    """Whether ``op``'s H is positive semi-definite whatever the weights and data: a Gauss-Newton matrix, or the
    softmax cross-entropy Hessian of a linear head (the same matrix there). Its H + damping I can then fail a
    definiteness test only by rounding, or by damping 0 on a singular H."""
    return bool(getattr(op, "gauss_newton", False)) or isinstance(op, HeadHessian)


def _not_positive_definite(solver: str, evidence: str, op, damping: float, lam_min: float | None = None, *,
                           dtype: torch.dtype | None = None, note: str = "") -> ValueError:
    """The one refusal of an ``H + damping I`` that is not positive definite, for every solver (exact, CG, LiSSA):
    none of them returns the solution of such a system. ``evidence``: what showed it; ``lam_min``: the smallest
    eigenvalue of H (estimated or exact) when known; ``dtype``: the precision H was evaluated in (default: the
    operator's); ``note``: appended to the message."""
    if _psd_by_construction(op):
        # gauss_newton=True is already there: advising it (as for an indefinite H) would send the user in a circle
        what = "the Gauss-Newton matrix" if getattr(op, "gauss_newton", False) else "a linear head's CE Hessian"
        dtype = dtype or op.dtype
        singular = ", and with damping 0 a singular H stays singular" if damping == 0 else ""
        wider = ("Compute in float32 or float64 (convert the model and its data, e.g. model.float()), or raise"
                 if torch.finfo(dtype).bits < 32 else "Raise")
        fix = (f"H is {what}, positive semi-definite by construction, so this is rounding: products in {dtype} (eps "
               f"{torch.finfo(dtype).eps:.2g}) lose the curvature below about eps x its largest eigenvalue{singular}. "
               f"{wider} damping well above that level")
    else:
        above = f" above {-lam_min:.4g}" if lam_min is not None and lam_min < 0 else ""
        fix = f"raise damping{above}, or use gauss_newton=True (the Gauss-Newton matrix is positive semi-definite)"
        if solver != "method='exact'":
            fix += "; method='exact' reports the smallest eigenvalue"
    return ValueError(f"{solver}: H + damping I is not positive definite ({evidence}, damping={damping}); {fix}{note}")


def _check_curvature(solver: str, op, lam_min: float, lam_max: float | None, damping: float, steps: int, where: str,
                     note: str = "") -> None:
    """Refuse when a Lanczos estimate ``lam_min`` of lambda_min(H) shows H + damping I indefinite. The smallest Ritz
    value bounds lambda_min from above (in exact arithmetic), so a clearly negative one is real negative curvature:
    LiSSA's recursion would grow along it and stop with a plausible-looking wrong answer."""
    width = max(abs(lam_min), abs(lam_max or 0.0), damping)
    # below this the negative value is at the rounding level of the products (a singular PSD H with damping 0)
    if lam_min + damping >= -1e3 * torch.finfo(op.dtype).eps * width:
        return
    raise _not_positive_definite(solver, f"smallest eigenvalue about {lam_min + damping:.4g} by a {steps}-step "
                                 f"Lanczos run on {where}", op, damping, lam_min, note=note)


_EXACT_PRECHECK_STEPS = 30


def _exact_precheck(op, damping: float, seed: int) -> None:
    """Refuse a clearly indefinite H + damping I before the P products of the dense build, from a Lanczos estimate
    on the full data (_EXACT_PRECHECK_STEPS products of one vector). Skipped where it cannot pay: H positive
    semi-definite by construction, or P within the step count. The dense solve checks the exact eigenvalues in any
    case; this only refuses earlier."""
    if _psd_by_construction(op) or op.num_params <= _EXACT_PRECHECK_STEPS:
        return
    _, lam_min, steps = _spectrum(op, batch_size=op.num_samples, seed=seed, iters=_EXACT_PRECHECK_STEPS, probes=1,
                                  want_max=False, want_min=True)
    _check_curvature("method='exact'", op, lam_min, None, damping, steps, "the full-data Hessian",
                     " (estimated before building the dense H)")


def _definite_minimum(w: torch.Tensor, damping: float, op) -> float:
    """The smallest eigenvalue of ``H + damping I`` from the eigenvalues ``w [P]`` (float64) of H. Raises the
    solvers' shared refusal when it is negative beyond rounding, and a ValueError when it is at the rounding level
    (a singular system: no unique solution)."""
    smallest = float(w.min()) + damping
    # the rounding level of the eigenvalues of a float64 matrix of this size and norm (numpy's matrix_rank rule)
    tol = w.shape[0] * torch.finfo(torch.float64).eps * max(float(w.abs().max()), damping)
    if smallest < -tol:
        raise _not_positive_definite("method='exact'", f"its smallest eigenvalue is {smallest:.4g}", op, damping,
                                     float(w.min()), dtype=torch.float64)
    if smallest <= tol:
        raise ValueError(
            f"method='exact': H + damping I is singular (its smallest |eigenvalue| is {abs(smallest):.3g}, at the "
            f"rounding level {tol:.3g} of a {w.shape[0]} x {w.shape[0]} float64 matrix; damping={damping}): the "
            "solution is not unique. Give damping > 0 (or more weight decay)")
    return smallest


def _eig_solve(w, Q, B, damping):
    """``(Q diag(w) Q^T + damping I)^{-1} B`` for ``B [P, b]``, w + damping checked by :func:`_definite_minimum`."""
    return Q @ ((Q.T @ B) / (w + damping)[:, None])


def _exact(op, V, damping, seed, opts: ExactOptions):
    """Solve with ONE Cholesky factorisation for all b vectors (an eigendecomposition when it is kept for reuse, or
    when a definite H + damping I fails to factor). ``V [b, P]`` -> ``[b, P]`` in V's dtype."""
    P = op.num_params
    if P > opts.max_exact_params:
        raise ValueError(
            f"method='exact' needs {exact_solve_cost(P)}; P={P} exceeds max_exact_params={opts.max_exact_params}. "
            "Use method='cg' (full-data, deterministic, no P x P matrix) or 'lissa' (stochastic, scales to any P), "
            "or raise max_exact_params if memory allows")
    fp = _fingerprint_or_none(op) if opts.reuse_eigendecomposition else None
    info = {"method": "exact", "num_params": P}
    kept = _EXACT_CACHE.get("decomposition")
    if fp is not None and kept is not None and kept[0] == fp:
        w, Q = kept[1], kept[2]
        lam_min = _definite_minimum(w, damping, op)
        x = _eig_solve(w, Q, V.T.to(device=Q.device, dtype=torch.float64), damping)
        info.update(factorisation="eigh", reused=True, min_eigenvalue=lam_min)
        return x.T.to(device=V.device, dtype=V.dtype), info
    _exact_precheck(op, damping, seed)
    H = op.dense()
    if not bool(torch.isfinite(H).all()):
        raise not_finite_error("method='exact' (the dense Hessian)")
    B = V.T.to(device=H.device, dtype=torch.float64)                       # [P, b]; any strides
    last = _EXACT_CACHE.get("last")
    if fp is not None and last is not None and last[0] == fp and last[1] != damping:
        w, Q = torch.linalg.eigh(H.to(torch.float64))
        del H
        _EXACT_CACHE.clear()                                               # the old matrix goes before a new one stays
        _EXACT_CACHE.update(decomposition=(fp, w, Q), last=(fp, damping))
        lam_min = _definite_minimum(w, damping, op)
        x = _eig_solve(w, Q, B, damping)
        info.update(factorisation="eigh", reused=False, min_eigenvalue=lam_min)
        return x.T.to(device=V.device, dtype=V.dtype), info
    if fp is not None:
        _EXACT_CACHE["last"] = (fp, damping)
    A = H.to(torch.float64, copy=True)     # never modify what dense() returned: an operator may keep it
    del H
    A.diagonal().add_(damping)
    L, failed = torch.linalg.cholesky_ex(A)
    x = None
    if int(failed) == 0:
        # A singular PSD matrix can factor with a rounding-level pivot and give a huge, finite x; its residual
        # against B gives it away (about eps * cond(A) ||B|| for a solvable system, order ||B|| for a singular one)
        x = torch.cholesky_solve(B, L)
        if not float((A @ x - B).norm()) <= 1e-4 * float(B.norm()):
            x = None
    del L
    if x is not None:
        info.update(factorisation="cholesky", reused=False)
    else:
        # not (numerically) positive definite: an indefinite or singular system is refused with its smallest
        # eigenvalue; a definite one that failed to factor (condition number near 1 / eps) is solved by eigh
        w, Q = torch.linalg.eigh(A)
        del A
        lam_min = _definite_minimum(w - damping, damping, op)
        x = _eig_solve(w, Q, B, 0.0)
        info.update(factorisation="eigh", reused=False, min_eigenvalue=lam_min)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"method='exact': H + damping I is too ill-conditioned for float64 (damping={damping}); "
                         "add damping > 0")
    return x.T.to(device=V.device, dtype=V.dtype), info


# -- conjugate gradients ----------------------------------------------------------------------------------------------
def _cg(op, V, damping, opts: CGOptions, progress, *, seed: int = 0, callback=None):
    """(Preconditioned) conjugate gradients, batched over the b vectors of ``V [b, P]``.

    With ``M^{-1}`` the preconditioner's inverse (the identity without one), the classical recursion
    ``z = M^{-1} r, beta = (r, z)_new / (r, z), p = z + beta p``; the stopping rule ``||r|| / ||v|| <= tol`` and the
    refusals are the same either way (r is always the residual of ``(H + damping I) x = v`` itself)."""
    def A(X):
        return op.matvec(X) + damping * X if damping else op.matvec(X)

    precondition, fit_s, blocks, name = None, 0.0, None, opts.preconditioner
    if name is not None:
        from iaerf.hessian.preconditioners import CurvaturePreconditioner

        fitted = CurvaturePreconditioner(op, name, fisher=opts.preconditioner_fisher,
                                         batch_size=opts.preconditioner_batch_size, seed=seed, progress=progress)
        precondition, fit_s, blocks = fitted.inverse(damping), fitted.fit_seconds, fitted.blocks
    apply_s = 0.0

    def preconditioned(R):
        nonlocal apply_s
        if precondition is None:
            return R
        t0 = time.perf_counter()
        Z = precondition(R)
        apply_s += time.perf_counter() - t0
        return Z

    tiny = torch.finfo(V.dtype).tiny
    x = torch.zeros_like(V)
    r = V.clone()
    z = preconditioned(r)
    p = z.clone()
    rs = (r * r).sum(1)
    rz = rs if precondition is None else (r * z).sum(1)
    vnorm = rs.sqrt()
    active = vnorm > 0
    relres = torch.zeros_like(vnorm)
    it, stopped = 0, False
    with progress_bar(total=opts.max_iter, desc="CG" if name is None else f"PCG ({name})", enabled=progress) as bar:
        while bool(active.any()) and it < opts.max_iter:
            Ap = A(p)
            pAp = (p * Ap).sum(1)
            # NaN fails every comparison: without this it would pass the test below and end the run "converged"
            if not bool(torch.isfinite(pAp).all()):
                raise not_finite_error(f"CG (iteration {it})")
            if bool((pAp[active] <= 0).any()):
                raise _not_positive_definite("CG", f"p^T A p <= 0 at iteration {it}", op, damping)
            alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
            x += alpha[:, None] * p
            r -= alpha[:, None] * Ap
            rs_new = (r * r).sum(1)
            relres = rs_new.sqrt() / vnorm.clamp_min(tiny)
            active = active & (relres > opts.tol)
            if precondition is None:
                z, rz_new = r, rs_new
            else:
                z = preconditioned(r)
                rz_new = (r * z).sum(1)
                if not bool(torch.isfinite(rz_new).all()):
                    raise not_finite_error(f"CG's preconditioner {name!r} (iteration {it})")
            beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
            it += 1
            bar.update(1)
            bar.set_postfix(rel_residual=f"{float(relres.max()):.2e}", refresh=False)
            if callback is not None and callback(it, x, relres) is True:
                stopped = True
                break
    converged = not bool(active.any())
    if not converged and not stopped:
        warnings.warn(f"CG stopped after max_iter={opts.max_iter} iterations with relative residual "
                      f"{float(relres.max()):.3e} > tol={opts.tol}; raise max_iter or damping", RuntimeWarning, stacklevel=3)
    return x, {"method": "cg", "iterations": it, "converged": converged, "relative_residual": relres.tolist(),
               "hvps": it * V.shape[0], "preconditioner": name, "preconditioner_fit_seconds": fit_s,
               "preconditioner_blocks": blocks, "preconditioner_apply_seconds": apply_s,
               "stopped_by_callback": stopped}


# -- LiSSA ------------------------------------------------------------------------------------------------------
def _derived_seed(*key: int) -> int:
    """A 63-bit seed for (seed, stream, ...) that is decorrelated across streams (numpy SeedSequence)."""
    # shift a Python int: numpy 1.x promotes np.uint64 >> int to float64 and refuses the shift
    return int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _rank(op) -> int:
    if getattr(op, "process_group", None) is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(op.process_group)


def _spectrum(op: HessianOperator, *, batch_size: int, seed: int, iters: int, probes: int, want_max: bool,
              want_min: bool) -> tuple[float | None, float | None, int]:
    """Extreme-eigenvalue estimates from one batched product per iteration.

    The same ``probes`` minibatches of ``batch_size`` local examples (or the full data when a minibatch holds it)
    serve both estimates. ``want_max``: power iteration on each minibatch Hessian, the largest ||H_B u|| (the LiSSA
    step uses one H_B at a time, so the scale must bound each). ``want_min``: Lanczos on their mean (the full-data
    Hessian when full), whose smallest Ritz value bounds lambda_min from above (in exact arithmetic), so a clearly
    negative one is real negative curvature of that mean. Returns
    ``(lambda_max or None, lambda_min or None, Lanczos steps)``.
    """
    P = op.num_params
    n_local = getattr(op, "num_local_samples", op.num_samples)
    gen = torch.Generator().manual_seed(_derived_seed(seed, 0x5CA1E, _rank(op)))
    full = batch_size >= op.num_samples
    k = 1 if full else probes
    U = torch.randn(k, 1, P, generator=torch.Generator().manual_seed(_derived_seed(seed, 0x5CA1F)),
                    dtype=torch.float64).to(op.dtype).to(op.device)
    idx = None if full else torch.randint(n_local, (k, batch_size), generator=gen).to(op.device)
    q = torch.randn(P, generator=torch.Generator().manual_seed(_derived_seed(seed, 0x1A2C)), dtype=torch.float64)
    q = (q / q.norm()).to(op.device)
    q_prev, beta = torch.zeros_like(q), 0.0
    alphas, betas = [], []
    lanczos = want_min
    norms = None
    for _ in range(iters):
        parts = []
        if want_max:
            U = U / U.norm(dim=2, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
            parts.append(U)
        if lanczos:
            parts.append(q.to(op.dtype).expand(k, 1, P))
        if not parts:
            break
        X = torch.cat(parts, dim=1)
        HX = op.matvec(X[0])[None] if full else op.minibatch_matvec(X.contiguous(), idx)
        if not bool(torch.isfinite(HX).all()):
            raise not_finite_error("the spectrum estimate (power iteration / Lanczos)")
        if want_max:
            U = HX[:, :1]
            norms = U.norm(dim=2)[:, 0].double().cpu()
        if lanczos:
            w = HX[:, -1].double().mean(0)
            alpha = float(w @ q)
            w = w - alpha * q - beta * q_prev
            w = w - (w @ q) * q          # one local re-orthogonalisation keeps the extreme Ritz values clean
            alphas.append(alpha)
            beta = float(w.norm())
            if beta <= 1e-10 * max(abs(a) for a in alphas):
                lanczos = False           # invariant subspace: the Ritz values are exact eigenvalues
            else:
                betas.append(beta)
                q_prev, q = q, w / beta
    lam_max = float(norms.max()) if want_max else None
    lam_min = None
    if want_min:
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
        lam_min = float(torch.linalg.eigvalsh(T)[0])
    return lam_max, lam_min, len(alphas)


def estimate_lambda_max(op: HessianOperator, *, batch_size: int, seed: int = 0, iters: int = 30, probes: int = 8) -> float:
    """Largest |eigenvalue| of the minibatch Hessians (or of the full-data one when a minibatch holds all data).

    ``probes`` minibatches of ``batch_size`` local examples are fixed, and power iteration runs on all of them
    at once (one batched ``minibatch_matvec`` per iteration); returns the largest ||H_B u|| with ||u|| = 1.
    """
    return _spectrum(op, batch_size=batch_size, seed=seed, iters=iters, probes=probes, want_max=True,
                     want_min=False)[0]


def _ranks_agree(op, step: int) -> bool:
    """Whether every rank of the operator's process group resumes from the same step (-1: no checkpoint)."""
    import torch.distributed as dist

    t = torch.tensor([float(step), -float(step)], dtype=torch.float64,
                     device=collective_device(op.process_group, op.device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=op.process_group)
    return float(t[0]) == -float(t[1])


_CHECKPOINT_FORMAT = "iaerf-lissa-checkpoint/3"
# the options that do not change the returned value of a run that reaches them
_RESUMABLE_OPTIONS = ("depth", "checkpoint_path", "checkpoint_every")


def _checkpoint_key(op, V, damping, seed, opts: LissaOptions) -> dict:
    """Everything a LiSSA solution depends on: the operator (settings, parameter and data digests), the solver
    settings, and a digest of the right-hand sides."""
    fingerprint = getattr(op, "fingerprint", None)
    try:
        if fingerprint is None:
            raise NotImplementedError
        op_fp = fingerprint()
    except NotImplementedError:
        raise ValueError(
            f"checkpoint_path needs operator.fingerprint() (a digest of what H depends on), so that a checkpoint "
            f"written for another operator is never resumed; {type(op).__name__} does not implement it") from None
    solver = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in _RESUMABLE_OPTIONS}
    solver.update(damping=damping, seed=seed, rank=_rank(op), num_vectors=V.shape[0], dtype=str(V.dtype))
    return {"operator": op_fp["operator"], "parameters": op_fp["parameters"], "data": op_fp["data"],
            "solver": solver, "vectors": named_digest([("v", V)])}


_KEY_PARTS = {"operator": "operator settings", "parameters": "parameter values", "data": "training data",
              "solver": "solver settings", "vectors": "right-hand sides (vectors)"}


def _key_differences(old, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["fingerprint (missing: written by an older iaerf)"]
    out = []
    for part, label in _KEY_PARTS.items():
        a, b = old.get(part), new[part]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            label = f"{label} ({'; '.join(changed)[:300]})"
        out.append(label)
    return out


def _checkpoint_problem(state, key: dict, h_shape: tuple, repeats: int, depth: int) -> str | None:
    """Why ``state`` (as loaded) cannot be resumed for ``key``, or None when it can."""
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        return "not a LiSSA checkpoint of this iaerf version"
    diff = _key_differences(state.get("key"), key)
    if diff:
        return "it was written for other " + ", ".join(diff)
    h, gens, steps, norms = state.get("h"), state.get("gen_states"), state.get("norm_steps"), state.get("norms")
    step, scale = state.get("step"), state.get("scale")
    if not (isinstance(h, torch.Tensor) and tuple(h.shape) == h_shape and h.is_floating_point()
            and bool(torch.isfinite(h).all())):
        return f"its iterate is not a finite {list(h_shape)} tensor"
    if not (isinstance(gens, list) and len(gens) == repeats
            and all(isinstance(g, torch.Tensor) and g.dtype == torch.uint8 for g in gens)):
        return f"it does not hold {repeats} generator states"
    if not (isinstance(step, int) and 0 <= step and isinstance(scale, float) and 0 < scale < float("inf")
            and isinstance(state.get("converged"), bool)):
        return "its step, scale or converged entries are invalid"
    if not (isinstance(steps, torch.Tensor) and isinstance(norms, torch.Tensor) and steps.dim() == 1
            and tuple(norms.shape) == (steps.shape[0],) + h_shape[:2] and steps.shape[0] >= 1):
        return "its norm history is invalid"
    for name, shape in (("estimate", h_shape[1:2]), ("change", h_shape[:2])):
        t = state.get(name, "missing")
        if not (t is None or isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == torch.float64):
            return f"its {name} entry is not None or a float64 {list(shape)} tensor"
    if step > depth:
        return f"it is at step {step}, beyond depth={depth}"
    return None


def _load_checkpoint(path, key: dict, h_shape: tuple, repeats: int, depth: int):
    """The resumable state saved at ``path``, or None (with a warning naming the file and the reason) when there is
    none that applies; a rejected file is overwritten by the next save."""
    if path is None or not os.path.exists(path):
        return None
    try:
        # weights_only: a crafted file cannot run code; the checksum: a flipped bit is not resumed
        state = load_checked(path, "LiSSA checkpoint")
    except ValueError as exc:
        why = str(exc)
    except OSError as exc:  # torch's zip reader reports a truncated file as EINVAL
        why = f"cannot read LiSSA checkpoint {path} ({type(exc).__name__}: {exc.strerror or exc})"
    else:
        why = _checkpoint_problem(state, key, h_shape, repeats, depth)
        if why is None:
            return state
        why = f"LiSSA checkpoint {path}: {why}"
    warnings.warn(f"{why}; starting afresh (the file will be overwritten)", RuntimeWarning, stacklevel=5)
    return None


# Automatic LiSSA settings (the None fields of LissaOptions; see its docstring for the rule)
_AUTO_FULL_DATA_MAX = 4096
_AUTO_BATCH = 512
_AUTO_MINIBATCH_REPEATS = 4
_AUTO_MIN_DEPTH, _AUTO_MAX_DEPTH = 1000, 20000
_NOISE_FACTOR = 3.0


def _auto_sampling(opts: LissaOptions, n: int) -> tuple[int, int]:
    """``(batch_size, repeats)`` with the automatic ones filled in, for n (global) training examples."""
    m = opts.batch_size if opts.batch_size is not None else (n if n <= _AUTO_FULL_DATA_MAX else _AUTO_BATCH)
    r = opts.repeats if opts.repeats is not None else (1 if m >= n else _AUTO_MINIBATCH_REPEATS)
    return m, r


def _curvature_floor(op, lam_min, damping) -> float | None:
    """A lower bound mu of lambda_min(H + damping I), or None when there is none above 0. A convex loss's H is at
    least its weight decay; a Lanczos estimate below that is negative loss curvature, and then the estimate (an
    upper bound in exact arithmetic, so not a guarantee) is the best available."""
    wd = float(getattr(op, "weight_decay", 0.0) or 0.0)
    floor = wd if wd > 0 and (lam_min is None or lam_min >= wd) else (lam_min if lam_min is not None else 0.0)
    mu = floor + damping
    return mu if mu > 0 else None


def _auto_depth(scale: float, mu, target: float) -> int:
    if mu is None:
        return _AUTO_MAX_DEPTH
    steps = math.ceil(3 * scale / mu * math.log(1 / target))
    return int(min(_AUTO_MAX_DEPTH, max(_AUTO_MIN_DEPTH, steps)))


def _estimated_error(h, delta, step, scale, mu, full) -> torch.Tensor:
    """Estimated relative error ``||x - x*|| / ||x*||`` per vector (``[b]``, float64, inf when unknown) of
    ``x = mean_r h / scale`` from the iterate ``h [r, b, P]`` at ``step`` and its last increment norms ``delta [r, b]``.

    Truncation: with full-data products ``x* - x_j = A^-1 (I - A / scale) (h_j - h_(j-1))``, at most
    ``(1 - mu / scale) / mu * ||h_j - h_(j-1)||``; with minibatches the mean iterate follows the same series, whose
    relative remainder is at most ``(1 - mu / scale)^(j+1)``. Noise: _NOISE_FACTOR standard errors of the mean over
    the repeats (unknown with one repeat)."""
    hbar = h.mean(0)
    hnorm = hbar.norm(dim=1).double().cpu().clamp_min(torch.finfo(torch.float64).tiny)      # scale * ||x_j||
    b = hnorm.shape[0]
    if mu is None:
        return torch.full((b,), math.inf, dtype=torch.float64)
    if full:
        t = (scale / mu - 1.0) * delta[0] / hnorm
    else:
        t = torch.full((b,), (1.0 - mu / scale) ** (step + 1), dtype=torch.float64)
        r = h.shape[0]
        if r == 1:
            return torch.full((b,), math.inf, dtype=torch.float64)
        spread = ((h - hbar) ** 2).sum(dim=(0, 2)).double().cpu() / (r - 1)
        t = t + _NOISE_FACTOR * (spread / r).sqrt() / hnorm
    # relative to ||x*|| >= ||x_j|| - ||x* - x_j||
    return torch.where(t < 1, t / (1 - t), torch.full_like(t, math.inf))


def _lissa(op, V, damping, seed, opts: LissaOptions, progress):
    n_local = getattr(op, "num_local_samples", op.num_samples)
    m, r = _auto_sampling(opts, op.num_samples)
    auto_depth = opts.depth is None
    # A minibatch as large as the local data is the data itself: the products are exact full-data ones and the
    # recursion is the deterministic Neumann series of (H + damping I)^{-1} (no resampling noise).
    full = m >= op.num_samples  # global n: every rank takes the same branch
    h_shape = (1 if full else r, V.shape[0], op.num_params)
    path = None if opts.checkpoint_path is None else os.fspath(opts.checkpoint_path)
    key = _checkpoint_key(op, V, damping, seed, opts) if path is not None else None
    if path is not None and getattr(op, "process_group", None) is not None:
        path = f"{path}.rank{_rank(op)}"            # one file per rank: each holds its own generator states
    state = _load_checkpoint(path, key, h_shape, r, _AUTO_MAX_DEPTH if auto_depth else opts.depth)
    if getattr(op, "process_group", None) is not None and not _ranks_agree(op, -1 if state is None else int(state["step"])):
        warnings.warn("LiSSA checkpoints of the ranks are at different steps (interrupted between writes); "
                      "starting afresh on every rank", RuntimeWarning, stacklevel=3)
        state = None
    # One CPU generator per repeat, derived from (seed, repeat index, rank): repeat j draws the same minibatches
    # whether it runs alone or batched with others, and results do not depend on the device.
    gens = [torch.Generator().manual_seed(_derived_seed(seed, opts.first_repeat + j, _rank(op))) for j in range(r)]
    vnorm = V.norm(dim=1).double().cpu().clamp_min(torch.finfo(torch.float64).tiny)
    if state is not None:
        scale, step, converged = float(state["scale"]), int(state["step"]), bool(state["converged"])
        lam, lam_min = state.get("lambda_max"), state.get("lambda_min")
        h = state["h"].to(device=V.device, dtype=V.dtype)
        for g, s in zip(gens, state["gen_states"]):
            g.set_state(s)
        history = dict(zip(state["norm_steps"].tolist(), state["norms"].double()))
        # a finished run resumes without a step: its last check's estimates are what it reports
        estimate, change = state["estimate"], state["change"]
    else:
        lam, lam_min, lanczos_steps = _spectrum(op, batch_size=m, seed=seed, iters=opts.power_iters,
                                                probes=opts.power_probes, want_max=opts.scale is None,
                                                want_min=opts.check_curvature)
        if lam_min is not None:
            where = "the full-data Hessian" if full else (f"the mean of {opts.power_probes} minibatch Hessians of "
                                                          f"{m} examples")
            _check_curvature("LiSSA", op, lam_min, lam, damping, lanczos_steps, where,
                             " (check_curvature=False skips this check)")
        if opts.scale is not None:
            scale = float(opts.scale)
        else:
            scale = opts.scale_margin * (lam + damping)
            if not scale > 0:
                raise ValueError("the Hessian products are all zero (lambda_max = 0) and damping = 0: "
                                 "H is singular; give damping > 0")
        step, converged = 0, False
        # h_0 = v for every repeat; full-data repeats would all be identical, so one is run
        h = V.unsqueeze(0).repeat(h_shape[0], 1, 1)
        history = {0: vnorm.expand(h_shape[:2]).clone()}
        estimate, change = None, None
    d = damping / scale
    v = V.unsqueeze(0)
    eps = torch.finfo(V.dtype).eps
    mu = _curvature_floor(op, lam_min, damping)
    depth = _auto_depth(scale, mu, opts.target_error) if auto_depth else opts.depth

    def checkpoint():
        if path is not None:
            steps = sorted(history)
            state = {"format": _CHECKPOINT_FORMAT, "key": key, "h": h.detach().cpu(), "step": step,
                     "scale": scale, "converged": converged, "gen_states": [g.get_state() for g in gens],
                     "lambda_max": lam, "lambda_min": lam_min, "norm_steps": torch.tensor(steps, dtype=torch.long),
                     "norms": torch.stack([history[s] for s in steps]), "estimate": estimate, "change": change}
            save_checked(path, state)   # with its checksum: torch.load does not check the zip CRCs

    with progress_bar(total=depth, initial=min(step, depth), desc="LiSSA", enabled=progress) as bar:
        while step < depth and not converged:
            if full:
                Hh = op.matvec(h[0])[None]
            else:
                idx = torch.stack([torch.randint(n_local, (m,), generator=g) for g in gens]).to(V.device)
                Hh = op.minibatch_matvec(h, idx)
            h_new = v + (1.0 - d) * h - Hh / scale
            step += 1
            # every step, in one sync (the operator already syncs on its own input check): a NaN product must be
            # reported as such, not as the operator refusing a NaN iterate on the next step
            finite_product, finite_h = torch.stack([torch.isfinite(Hh).all(), torch.isfinite(h_new).all()]).tolist()
            if not finite_product:
                raise not_finite_error(f"LiSSA (step {step})")
            if not finite_h:
                raise LissaDivergenceError(
                    f"LiSSA's iterate overflowed at step {step} (scale={scale:.4g}, damping={damping}): the update is "
                    "not a contraction; raise scale (or leave scale=None) or damping")
            if step % opts.check_every == 0 or step == depth:
                hn = h_new.norm(dim=2).double().cpu()                       # [r, b]
                delta = (h_new - h).norm(dim=2).double().cpu()
                _check_growth(history, step, hn, delta, vnorm, full, eps, scale, lam, damping, opts)
                history[step] = hn
                change = delta / hn.clamp_min(torch.finfo(torch.float64).tiny)
                if opts.tol > 0:
                    converged = bool((change <= opts.tol).all())
                estimate = _estimated_error(h_new, delta, step, scale, mu, full)
                if auto_depth:
                    # with minibatches only the truncation shrinks with depth: stop once it is below the target
                    # and the noise, whatever it is, cannot be reduced by going on
                    bound = estimate if full else torch.full_like(estimate, (1.0 - mu / scale) ** (step + 1)
                                                                  if mu is not None else math.inf)
                    converged = converged or bool((bound <= (1.0 if full else 0.5) * opts.target_error).all())
                bar.set_postfix(norm_x=f"{float(hn.mean()) / scale:.4g}", refresh=False)
            h = h_new
            bar.update(1)
            if step % opts.checkpoint_every == 0:
                checkpoint()
    checkpoint()
    x = h.mean(0) / scale
    if not bool(torch.isfinite(x).all()):
        raise LissaDivergenceError(f"LiSSA produced NaN/Inf (scale={scale:.4g}, damping={damping}); raise scale or damping")
    est = None if estimate is None or not bool(torch.isfinite(estimate).all()) else float(estimate.max())
    if auto_depth:
        if est is None or est > opts.target_error:
            why = ("the noise cannot be estimated from one repeat; give repeats >= 2" if not full and r == 1 else
                   "no lower bound of lambda_min(H + damping I) above 0 is known (weight decay and damping are 0); give "
                   "damping > 0" if mu is None else
                   f"after {step} steps the minibatch noise dominates, and depth does not reduce it" if not full else
                   f"it reached the automatic depth cap {depth} (kappa = scale / mu = {scale / mu:.3g})")
            shown = "unknown" if est is None else f"{est:.3g}"
            warnings.warn(
                f"LiSSA's estimated relative error is {shown}, above target_error={opts.target_error} ({why}; "
                f"batch_size={m} of n={op.num_samples}, repeats={r}). Raise batch_size (batch_size >= n makes "
                "the run deterministic), repeats or damping, or use method='cg'", LissaAccuracyWarning, stacklevel=3)
    elif not converged and opts.tol > 0:
        largest = f" (largest now {float(change.max()):.3g})" if change is not None else ""
        warnings.warn(
            f"LiSSA stopped at depth={depth} before the relative change ||h_j - h_(j-1)|| / ||h_j|| fell below "
            f"tol={opts.tol}{largest}, so the result may be far from (H + damping I)^-1 v (scale={scale:.4g}; a "
            "scale far above lambda_max slows convergence). Raise depth; with minibatches (batch_size < n) the "
            "change stays at the noise level, so raise repeats or batch_size, set tol=0 to accept a fixed depth, or "
            "use method='cg'", RuntimeWarning, stacklevel=3)
    return x, {"method": "lissa", "scale": scale, "steps": step, "converged": converged, "repeats": r, "full_batch": full,
               "batch_size": m, "depth": depth, "lambda_max": lam, "lambda_min": lam_min, "curvature_floor": mu,
               "estimated_error": est, "target_error": opts.target_error}


def _check_growth(history, step, hn, delta, vnorm, full, eps, scale, lam, damping, opts: LissaOptions):
    """Raise LissaDivergenceError when the iterate grows faster than a contraction can.

    Per eigendirection a contraction's partial sums satisfy |h_j| <= (j + 1) / (k + 1) |h_k| for k <= j, so h is
    compared with its norm at the checked step k nearest j / 2: geometric growth doubles that ratio's exponent
    every check, where the old bound 10 (j + 1) ||v|| let slow growth through for hundreds of steps. With the
    full-data product the increment h_j - h_(j-1) = (I - A / scale)^j v is the residual, which a contraction never
    lets exceed ||v|| (up to rounding of the subtraction).
    """
    k = max(s for s in history if s <= step // 2)
    limit = opts.growth_limit * (step + 1) / (k + 1) * history[k]
    grown = hn > limit
    if full:
        grown |= delta > vnorm * (1.01 + 10 * eps * (step + 1))
    if not bool(torch.isfinite(hn).all()) or bool(grown.any()):
        est = f", lambda_max estimate {lam:.4g}" if lam is not None else ""
        raise LissaDivergenceError(
            f"LiSSA diverged at step {step} (max ||h||/||v|| = {float((hn / vnorm).max()):.3g}, "
            f"scale={scale:.4g}{est}, damping={damping}): the update is not a contraction. Raise `scale` "
            "(or leave scale=None to pick it by power iteration) or raise `damping`; a non-convex model "
            "needs damping above its most negative eigenvalue, or gauss_newton=True")
