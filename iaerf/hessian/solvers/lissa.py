"""``method="lissa"`` (Agarwal et al.; the original Koh & Liang convention, also dattri's): with d = damping / scale,

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
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch

from iaerf.core.distributed import collective_device
from iaerf.core.indexed_data import named_digest
from iaerf.core.store import load_checked, save_checked
from iaerf.core.progress import progress_bar
from iaerf.hessian._checks import check_nonnegative, not_finite_error
from iaerf.hessian.solvers.common import check_curvature, derived_seed, process_rank, spectrum
from iaerf.hessian.solvers.registry import Solver


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
    solver.update(damping=damping, seed=seed, rank=process_rank(op), num_vectors=V.shape[0], dtype=str(V.dtype))
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
    if not (isinstance(state.get("hvps", 0), int) and isinstance(state.get("seconds", 0.0), float)):
        return "its hvps or seconds entries are invalid"
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
    warnings.warn(f"{why}; starting afresh (the file will be overwritten)", RuntimeWarning, stacklevel=6)
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


class LissaSolver(Solver):
    """LiSSA (module docstring), ``V [b, P]`` -> ``[b, P]``. Info extras: ``steps`` (= ``iterations``), ``scale``,
    ``repeats``, ``full_batch``, ``batch_size``, ``depth``, ``lambda_max``, ``lambda_min``, ``curvature_floor``,
    ``estimated_error``, ``target_error``; ``hvps`` counts the setup's power iteration / Lanczos products and
    every step's products (repeats x vectors each), and ``seconds`` the compute time, of the whole run: a run
    resumed from a checkpoint adds this call's to what the checkpoint recorded."""

    name = "lissa"
    options_class = LissaOptions
    summary = ("stochastic Neumann series over minibatch products; automatic depth to a target error, checkpoints, "
               "scales to any P")

    def solve(self, operator, V, damping, options, *, seed, progress, callback=None):
        return _lissa(operator, V, damping, seed, options, progress)

    def with_storage(self, options, given, *, cache_dir, path_for):
        if "checkpoint_path" in given:
            return options
        # inverse_hvp appends ".rank<r>" under a process group: each rank keeps its own generator states
        return dataclasses.replace(options, checkpoint_path=path_for(".lissa.pt"))


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
        path = f"{path}.rank{process_rank(op)}"       # one file per rank: each holds its own generator states
    state = _load_checkpoint(path, key, h_shape, r, _AUTO_MAX_DEPTH if auto_depth else opts.depth)
    if getattr(op, "process_group", None) is not None and not _ranks_agree(op, -1 if state is None else int(state["step"])):
        warnings.warn("LiSSA checkpoints of the ranks are at different steps (interrupted between writes); "
                      "starting afresh on every rank", RuntimeWarning, stacklevel=4)
        state = None
    # One CPU generator per repeat, derived from (seed, repeat index, rank): repeat j draws the same minibatches
    # whether it runs alone or batched with others, and results do not depend on the device.
    gens = [torch.Generator().manual_seed(derived_seed(seed, opts.first_repeat + j, process_rank(op)))
            for j in range(r)]
    vnorm = V.norm(dim=1).double().cpu().clamp_min(torch.finfo(torch.float64).tiny)
    t0 = time.perf_counter()
    # the run's products and compute time over all its calls (a resumed run reports the whole run's)
    run_hvps, run_seconds = (0, 0.0) if state is None else (state.get("hvps", 0), state.get("seconds", 0.0))
    if state is not None:
        scale, step, converged = float(state["scale"]), int(state["step"]), bool(state["converged"])
        lam, lam_min = state.get("lambda_max"), state.get("lambda_min")
        h = state["h"].to(device=V.device, dtype=V.dtype)
        for g, s in zip(gens, state["gen_states"]):
            g.set_state(s)
        history = dict(zip(state["norm_steps"].tolist(), state["norms"].double()))
        # a finished run resumes without a step: its last check's estimates are what it reports
        estimate, change = state["estimate"], state["change"]
        setup_products = 0
    else:
        lam, lam_min, lanczos_steps, setup_products = spectrum(op, batch_size=m, seed=seed, iters=opts.power_iters,
                                                               probes=opts.power_probes, want_max=opts.scale is None,
                                                               want_min=opts.check_curvature)
        if lam_min is not None:
            where = "the full-data Hessian" if full else (f"the mean of {opts.power_probes} minibatch Hessians of "
                                                          f"{m} examples")
            check_curvature("LiSSA", op, lam_min, lam, damping, lanczos_steps, where,
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
    first_step = step
    v = V.unsqueeze(0)
    eps = torch.finfo(V.dtype).eps
    mu = _curvature_floor(op, lam_min, damping)
    depth = _auto_depth(scale, mu, opts.target_error) if auto_depth else opts.depth

    def totals() -> tuple[int, float]:
        """(operator products, seconds) of the whole run so far; a call that resumes a finished run adds none."""
        if state is not None and step == first_step:
            return run_hvps, run_seconds
        return (run_hvps + setup_products + (step - first_step) * h_shape[0] * h_shape[1],
                run_seconds + time.perf_counter() - t0)

    def checkpoint(spent=None):
        """Save the state; ``spent``: the run's (products, seconds) to record, default the totals now."""
        if path is not None:
            steps = sorted(history)
            state = {"format": _CHECKPOINT_FORMAT, "key": key, "h": h.detach().cpu(), "step": step,
                     "scale": scale, "converged": converged, "gen_states": [g.get_state() for g in gens],
                     "lambda_max": lam, "lambda_min": lam_min, "norm_steps": torch.tensor(steps, dtype=torch.long),
                     "norms": torch.stack([history[s] for s in steps]), "estimate": estimate, "change": change}
            state["hvps"], state["seconds"] = spent if spent is not None else totals()
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
    hvps, seconds = totals()     # once: the checkpoint records what this call reports
    checkpoint((hvps, seconds))
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
                "the run deterministic), repeats or damping, or use method='cg'", LissaAccuracyWarning, stacklevel=4)
    elif not converged and opts.tol > 0:
        largest = f" (largest now {float(change.max()):.3g})" if change is not None else ""
        warnings.warn(
            f"LiSSA stopped at depth={depth} before the relative change ||h_j - h_(j-1)|| / ||h_j|| fell below "
            f"tol={opts.tol}{largest}, so the result may be far from (H + damping I)^-1 v (scale={scale:.4g}; a "
            "scale far above lambda_max slows convergence). Raise depth; with minibatches (batch_size < n) the "
            "change stays at the noise level, so raise repeats or batch_size, set tol=0 to accept a fixed depth, or "
            "use method='cg'", RuntimeWarning, stacklevel=4)
    return x, {"method": "lissa", "hvps": hvps, "seconds": seconds, "iterations": step, "scale": scale, "steps": step,
               "converged": converged, "repeats": r, "full_batch": full,
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
