"""Classic loss influence of every training point, end to end, against the influence libraries users would pick.

Quantity: I(x_i) = -g_val^T (H + wd I)^{-1} grad CE(x_i), g_val the mean validation-loss gradient and H the Hessian of
the mean training cross-entropy, wd the L2 weight decay the model was trained with (iaerf.loss_influence, Koh & Liang
"Understanding Black-box Predictions via Influence Functions", Eq. 4 averaged over the validation set).
Problems (scikit-learn digits, inputs / 16, models trained to a stationary point of mean CE + wd/2 ||theta||^2):
  - L2 logistic regression, n = 1000 training points, P = 650;
  - a tanh MLP 64 -> 64 -> 10, n = 1000, P = 4,810.
Reference: float64 dense solve (torch.func Hessian and per-example gradients, independent of every library).
Libraries and solvers, each run end to end in float32 (fit, gradients, solve, scores):
  - iaerf: exact / cg / lissa (``iaerf.loss_influence``);
  - dattri 0.3: IFAttributorExplicit / IFAttributorCG / IFAttributorLiSSA;
  - pyDVL 0.10: DirectInfluence / CgInfluence / LissaInfluence.
Conventions, checked on the exact solvers before any timing (:func:`_check_conventions`): dattri and pyDVL return
+g_train^T H^{-1} g_test per (train, test) pair, so their score is the negated mean over the validation points;
weight decay enters dattri's explicit / CG and pyDVL's solvers as ``regularization = wd`` (H + wd I) and dattri's
LiSSA as ``damping = wd / scaling`` (its recursion solves (H + damping * scaling) x = v).
Each library and solver: the solver's budget (CG iterations, LiSSA depth) doubles until the relative error
||I - I_ref|| / ||I_ref|| is <= 1e-2; the row reports the median time at that budget, the settings needed, whether
a hand-set knob (a LiSSA scale other than the library's default) was needed to converge, and the peak memory of one
run: the resident-set high-water mark of a fresh process over a second, warm run, minus its resident set before
that run (:func:`peak_in_subprocess`).

    bash benchmarks/setup_peers.sh
    .venv-peers/bin/python -m benchmarks.bench_peers [--quick] [--only logreg mlp] [--allow-busy]
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common

TARGET = 1e-2
WEIGHT_DECAY = 1e-2
LIBRARIES = ("iaerf", "dattri", "pyDVL")
# the three solver kinds and each library's name for it
SOLVERS = {
    "exact": {"iaerf": "exact", "dattri": "explicit", "pyDVL": "direct"},
    "cg": {"iaerf": "cg", "dattri": "CG", "pyDVL": "CG"},
    "lissa": {"iaerf": "lissa", "dattri": "LiSSA", "pyDVL": "LiSSA"},
}
# library -> factor that turns its raw output into I; checked against the reference before any timing
CONVENTION = {"iaerf": 1.0, "dattri": -1.0, "pyDVL": -1.0}
MEMORY_FRACTION = 0.6  # of the memory available before a run: what one peer run may allocate
DEFAULT_LISSA_SCALE = {"iaerf": None, "dattri": 50.0, "pyDVL": 10.0}  # None: iaerf's automatic scale


def peers_available() -> str | None:
    """None when dattri and pyDVL import here, else why not (and how to get them)."""
    missing = []
    for name in ("dattri", "pydvl"):
        try:
            __import__(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if not missing:
        return None
    return ("not importable here: " + ", ".join(missing) +
            "; run `bash benchmarks/setup_peers.sh`, then `.venv-peers/bin/python -m benchmarks.bench_peers`")


@dataclasses.dataclass
class Problem:
    """A trained model and its data. ``x`` ``[n, 64]``, ``y`` ``[n]``, ``xv`` ``[m, 64]``, ``yv`` ``[m]`` float32 /
    int64; ``reference`` ``[n]`` float64; ``lambda_max`` / ``lambda_min`` of H + wd I (float64)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    weight_decay: float
    reference: torch.Tensor
    lambda_max: float
    lambda_min: float

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def shape(self) -> str:
        return f"n={len(self.y)} m={len(self.yv)} P={self.num_params}"


def _digits(n_train: int, n_val: int, seed: int = 0):
    """Disjoint training and validation points of scikit-learn digits, float64 inputs / 16 ``[., 64]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if n_train + n_val > len(bunch.target):
        raise ValueError(f"n_train + n_val must be <= {len(bunch.target)}, got {n_train} + {n_val}")
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(seed))
    X = torch.tensor(bunch.data, dtype=torch.float64)[order] / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)[order]
    return X[:n_train], y[:n_train], X[n_train:n_train + n_val], y[n_train:n_train + n_val]


def _reference(model64: nn.Module, x, y, xv, yv, wd: float):
    """(I_ref [n], lambda_max, lambda_min) by a float64 dense solve of (H + wd I) s = g_val."""
    names = [k for k, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def unflatten(t):
        return dict(zip(names, (c.view(s) for c, s in zip(torch.split(t, [math.prod(s) for s in shapes]), shapes))))

    def mean_ce(t, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model64, unflatten(t), (xb,)), yb)

    # reverse-over-reverse in chunks of rows: all P at once would hold P copies of the activations
    H = torch.func.jacrev(torch.func.grad(mean_ce), chunk_size=256)(theta, x, y)
    H = 0.5 * (H + H.T) + wd * torch.eye(len(theta), dtype=torch.float64)
    g_val = torch.func.grad(mean_ce)(theta, xv, yv)
    G = torch.func.vmap(torch.func.grad(mean_ce), in_dims=(None, 0, 0))(theta, x.unsqueeze(1), y.unsqueeze(1))
    evals = torch.linalg.eigvalsh(H)
    s = torch.linalg.solve(H, g_val)
    return -(G @ s), float(evals[-1]), float(evals[0])


def _make_problem(name: str, quick: bool) -> Problem:
    from iaerf.groundtruth import fit_tanh_mlp
    from iaerf.influence.validation import fit_softmax_regression

    n, m = (300, 50) if quick else (1000, 200)
    x, y, xv, yv = _digits(n, m)
    wd = WEIGHT_DECAY
    if name == "logreg":
        W = torch.from_numpy(fit_softmax_regression(x.numpy(), y.numpy(), 10, wd, tol=1e-10))
        model64 = nn.Linear(64, 10).double()
        with torch.no_grad():
            model64.weight.copy_(W[:, :64])
            model64.bias.copy_(W[:, 64])
    elif name == "mlp":
        model64 = fit_tanh_mlp(x, y, hidden=16 if quick else 64, num_classes=10, weight_decay=wd, seed=0, tol=1e-6)
    else:
        raise ValueError(f"problem must be 'logreg' or 'mlp', got {name!r}")
    reference, lmax, lmin = _reference(model64, x, y, xv, yv, wd)
    if lmin <= 0:
        raise RuntimeError(f"{name}: H + wd I is not positive definite (lambda_min {lmin:.3g}); CG / LiSSA would not "
                           f"converge to the exact answer")
    model = model64.float().eval()
    return Problem(name, model, x.float(), y, xv.float(), yv, wd, reference, lmax, lmin)


# -- one library's solver: (problem, budget, scale) -> raw influence [n] -------------------------------------------


def _run_iaerf(p: Problem, solver: str, budget: int | None, scale: float | None) -> torch.Tensor:
    import iaerf

    n = len(p.y)
    options = {
        "exact": None,
        # tol below float32's reach: the budget alone decides the iterations
        "cg": iaerf.CGOptions(tol=1e-12, max_iter=budget) if budget else None,
        # full-data products (batch >= n): deterministic, as the peers' full-batch loaders
        "lissa": iaerf.LissaOptions(depth=budget, batch_size=n, tol=0.0, scale=scale) if budget else None,
    }[solver]
    return iaerf.loss_influence(p.model, (p.x, p.y), (p.xv, p.yv), weight_decay=p.weight_decay, solver=solver,
                                solver_options=options, batch_size=n, progress=False)


def _run_dattri(p: Problem, solver: str, budget: int | None, scale: float | None) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit, IFAttributorLiSSA
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = p.model

    def loss_func(params, data):
        xb, yb = data
        # dattri's LiSSA collate hands labels over as floats
        return F.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb.long())

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    n = len(p.y)
    # one batch: dattri's explicit attributor sums the inverse of each batch's Hessian over the loader
    train = DataLoader(TensorDataset(p.x, p.y), batch_size=n)
    if solver == "explicit":
        attributor = IFAttributorExplicit(task, regularization=p.weight_decay)
    elif solver == "CG":
        attributor = IFAttributorCG(task, max_iter=budget, tol=1e-12, regularization=p.weight_decay)
    else:
        attributor = IFAttributorLiSSA(task, batch_size=n, num_repeat=1, recursion_depth=budget,
                                       damping=p.weight_decay / scale, scaling=scale)
    attributor.cache(train)
    scores = attributor.attribute(train, DataLoader(TensorDataset(p.xv, p.yv), batch_size=len(p.yv)))  # [n, m]
    return scores.mean(1)


def _run_pydvl(p: Problem, solver: str, budget: int | None, scale: float | None) -> torch.Tensor:
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence, LissaInfluence
    from torch.utils.data import DataLoader, TensorDataset

    loss = F.cross_entropy
    if solver == "direct":
        model = DirectInfluence(p.model, loss, regularization=p.weight_decay)
    elif solver == "CG":
        # block CG over the validation right-hand sides (one CG per right-hand side otherwise)
        model = CgInfluence(p.model, loss, regularization=p.weight_decay, rtol=1e-12, atol=0.0, maxiter=budget,
                            solve_simultaneously=True, warn_on_max_iteration=False)
    else:
        model = LissaInfluence(p.model, loss, regularization=p.weight_decay, maxiter=budget, scale=scale, rtol=0.0,
                               warn_on_max_iteration=False)
    model = model.fit(DataLoader(TensorDataset(p.x, p.y), batch_size=len(p.y)))
    return model.influences(p.xv, p.yv, p.x, p.y, mode=InfluenceMode.Up).mean(0)  # [m, n] -> [n]


RUNNERS: dict[str, Callable] = {"iaerf": _run_iaerf, "dattri": _run_dattri, "pyDVL": _run_pydvl}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (2-norms over the training points) in float64; inf when not finite."""
    value = value.detach().double().reshape(-1)
    if not torch.isfinite(value).all():
        return math.inf
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def _influence(p: Problem, library: str, kind: str, budget: int | None, scale: float | None) -> torch.Tensor:
    """One library's influence [n] in iaerf's convention; the run may allocate at most :data:`MEMORY_FRACTION` of
    the memory available (:class:`common.memory_cap`): an earlier full run was OOM-killed at 24 GB inside a peer,
    which ended the whole benchmark instead of one attempt."""
    with warnings.catch_warnings(), common.memory_cap(common.memory_budget_bytes(MEMORY_FRACTION)):
        warnings.simplefilter("ignore")
        raw = RUNNERS[library](p, SOLVERS[kind][library], budget, scale)
    return CONVENTION[library] * raw.detach().double().reshape(-1)


def _check_conventions(p: Problem) -> str:
    """Every library's exact solver, rescaled by CONVENTION, must match the reference; raises otherwise. Returns the
    fitted factors (least-squares scale of each raw output onto the reference) for the notes."""
    fitted = []
    for library in LIBRARIES:
        raw = CONVENTION[library] * _influence(p, library, "exact", None, None)
        alpha = float(raw @ p.reference / (raw @ raw))
        err = relative_error(alpha * raw, p.reference)
        if abs(alpha / CONVENTION[library] - 1) > 1e-2 or err > 1e-3:
            raise RuntimeError(f"{library} on {p.name} does not compute the same quantity: its exact solver fits the "
                               f"reference with factor {alpha:.4g} (expected {CONVENTION[library]:g}), residual "
                               f"{err:.2g}")
        fitted.append(f"{library} x{alpha:.4f}")
    return "conventions checked on the exact solvers (fitted factor onto the reference): " + ", ".join(fitted)


@dataclasses.dataclass
class Outcome:
    """The result of tuning one library's solver up to the target."""

    library: str
    solver: str
    reached: bool
    budget: int | None
    error: float
    timing: dict | None
    peak_bytes: int | None
    settings: str


def _attempt(p: Problem, library: str, kind: str, budget, scale) -> tuple[float, float, str]:
    """(relative error, seconds, failure text) of one run; a diverging peer (pyDVL raises on NaN) is a result, and
    so is one that needs more memory than the cap of :func:`_influence`."""
    t0 = time.perf_counter()
    try:
        err, failure = relative_error(_influence(p, library, kind, budget, scale), p.reference), ""
    except Exception as exc:  # noqa: BLE001
        err, failure = math.inf, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if isinstance(exc, MemoryError) or "alloc" in str(exc).lower() or "memory" in str(exc).lower():
            failure += f" (over the memory cap: {MEMORY_FRACTION:.0%} of the memory available)"
    return err, time.perf_counter() - t0, failure


def lissa_depth_estimate(scale: float, lambda_min: float, target: float = TARGET) -> int:
    """Steps a deterministic LiSSA needs for the slowest eigen-direction to fall below ``target``:
    (1 - lambda_min / scale)^j <= target, i.e. about scale / lambda_min * ln(1 / target)."""
    if not (scale > 0 and lambda_min > 0 and 0 < target < 1):
        raise ValueError(f"scale and lambda_min must be > 0 and target in (0, 1), got {scale}, {lambda_min}, {target}")
    return math.ceil(math.log(target) / math.log1p(-min(lambda_min / scale, 0.5)))


def _tune(p: Problem, library: str, kind: str, quick: bool) -> Outcome:
    """Double the budget until the target is met, then time that setting. LiSSA starts at half the depth the
    spectrum predicts (:func:`lissa_depth_estimate`), first with the library's default scale and, when that does not
    reach the target, with a hand-set scale of 1.1 lambda_max; a setting whose run would exceed the per-run time
    limit (estimated from a 20-step probe) is not tried."""
    solver = SOLVERS[kind][library]
    start, limit = {"exact": (None, None), "cg": (5, 2560), "lissa": (None, 200_000)}[kind]
    run_limit_s = 20.0 if quick else 600.0
    scales = [None]
    if kind == "lissa":
        scales = [DEFAULT_LISSA_SCALE[library]]
        if library != "iaerf":
            scales.append(1.1 * p.lambda_max)
    history, err = [], math.inf
    for scale in scales:
        budget, per_step = start, None
        if kind == "lissa":
            predicted = lissa_depth_estimate(scale or 1.1 * p.lambda_max, p.lambda_min)
            budget = max(20, predicted // 2)
            _, probe_s, failure = _attempt(p, library, kind, 20, scale)
            per_step = probe_s / 20
            if failure or per_step * budget > run_limit_s:
                history.append(f"scale {scale or 'auto'}: " + (failure or f"needs about {predicted} steps, "
                               f"{per_step * predicted:.0f} s by a 20-step probe, over the {run_limit_s:g} s run limit"))
                print(f"[bench_peers] {p.name} {library} {solver} {history[-1]}", file=sys.stderr, flush=True)
                continue
        while True:
            err, seconds, failure = _attempt(p, library, kind, budget, scale)
            where = (f"budget {budget}" if budget else "") + (f" scale {scale:.3g}" if scale else "")
            history.append(f"{where.strip() or 'default'}: err {err:.2g}{' (' + failure + ')' if failure else ''}")
            # a full run takes tens of minutes: say where it is
            print(f"[bench_peers] {p.name} {library} {solver} {history[-1]} ({seconds:.1f} s)", file=sys.stderr,
                  flush=True)
            if err <= TARGET:
                return _timed(p, library, kind, budget, scale, err, seconds, quick, solver, scales, history)
            next_s = seconds * 2 if per_step is None else per_step * budget * 2
            if budget is None or budget >= limit or not math.isfinite(err) or next_s > run_limit_s:
                break
            budget *= 2
    return Outcome(library, solver, False, None, err, None, None, f"{library} {solver}: " + "; ".join(history[-3:]))


def _timed(p, library, kind, budget, scale, err, seconds, quick, solver, scales, history) -> Outcome:
    """Outcome of the setting that reached the target: the median time of the tuning run (the library's code already
    ran in the convention check) and two more runs (one alone for runs over a minute and --quick runs), and the peak
    memory of one run. CG / LiSSA hold their state vectors and one product's working set whatever the budget, so
    their peak is taken at a budget of at most 20."""
    times = [seconds]
    for _ in range(0 if quick or seconds > 60 else 2):
        t0 = time.perf_counter()
        _influence(p, library, kind, budget, scale)
        times.append(time.perf_counter() - t0)
    timing = common._summary(times)
    peak = peak_in_subprocess(p, library, kind, None if budget is None else min(budget, 20), scale)
    knob = {"exact": "", "cg": f"{budget} iterations", "lissa": f"depth {budget}"}[kind]
    hand_set = ""
    if kind == "lissa":
        if scale is not None and scale != scales[0]:
            hand_set = f", hand-set scale {scale:.3g} (default {scales[0]:g}: {history[0]})"
        elif scale is None:
            hand_set = ", automatic scale"
        else:
            hand_set = f", default scale {scale:g}"
    settings = f"{library} {solver}: {knob}{hand_set}, err {err:.2g}".replace(": ,", ":")
    return Outcome(library, solver, True, budget, err, timing, peak, settings)


def peak_in_subprocess(p: Problem, library: str, kind: str, budget, scale) -> int | None:
    """Peak memory of one run in bytes, in a fresh interpreter (:func:`_peak_child`): everything the process held
    (torch tensors, numpy arrays, library caches). In this process the allocator keeps memory freed by earlier
    runs, so a resident-set delta here would miss most of it. None (and a warning) when the child fails."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.pt")
        torch.save({"problem": p, "library": library, "kind": kind, "budget": budget, "scale": scale}, path)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child = subprocess.run([sys.executable, "-c", f"from benchmarks.bench_peers import _peak_child; "
                                f"_peak_child({path!r})"], cwd=root, capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        warnings.warn(f"peak memory of {library} {kind} not measured: {child.stderr.strip()[-300:]}", RuntimeWarning)
        return None
    return int(json.loads(lines[-1])["peak_bytes"])


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_child(path: str) -> None:
    """The child of :func:`peak_in_subprocess`: one warm-up run (imports, lazy initialisation, thread pools), its
    freed memory handed back to the system (malloc_trim), the peak resident set reset (/proc/self/clear_refs 5),
    then the measured run; prints ``{"peak_bytes": VmHWM - VmRSS before the run}``."""
    import ctypes
    import gc
    import json

    spec = torch.load(path, weights_only=False)  # written by the parent a moment ago
    args = (spec["problem"], spec["library"], spec["kind"], spec["budget"], spec["scale"])
    _influence(*args)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    _influence(*args)
    print(json.dumps({"peak_bytes": max(0, _status_bytes("VmHWM") - base)}), flush=True)


def _problem_rows(name: str, quick: bool, device) -> list[dict]:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"bench_peers runs on the CPU only, got device={device!r}")
    p = _make_problem(name, quick)
    conventions = _check_conventions(p)
    condition = f"H + wd I: lambda in [{p.lambda_min:.3g}, {p.lambda_max:.3g}], wd {p.weight_decay:g}"
    rows = []
    for kind in SOLVERS:
        outcomes = {lib: _tune(p, lib, kind, quick) for lib in LIBRARIES}
        ours = outcomes["iaerf"]
        peers = {f"{o.library} {o.solver}": o for lib, o in outcomes.items() if lib != "iaerf"}
        reached = {k: o for k, o in peers.items() if o.reached}
        best = min(reached, key=lambda k: reached[k].timing["median"]) if reached else None
        nan = {"median": math.nan, "iqr": math.nan}
        notes = [o.settings + (f", peak {common._fmt_bytes(o.peak_bytes)}" if o.reached else " -- did not reach "
                                f"rel. error {TARGET:g}") for o in outcomes.values()]
        if kind == "exact":
            notes += [conventions, condition,
                      "peak: resident-set high-water mark of a fresh process over its second run, minus its "
                      "resident set before that run (CG / LiSSA at a budget of 20)",
                      "dattri and pyDVL solve one system per validation point (their API scores (train, test) "
                      "pairs; pyDVL's CG as one block CG), iaerf one for the mean validation gradient"]
        rows.append(common.row(
            f"loss influence, {kind} solver, time to rel. err {TARGET:g}", f"{name} {p.shape()}", "fp32",
            f"fastest peer: {best}" if best else "no peer reached the target",
            reached[best].timing if best else nan, ours.timing if ours.reached else nan,
            max_err=ours.error if ours.reached else None, peak_bytes=ours.peak_bytes,
            baseline_peak_bytes=reached[best].peak_bytes if best else None,
            peers={k: (o.timing if o.reached else None) for k, o in peers.items()},
            target="iaerf fastest at equal accuracy", note="; ".join(notes)))
    return rows


PARTS = {"logreg": lambda quick, device: _problem_rows("logreg", quick, device),
         "mlp": lambda quick, device: _problem_rows("mlp", quick, device)}


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Rows of both problems; needs dattri and pyDVL (:func:`peers_available`)."""
    why = peers_available()
    if why:
        raise RuntimeError(f"bench_peers: dattri / pyDVL {why}")
    return common.run_parts(PARTS, list(PARTS), quick, device)


if __name__ == "__main__":
    common.parts_main(PARTS, __doc__)
