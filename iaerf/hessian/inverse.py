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
  eigenvalue bounds the full-data one on average, lambda_max being convex).
- ``"cg"``: conjugate gradients on the full-data operator, batched over vectors, stopped at a relative residual.
- ``"exact"``: dense float64 solve; the reference for the others (small P only).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from iaerf._io import atomic_write
from iaerf.hessian._checks import check_nonnegative, check_vectors
from iaerf.hessian.operators import HessianOperator


class LissaDivergenceError(FloatingPointError):
    """LiSSA's iterate became non-finite or grew geometrically: the update is not a contraction."""


@dataclass
class LissaOptions:
    """Settings of the LiSSA solver.

    Attributes:
        depth: recursion steps (the paper uses 5000 on CIFAR, 2500 for classifier-only runs).
        repeats: independent runs averaged (the paper uses 10); all advance in one batched product per step.
        batch_size: examples per minibatch B_j (drawn with replacement from the local data); when it is at least
            the number of local examples, every step uses the full-data product instead (deterministic).
        scale: None = automatic (power iteration); otherwise must exceed lambda_max(H + damping I).
        tol: stop once the relative change ||h_j - h_{j-1}|| / ||h_j|| of every vector and repeat is below tol
            (0 disables; with small minibatches the change stays at the noise level and the run uses all of depth).
        first_repeat: index of the first repeat (its generator is derived from (seed, repeat index)), so repeats
            can be split over several calls or machines and averaged afterwards.
        scale_margin, power_iters, power_probes: the automatic scale is scale_margin * (lambda_max + damping),
            lambda_max the largest of power_probes minibatch estimates after power_iters iterations.
        growth_limit: divergence is declared when ||h_j|| > growth_limit * (j + 1) * ||v|| (a contraction keeps
            ||h_j|| <= (j + 1) ||v||), or when h is not finite.
        check_every: steps between divergence / tolerance checks and progress-bar updates.
        checkpoint_path, checkpoint_every: when a path is given, the state (h, step, generator states, settings)
            is written there atomically every checkpoint_every steps and at the end; a later call with the same
            settings and vectors resumes from it (a larger depth continues the run). Under a process group each
            rank writes ``<path>.rank<r>`` and the ranks resume only when all are at the same step.
    """

    depth: int = 1000
    repeats: int = 1
    batch_size: int = 256
    scale: float | None = None
    tol: float = 1e-6
    first_repeat: int = 0
    scale_margin: float = 1.1
    power_iters: int = 30
    power_probes: int = 8
    growth_limit: float = 10.0
    check_every: int = 10
    checkpoint_path: str | None = None
    checkpoint_every: int = 100

    def validate(self):
        for name in ("depth", "repeats", "batch_size", "power_iters", "power_probes", "check_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LiSSA option {name} must be a positive int, got {value!r}")
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


@dataclass
class CGOptions:
    """Conjugate gradients: stop when every vector's ||r|| / ||v|| <= tol, or after max_iter iterations."""

    tol: float = 1e-8
    max_iter: int = 1000

    def validate(self):
        if check_nonnegative(self.tol, "tol") <= 0:
            raise ValueError("CG option tol must be > 0")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"CG option max_iter must be a positive int, got {self.max_iter!r}")


@dataclass
class ExactOptions:
    """Dense solve in float64; refused above max_exact_params parameters (P x P float64 matrix)."""

    max_exact_params: int = 5000

    def validate(self):
        if isinstance(self.max_exact_params, bool) or not isinstance(self.max_exact_params, int) or self.max_exact_params < 1:
            raise ValueError(f"exact option max_exact_params must be a positive int, got {self.max_exact_params!r}")


_OPTIONS = {"lissa": LissaOptions, "cg": CGOptions, "exact": ExactOptions}


def _make_options(method: str, options, kwargs):
    cls = _OPTIONS[method]
    if options is None:
        fields = {}
    elif isinstance(options, cls):
        fields = dataclasses.asdict(options)
    elif isinstance(options, dict):
        fields = dict(options)
    else:
        raise TypeError(f"options for method={method!r} must be a {cls.__name__} or a dict, got {type(options).__name__}")
    fields.update(kwargs)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method={method!r}; known: {sorted(known)}")
    opts = cls(**fields)
    opts.validate()
    return opts


def inverse_hvp(operator: HessianOperator, vectors: torch.Tensor, method: str = "lissa", *, damping: float = 0.0,
                seed: int = 0, progress: bool = True, options=None, return_info: bool = False, **method_options):
    """Solve ``(H + damping I) x = v`` for a batch of vectors.

    Args:
        operator: a :class:`HessianOperator` (``H`` already includes its weight decay).
        vectors: ``[b, P]`` or ``[P]`` in the operator's dtype and device, finite.
        method: ``"lissa"``, ``"cg"`` or ``"exact"``.
        damping: >= 0, added to H (same meaning for every method).
        seed: seeds LiSSA's minibatch generators and the power iteration.
        progress: show a tqdm bar (LiSSA: ||x|| of the running estimate; CG: the largest relative residual).
        options: a :class:`LissaOptions` / :class:`CGOptions` / :class:`ExactOptions` or a dict of their fields;
            keyword arguments (``depth=...``) override it.
        return_info: also return a dict of diagnostics (scale, steps, converged, residuals).

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
    opts = _make_options(method, options, method_options)
    V, single = check_vectors(vectors, num_params=operator.num_params, dtype=operator.dtype, device=operator.device)
    if method == "exact":
        x, info = _exact(operator, V, damping, opts)
    elif method == "cg":
        x, info = _cg(operator, V, damping, opts, progress)
    else:
        x, info = _lissa(operator, V, damping, seed, opts, progress)
    x = x[0] if single else x
    return (x, info) if return_info else x


# -- exact --------------------------------------------------------------------------------------------------------
def _exact(op, V, damping, opts: ExactOptions):
    P = op.num_params
    if P > opts.max_exact_params:
        raise ValueError(
            f"method='exact' needs a dense {P} x {P} float64 Hessian ({P * P * 8 / 2**30:.2f} GiB) and P={P} exceeds "
            f"max_exact_params={opts.max_exact_params}; use method='cg' (full-data, deterministic) or 'lissa' "
            "(stochastic, scales to any P), or raise max_exact_params")
    H = op.dense().to(torch.float64)
    A = H + damping * torch.eye(P, dtype=torch.float64, device=H.device)
    try:
        x = torch.linalg.solve(A, V.to(torch.float64).T.to(A.device)).T
    except RuntimeError as exc:  # torch raises on exactly singular systems
        raise ValueError(f"H + damping I is singular (damping={damping}); add damping > 0") from exc
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"H + damping I is singular or too ill-conditioned (damping={damping}); add damping > 0")
    return x.to(V.dtype).to(V.device), {"method": "exact", "num_params": P}


# -- conjugate gradients ----------------------------------------------------------------------------------------------
def _cg(op, V, damping, opts: CGOptions, progress):
    from tqdm.auto import tqdm

    def A(X):
        return op.matvec(X) + damping * X if damping else op.matvec(X)

    x = torch.zeros_like(V)
    r = V.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    vnorm = rs.sqrt()
    active = vnorm > 0
    relres = torch.zeros_like(vnorm)
    it = 0
    with tqdm(total=opts.max_iter, desc="CG", disable=not progress, leave=False) as bar:
        while bool(active.any()) and it < opts.max_iter:
            Ap = A(p)
            pAp = (p * Ap).sum(1)
            if bool((pAp[active] <= 0).any()):
                raise ValueError(
                    f"CG: H + damping I is not positive definite (p^T A p <= 0 at iteration {it}, damping={damping}); "
                    "raise damping, use gauss_newton=True, or use method='exact' to inspect the spectrum")
            alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
            x += alpha[:, None] * p
            r -= alpha[:, None] * Ap
            rs_new = (r * r).sum(1)
            relres = rs_new.sqrt() / vnorm.clamp_min(torch.finfo(V.dtype).tiny)
            active = active & (relres > opts.tol)
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(V.dtype).tiny), torch.zeros_like(rs))
            p = r + beta[:, None] * p
            rs = rs_new
            it += 1
            bar.update(1)
            bar.set_postfix(rel_residual=f"{float(relres.max()):.2e}")
    converged = not bool(active.any())
    if not converged:
        warnings.warn(f"CG stopped after max_iter={opts.max_iter} iterations with relative residual "
                      f"{float(relres.max()):.3e} > tol={opts.tol}; raise max_iter or damping", RuntimeWarning, stacklevel=3)
    return x, {"method": "cg", "iterations": it, "converged": converged, "relative_residual": relres.tolist()}


# -- LiSSA ------------------------------------------------------------------------------------------------------
def _derived_seed(*key: int) -> int:
    """A 63-bit seed for (seed, stream, ...) that is decorrelated across streams (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rank(op) -> int:
    if getattr(op, "process_group", None) is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(op.process_group)


def estimate_lambda_max(op: HessianOperator, *, batch_size: int, seed: int = 0, iters: int = 30, probes: int = 8) -> float:
    """Largest |eigenvalue| of the minibatch Hessians (or of the full-data one when a minibatch holds all data).

    ``probes`` minibatches of ``batch_size`` local examples are fixed, and power iteration runs on all of them
    at once (one batched ``minibatch_matvec`` per iteration); returns the largest ||H_B u|| with ||u|| = 1.
    """
    n_local = getattr(op, "num_local_samples", op.num_samples)
    gen = torch.Generator().manual_seed(_derived_seed(seed, 0x5CA1E, _rank(op)))
    full = batch_size >= op.num_samples
    k = 1 if full else probes
    U = torch.randn(k, 1, op.num_params, generator=torch.Generator().manual_seed(_derived_seed(seed, 0x5CA1F)),
                    dtype=torch.float64).to(op.dtype).to(op.device)
    idx = None if full else torch.randint(n_local, (k, batch_size), generator=gen).to(op.device)
    norms = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        U = U / U.norm(dim=2, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
        HU = op.matvec(U[:, 0])[:, None] if full else op.minibatch_matvec(U, idx)
        norms = HU.norm(dim=2)[:, 0].double().cpu()
        if not bool(torch.isfinite(norms).all()):
            raise LissaDivergenceError("power iteration for the LiSSA scale produced NaN/Inf: the Hessian "
                                       "products are not finite (check the model, loss and data)")
        U = HU
    return float(norms.max())


def _ranks_agree(op, step: int) -> bool:
    """Whether every rank of the operator's process group resumes from the same step (-1: no checkpoint)."""
    import torch.distributed as dist

    from iaerf.hessian.operators import _collective_device

    t = torch.tensor([float(step), -float(step)], dtype=torch.float64,
                     device=_collective_device(op.process_group, op.device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=op.process_group)
    return float(t[0]) == -float(t[1])


def _lissa_settings(op, V, damping, seed, opts: LissaOptions) -> dict:
    return {"num_params": op.num_params, "num_samples": op.num_samples, "b": V.shape[0], "dtype": str(op.dtype),
            "repeats": opts.repeats, "first_repeat": opts.first_repeat, "batch_size": opts.batch_size,
            "scale_option": opts.scale, "scale_margin": opts.scale_margin, "damping": damping, "seed": seed,
            "rank": _rank(op)}


def _load_checkpoint(path, settings, V):
    if path is None or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("settings") != settings or not torch.equal(state["v"], V.detach().cpu()):
        warnings.warn(f"LiSSA checkpoint {path} was written with other settings or vectors; starting afresh "
                      "(it will be overwritten)", RuntimeWarning, stacklevel=4)
        return None
    return state


def _lissa(op, V, damping, seed, opts: LissaOptions, progress):
    from tqdm.auto import tqdm

    n_local = getattr(op, "num_local_samples", op.num_samples)
    r, m = opts.repeats, opts.batch_size
    # A minibatch as large as the local data is the data itself: the products are exact full-data ones and the
    # recursion is the deterministic Neumann series of (H + damping I)^{-1} (no resampling noise).
    full = m >= op.num_samples  # global n: every rank takes the same branch
    settings = _lissa_settings(op, V, damping, seed, opts)
    path = opts.checkpoint_path
    if path is not None and getattr(op, "process_group", None) is not None:
        path = f"{path}.rank{_rank(op)}"            # one file per rank: each holds its own generator states
    state = _load_checkpoint(path, settings, V)
    if getattr(op, "process_group", None) is not None and not _ranks_agree(op, -1 if state is None else int(state["step"])):
        warnings.warn("LiSSA checkpoints of the ranks are at different steps (interrupted between writes); "
                      "starting afresh on every rank", RuntimeWarning, stacklevel=3)
        state = None
    # One CPU generator per repeat, derived from (seed, repeat index, rank): repeat j draws the same minibatches
    # whether it runs alone or batched with others, and results do not depend on the device.
    gens = [torch.Generator().manual_seed(_derived_seed(seed, opts.first_repeat + j, _rank(op))) for j in range(r)]
    if state is not None:
        scale, step, converged = float(state["scale"]), int(state["step"]), bool(state["converged"])
        h = state["h"].to(device=V.device, dtype=V.dtype)
        for g, s in zip(gens, state["gen_states"]):
            g.set_state(s)
    else:
        if opts.scale is not None:
            scale = float(opts.scale)
            lam = None
        else:
            lam = estimate_lambda_max(op, batch_size=m, seed=seed, iters=opts.power_iters, probes=opts.power_probes)
            scale = opts.scale_margin * (lam + damping)
            if not scale > 0:
                raise ValueError("the Hessian products are all zero (lambda_max = 0) and damping = 0: "
                                 "H is singular; give damping > 0")
        step, converged = 0, False
        # h_0 = v for every repeat; full-data repeats would all be identical, so one is run
        h = V.unsqueeze(0).repeat(1 if full else r, 1, 1)
    d = damping / scale
    v = V.unsqueeze(0)
    vnorm = V.norm(dim=1).double().cpu().clamp_min(torch.finfo(torch.float64).tiny)

    def checkpoint():
        if path is not None:
            state = {"settings": settings, "v": V.detach().cpu(), "h": h.detach().cpu(), "step": step, "scale": scale,
                     "converged": converged, "gen_states": [g.get_state() for g in gens]}
            atomic_write(path, lambda tmp: torch.save(state, tmp))

    with tqdm(total=opts.depth, initial=min(step, opts.depth), desc="LiSSA", disable=not progress, leave=False) as bar:
        while step < opts.depth and not converged:
            if full:
                Hh = op.matvec(h[0])[None]
            else:
                idx = torch.stack([torch.randint(n_local, (m,), generator=g) for g in gens]).to(V.device)
                Hh = op.minibatch_matvec(h, idx)
            h_new = v + (1.0 - d) * h - Hh / scale
            step += 1
            if step % opts.check_every == 0 or step == opts.depth:
                hn = h_new.norm(dim=2).double().cpu()                       # [r, b]
                if not bool(torch.isfinite(hn).all()) or bool((hn > opts.growth_limit * (step + 1) * vnorm).any()):
                    raise LissaDivergenceError(
                        f"LiSSA diverged at step {step} (max ||h||/||v|| = {float((hn / vnorm).max()):.3g}, "
                        f"scale={scale:.4g}, damping={damping}): the update is not a contraction. Raise `scale` "
                        "(or leave scale=None to pick it by power iteration) or raise `damping`; a non-convex model "
                        "needs damping above its most negative eigenvalue, or gauss_newton=True")
                if opts.tol > 0:
                    change = (h_new - h).norm(dim=2).double().cpu() / hn.clamp_min(torch.finfo(torch.float64).tiny)
                    converged = bool((change <= opts.tol).all())
                bar.set_postfix(norm_x=f"{float(hn.mean()) / scale:.4g}")
            h = h_new
            bar.update(1)
            if step % opts.checkpoint_every == 0:
                checkpoint()
    checkpoint()
    x = h.mean(0) / scale
    if not bool(torch.isfinite(x).all()):
        raise LissaDivergenceError(f"LiSSA produced NaN/Inf (scale={scale:.4g}, damping={damping}); raise scale or damping")
    return x, {"method": "lissa", "scale": scale, "steps": step, "converged": converged, "repeats": r, "full_batch": full,
               "lambda_max": lam if state is None else None}
