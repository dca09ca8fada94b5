"""What the inverse-HVP solvers share: seeds, spectrum estimates, and the one refusal of a system that is not
positive definite.

Every solver accepts the same systems: ``H + damping I`` positive definite, as at a minimum of the training
objective, which paper Eq. 7-9 linearise around. Each refuses any other with the same ValueError
(:func:`not_positive_definite`), from whatever evidence it has: CG when ``p^T A p <= 0``, LiSSA from a Lanczos
estimate (:func:`check_curvature`), exact from the eigenvalues, Arnoldi and Nystrom from their projected matrices.
"""
from __future__ import annotations

import numpy as np
import torch

from iaerf.core.identity import UnidentifiableCallableError
from iaerf.hessian._checks import not_finite_error
from iaerf.hessian.head_hessian import HeadHessian
from iaerf.hessian.operators import HessianOperator


def derived_seed(*key: int) -> int:
    """A 63-bit seed for (seed, stream, ...) that is decorrelated across streams (numpy SeedSequence)."""
    # shift a Python int: numpy 1.x promotes np.uint64 >> int to float64 and refuses the shift
    return int(np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0]) >> 1


def process_rank(op) -> int:
    """The rank of this process in the operator's process group (0 without one)."""
    if getattr(op, "process_group", None) is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(op.process_group)


def fingerprint_or_none(op) -> dict | None:
    """``op.fingerprint()``, or None for an operator that has none (nothing is then kept for reuse)."""
    fingerprint = getattr(op, "fingerprint", None)
    if fingerprint is None:
        return None
    try:
        return fingerprint()
    except (NotImplementedError, UnidentifiableCallableError):
        return None


def seeded_unit_vector(num_params: int, seed: int, stream: int, op) -> torch.Tensor:
    """``[P]`` float64 on the operator's device: a unit vector drawn from (seed, stream) on a CPU generator, so that
    the start does not depend on the device."""
    q = torch.randn(num_params, generator=torch.Generator().manual_seed(derived_seed(seed, stream)),
                    dtype=torch.float64)
    return (q / q.norm()).to(op.device)


def spectrum(op: HessianOperator, *, batch_size: int, seed: int, iters: int, probes: int, want_max: bool,
             want_min: bool) -> tuple[float | None, float | None, int, int]:
    """Extreme-eigenvalue estimates from one batched product per iteration.

    The same ``probes`` minibatches of ``batch_size`` local examples (or the full data when a minibatch holds it)
    serve both estimates. ``want_max``: power iteration on each minibatch Hessian, the largest ||H_B u|| (the LiSSA
    step uses one H_B at a time, so the scale must bound each). ``want_min``: Lanczos on their mean (the full-data
    Hessian when full), whose smallest Ritz value bounds lambda_min from above (in exact arithmetic), so a clearly
    negative one is real negative curvature of that mean. Returns
    ``(lambda_max or None, lambda_min or None, Lanczos steps, operator products per vector)``.
    """
    P = op.num_params
    n_local = getattr(op, "num_local_samples", op.num_samples)
    gen = torch.Generator().manual_seed(derived_seed(seed, 0x5CA1E, process_rank(op)))
    full = batch_size >= op.num_samples
    k = 1 if full else probes
    U = torch.randn(k, 1, P, generator=torch.Generator().manual_seed(derived_seed(seed, 0x5CA1F)),
                    dtype=torch.float64).to(op.dtype).to(op.device)
    idx = None if full else torch.randint(n_local, (k, batch_size), generator=gen).to(op.device)
    q = seeded_unit_vector(P, seed, 0x1A2C, op)
    q_prev, beta = torch.zeros_like(q), 0.0
    alphas, betas = [], []
    lanczos = want_min
    norms = None
    products = 0
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
        products += X.shape[0] * X.shape[1]
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
    return lam_max, lam_min, len(alphas), products


def estimate_lambda_max(op: HessianOperator, *, batch_size: int, seed: int = 0, iters: int = 30, probes: int = 8) -> float:
    """Largest |eigenvalue| of the minibatch Hessians (or of the full-data one when a minibatch holds all data).

    ``probes`` minibatches of ``batch_size`` local examples are fixed, and power iteration runs on all of them
    at once (one batched ``minibatch_matvec`` per iteration); returns the largest ||H_B u|| with ||u|| = 1.
    """
    return spectrum(op, batch_size=batch_size, seed=seed, iters=iters, probes=probes, want_max=True,
                    want_min=False)[0]


def psd_by_construction(op) -> bool:
    """Whether ``op``'s H is positive semi-definite whatever the weights and data: a Gauss-Newton matrix, or the
    softmax cross-entropy Hessian of a linear head (the same matrix there). Its H + damping I can then fail a
    definiteness test only by rounding, or by damping 0 on a singular H."""
    return bool(getattr(op, "gauss_newton", False)) or isinstance(op, HeadHessian)


def not_positive_definite(solver: str, evidence: str, op, damping: float, lam_min: float | None = None, *,
                          dtype: torch.dtype | None = None, note: str = "") -> ValueError:
    """The one refusal of an ``H + damping I`` that is not positive definite, for every solver: none of them
    returns the solution of such a system. ``evidence``: what showed it; ``lam_min``: the smallest eigenvalue of H
    (estimated or exact) when known; ``dtype``: the precision H was evaluated in (default: the operator's);
    ``note``: appended to the message."""
    if psd_by_construction(op):
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


def check_curvature(solver: str, op, lam_min: float, lam_max: float | None, damping: float, steps: int, where: str,
                    note: str = "") -> None:
    """Refuse when an estimate ``lam_min`` of lambda_min(H) (a Lanczos / Ritz value, an upper bound in exact
    arithmetic) shows H + damping I indefinite beyond the rounding level of the products: real negative curvature,
    along which an iterative solver would grow and stop with a plausible-looking wrong answer."""
    width = max(abs(lam_min), abs(lam_max or 0.0), damping)
    # below this the negative value is at the rounding level of the products (a singular PSD H with damping 0)
    if lam_min + damping >= -1e3 * torch.finfo(op.dtype).eps * width:
        return
    raise not_positive_definite(solver, f"smallest eigenvalue about {lam_min + damping:.4g} by a {steps}-step "
                                f"Lanczos run on {where}", op, damping, lam_min, note=note)
