"""The paper's largest settings, classifier-only (issue 28, item 4): ImageNet-LT and iNaturalist 2018 shapes.

Random features of the real shapes (no images: the backbone is frozen in the paper's classifier re-training, so
the classifier sees only its [n, 2048] features):

- ImageNet-LT: n = 115,846 training points, D = 2048, K = 1000 classes, class counts 1280 down to 5; a
  class-balanced validation set of 20 per class (20,000).
- iNaturalist 2018: n = 437,513, D = 2048, K = 8142, counts 1000 down to 2; validation 3 per class (24,426).

Class profile (:func:`lt_counts`): ``n_k = n_min + (n_max - n_min) (1 - k / (K - 1))^p`` for k = 0 .. K-1, p found by
bisection so that the real-valued profile sums to n (p = 10.56 for ImageNet-LT, 18.31 for iNaturalist), then floored,
the missing points handed out one each to the classes with the largest fractional parts and the counts sorted back
into decreasing order: the sum is exactly n, the first count n_max and the last n_min.

Features (:func:`lt_features`): float32 ``x_i = mu[y_i] + e_i`` with ``e_i ~ N(0, I_D)`` and class means
``mu_k ~ N(0, sigma^2 I_D)`` from a fixed seed, ``sigma = SEPARATION / sqrt(D / 2)``: the logit margin of the true
class over another, ``|mu_y - mu_k|^2 / 2 + (mu_y - mu_k) . e``, then has mean / standard deviation = SEPARATION at
every D. Model (:func:`ncm_classifier`): ``iaerf.longtail.models.LinearClassifier(D, K)`` (its ``fc`` is the
``nn.Linear(D, K)``) initialised as a nearest-class-mean classifier at temperature tau: ``W = tau mu``,
``b = -tau |mu_k|^2 / 2`` (its argmax is the nearest class mean in Euclidean distance), ``tau = (ln K +
MARGIN_OVER_LOG_K) / (D sigma^2)`` so that the mean margin is ln K + 3 nats whatever D: on the ImageNet-LT
validation shape the classifier is 82% accurate and gives the true class a mean probability of 0.56 (at a margin
of 4 nats it would be 0.05, a flat softmax; at 16, 0.75 with a median of 0.94, near saturation). Costs nothing to
fit, and the classifier is meaningful (the row reports its validation accuracy).

Rows (:data:`CASES`; each in a fresh process, :func:`benchmarks.common.in_fresh_process`, for its own peak resident
memory, :class:`benchmarks.common.PeakRss`; the wall time of each stage read off iaerf's own progress bars,
:class:`benchmarks.common.StageClock`; what no bar covers is "other"):

- ``ekfac``: ``iaerf.energy_influence(model, train, val, solver="ekfac", params=None, gauss_newton=True)`` on the
  ImageNet-LT shape. params=None selects fc's weight and bias, the classifier head (iaerf.core.heads.affine_head), so
  the call runs on the head path: a features pass, ``iaerf.HeadHessian`` built on them (what EK-FAC is fitted on,
  :func:`iaerf.hessian.curvature_source.curvature_source`; EK-FAC reads only its features and weights, so its
  lazy ``probs`` are never computed), the K-FAC factor pass, two eigendecompositions ([D+1]^2 and [K]^2), the
  EK-FAC eigenvalue pass, the validation gradient, the JVP pass. gauss_newton=True is accepted there (for a linear
  head the Gauss-Newton matrix is the Hessian). Target < 3 min.
- ``cg``: the same with ``solver="cg"``, ``iaerf.CGOptions(tol=1e-4)`` (relative residual 1e-4); iterations and
  HVPs read off CG's progress bar (one right-hand side: one HVP per iteration). The first HVP builds
  ``HeadHessian.probs`` (a ``functools.cached_property``: the ``[n, K]`` softmax of every training point, computed
  in float64 row chunks into one buffer of the operator's dtype, 4 n K bytes in float32), inside CG's bar.
  Target < 20 min.
- ``inat-ekfac``: iNaturalist shape, EK-FAC (the fastest solver that finishes). Target < 30 min. The head path
  holds the data and its features at once (:func:`head_path_peak_bytes`: 12 n D bytes, 10.0 GiB at n = 437,513
  and D = 2048; a solver that multiplies by the operator, CG or LiSSA, adds the 4 n K of the lazy probabilities,
  13.3 GiB more at K = 8142). The row runs at full n when that peak fits INAT_MEMORY_BUDGET, as EK-FAC's does;
  otherwise on a class-stratified subsample (:func:`scaled_counts`, every class kept) of the largest n that fits
  (:func:`subsample_size`), and says so (``--inat-n`` sets n). The EK-FAC eigenvalue pass on a Linear head (one
  position per example) is one GEMM per batch (iaerf/hessian/kfac_factors.py, ``eigenbasis_square_sum``:
  ``sum_i (x_i y_i^T)^2 = (x^2)^T (y^2)``), with no ``[b, K, D+1]`` per-example temporary, so its batch is the
  passes' BATCH.
- ``finetune``: one IAERF classifier re-training epoch (``iaerf.longtail.finetune`` with
  ``classifier_retrain_config(epochs=1)``: batch 512, lr 0.2, fc only; beta = 1, the influence a random vector)
  against a plain CE epoch (beta = 0) on the same data and batch order, alternated REPS times; the median of the
  per-pair ratios IAERF / CE epoch. Target <= 1.05 (within 5%). ``finetune-inat``: the same on the iNaturalist shape
  (not run by default: see the estimate).

Every influence case uses damping = DAMPING (the head's Gauss-Newton matrix is singular: softmax gradients sum to 0
over the classes, so shifting every logit alike has no curvature and EK-FAC refuses damping 0) and batch_size =
BATCH for its passes, EK-FAC's factor passes included (``KFACOptions.batch_size``).

FLOP model (:func:`stage_costs`; a multiply-add is 2 FLOP, a = D + 1): per stage the GEMM FLOP assumed, and the
bytes of the memory-bound work beside it:

- features: the model's forward on the n + m points, whose head input is kept: 2 (n + m) D K, and 16 (n + m) D
  bytes of copies (read, chunk, concatenation).
- other (EK-FAC only): the two eigendecompositions, ~9 (a^3 + K^3) float64 FLOP. (The HeadHessian set-up computes
  nothing of size n K: its probabilities are lazy.)
- K-FAC factors: forward 2 n D K, A by the symmetric Gram (2/3 of 2 n a^2), S 2 n K^2; and per batch of BATCH the
  float32 Gram products cast to float64 and added to the sums, ~48 a^2 + 40 K^2 bytes.
- EK-FAC eigenvalues: forward 2 n D K, inputs projected 2 n a^2, output gradients projected 2 n K^2, and the
  squared projections' product (x^2)^T (y^2) 2 n K a; the projections' row balancing and squaring, ~44 n (K + a)
  bytes; and per batch Q_A and Q_S read, 4 (a^2 + K^2) bytes, and the [K, a] float32 product cast to float64 and
  added to the sum, ~40 K a bytes.
- validation gradient: 4 m D K (forward, weight gradient). energy influence (JVP): 4 n D K (forward and tangent).
- CG: 4 n a K per iteration (the head HVP kernel's two GEMM-shaped passes); once, at the first HVP, the lazy
  probabilities: 2 n D K float64 FLOP and ~12 n D + 52 n K bytes (each row chunk's features cast to float64, its
  float64 logits biased and softmaxed, cast into the float32 buffer).
- one fine-tuning epoch: 4 n D K (forward, weight gradient).

The fraction of the machine's float32 matmul rate (:func:`matmul_rate`: median of a [8192, 2048] x [2048, 1000]
matmul, 2 * 8192 * 2048 * 1000 FLOP) a stage reaches is its GEMM FLOP over its time and that rate; the row's
"fraction of limit" is the whole call's. ``--estimate`` prints, without running a case, the time the model predicts
for every full-size case on this machine: GEMM FLOP at the measured matmul rate (float64 at half of it), bytes at
the measured copy bandwidth (:func:`benchmarks.common.copy_bandwidth`); CG per CG_ITERATIONS_GUESS iterations.

    python -m benchmarks.bench_lt_scale [--quick] [--cases ekfac cg inat-ekfac finetune] [--inat-n N]
                                        [--estimate] [--allow-busy]

``--quick``: every case on QUICK_SHAPE (n = 2,000, D = 64, K = 50; ``inat-ekfac`` on half of it, to run the
subsample path), a check that the code runs in a few seconds; its timings say nothing about the full shapes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks import common


@dataclass(frozen=True)
class LTShape:
    """A long-tailed classification problem on features: ``n`` training points in ``num_classes`` classes with
    counts ``n_max`` down to ``n_min`` (:func:`lt_counts`), ``dim``-d features, ``val_per_class`` validation points
    per class."""

    name: str
    n: int
    dim: int
    num_classes: int
    n_max: int
    n_min: int
    val_per_class: int


SHAPES = {
    "imagenet-lt": LTShape("ImageNet-LT", 115_846, 2048, 1000, 1280, 5, 20),
    "inat2018": LTShape("iNaturalist 2018", 437_513, 2048, 8142, 1000, 2, 3),
}
QUICK_SHAPE = LTShape("quick", 2000, 64, 50, 100, 10, 4)

# case -> (kind, shape key, solver, target): seconds for the influence, IAERF / CE epoch ratio for fine-tuning
CASES = {
    "ekfac": ("influence", "imagenet-lt", "ekfac", 180.0),
    "cg": ("influence", "imagenet-lt", "cg", 1200.0),
    "inat-ekfac": ("influence", "inat2018", "ekfac", 1800.0),
    "finetune": ("finetune", "imagenet-lt", None, 1.05),
    "finetune-inat": ("finetune", "inat2018", None, 1.05),
}
DEFAULT_CASES = ("ekfac", "cg", "inat-ekfac", "finetune")

SEPARATION = 3.0       # mean / std of the true class's logit margin over another class (see the module docstring)
MARGIN_OVER_LOG_K = 3.0  # the NCM classifier's mean margin is ln K + this (nats), which sets its temperature
DAMPING = 1e-3
BATCH = 512            # the influence passes' batch (features, K-FAC factors, EK-FAC eigenvalues, val. gradient, JVP)
CG_TOL = 1e-4
CG_ITERATIONS_GUESS = 100
REPS = 3               # CE / IAERF epoch pairs of the fine-tuning case
INAT_MEMORY_BUDGET = 14 * 2**30  # head-path peak (head_path_peak_bytes) allowed to inat-ekfac, else subsampled
WARMUP_SHAPE = LTShape("warm-up", 64, 8, 4, 32, 8, 2)
MATMUL_SHAPE = (8192, 2048, 1000)  # [M, Kd] x [Kd, N] of matmul_rate


# -- the data and the model ----------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def lt_counts(n: int, num_classes: int, n_max: int, n_min: int) -> tuple[list[int], float]:
    """Per-class counts [num_classes], decreasing from ``n_max`` to ``n_min``, summing to ``n``, and the exponent p of
    the profile ``n_min + (n_max - n_min) (1 - k / (K - 1))^p`` they round (see the module docstring)."""
    K = _check_int("num_classes", num_classes, 2)
    _check_int("n_min", n_min, 1)
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max <= n_min:
        raise ValueError(f"n_max must be an int > n_min={n_min}, got {n_max!r}")
    low, high = n_max + (K - 1) * n_min + 1, (K - 1) * n_max + n_min - 1  # strictly between the p = inf and 0 sums
    if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
        raise ValueError(f"n must be an int in [{low}, {high}] for {K} classes from {n_max} down to {n_min}, "
                         f"got {n!r}")
    t = [1 - k / (K - 1) for k in range(K)]

    def profile(p):
        return [n_min + (n_max - n_min) * x ** p for x in t]

    lo, hi = 0.0, 1.0
    while sum(profile(hi)) > n:
        hi *= 2
    for _ in range(200):  # the sum decreases in p: bisection to the float's resolution
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(profile(mid)) > n else (lo, mid)
    p = 0.5 * (lo + hi)
    exact = profile(p)
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(K), key=lambda k: exact[k] - counts[k], reverse=True)
    short = n - sum(counts)
    if not 0 <= short < K:  # the bisection's sum is n to within rounding
        raise RuntimeError(f"lt_counts: rounding left {short} points for {K} classes")
    for k in by_remainder[:short]:
        counts[k] += 1
    return sorted(counts, reverse=True), p


def scaled_counts(counts: list[int], n: int) -> list[int]:
    """``counts`` scaled to sum to ``n`` (a class-stratified subsample): largest remainders, every class keeps one
    point at least, surplus taken from the largest classes."""
    total = sum(counts)
    if isinstance(n, bool) or not isinstance(n, int) or not len(counts) <= n <= total:
        raise ValueError(f"n must be an int in [{len(counts)}, {total}] (one point per class at least), got {n!r}")
    exact = [c * n / total for c in counts]
    out = [max(1, math.floor(x)) for x in exact]
    missing = n - sum(out)
    if missing > 0:
        for k in sorted(range(len(counts)), key=lambda k: exact[k] - out[k], reverse=True)[:missing]:
            out[k] += 1
    k = 0
    while missing < 0:   # the floor of one made tail classes 1 and overshot: take one from each larger class in turn
        if out[k] > 1:
            out[k] -= 1
            missing += 1
        k = (k + 1) % len(out)
    return out


def lt_features(counts: list[int], means: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x [sum(counts), D] = means[y] + N(0, I)`` and int64 labels ``y`` with ``counts[k]`` points of
    class k, in a seeded random order. Built in row chunks: no second [n, D] temporary."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[torch.randperm(n, generator=g)]
    x = torch.randn(n, means.shape[1], generator=g)
    for s in range(0, n, 65536):
        x[s:s + 65536] += means[y[s:s + 65536]]
    return x, y


def class_means(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """``[K, D]`` float32 class means, N(0, sigma^2) with sigma = SEPARATION / sqrt(D / 2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=g) * (SEPARATION / math.sqrt(dim / 2))


def ncm_classifier(means: torch.Tensor) -> torch.nn.Module:
    """``LinearClassifier(D, K)`` whose fc is the nearest-class-mean classifier of ``means [K, D]`` at temperature
    ``tau = (ln K + MARGIN_OVER_LOG_K) / (D sigma^2)``: ``W = tau means``, ``b = -tau |means_k|^2 / 2``."""
    from iaerf.longtail.models import LinearClassifier

    K, D = means.shape
    sigma2 = SEPARATION ** 2 / (D / 2)
    tau = (math.log(K) + MARGIN_OVER_LOG_K) / (D * sigma2)
    model = LinearClassifier(D, K)
    with torch.no_grad():
        model.fc.weight.copy_(tau * means)
        model.fc.bias.copy_(-0.5 * tau * means.square().sum(1))
    return model.eval()


def head_path_peak_bytes(n: int, dim: int, num_classes: int, solver: str) -> int:
    """Resident bytes the head path of energy_influence with ``solver`` reaches on n float32 points (see the module
    docstring): the data, its features chunks and their concatenation (12 n D), plus, for a solver that multiplies
    by the operator (CG, LiSSA), HeadHessian's lazy float32 probabilities ``[n, K]`` (4 n K). ValueError for an
    unknown solver."""
    from iaerf.hessian.solvers import get_solver

    probs = 4 * n * num_classes if get_solver(solver).runs_operator_products else 0
    return 12 * n * dim + probs


def subsample_size(shape: LTShape, solver: str, budget: int = INAT_MEMORY_BUDGET) -> int:
    """The largest n <= shape.n (shape.n itself when it fits; one point per class at least) whose head-path peak
    with ``solver`` (:func:`head_path_peak_bytes`) stays within ``budget`` bytes."""
    per_point = head_path_peak_bytes(1, shape.dim, shape.num_classes, solver)
    return max(shape.num_classes, min(shape.n, budget // per_point))


# -- the FLOP and byte model ---------------------------------------------------------------------------------------


def stage_costs(case: str, n: int, m: int, D: int, K: int, cg_iterations: int = CG_ITERATIONS_GUESS) -> dict:
    """Per stage (the progress bars' desc, "other", or "epoch"): ``{"flop": float32 GEMM FLOP, "flop64": float64
    FLOP, "bytes": memory-bound bytes}`` of ``case`` (a key of CASES) at n training and m validation points (see the
    module docstring)."""
    a = D + 1
    kind, _, solver, _ = CASES[case]
    if kind == "finetune":
        return {"epoch": {"flop": 4 * n * D * K, "flop64": 0, "bytes": 0}}
    costs = {
        "features": {"flop": 2 * (n + m) * D * K, "flop64": 0, "bytes": 16 * (n + m) * D},
        "validation gradient": {"flop": 4 * m * D * K, "flop64": 0, "bytes": 0},
        "energy influence (JVP)": {"flop": 4 * n * D * K, "flop64": 0, "bytes": 0},
    }
    if solver == "ekfac":
        batches = math.ceil(n / BATCH)
        costs["other"] = {"flop": 0, "flop64": 9 * (a ** 3 + K ** 3), "bytes": 0}
        costs["K-FAC factors"] = {"flop": 2 * n * D * K + (4 / 3) * n * a * a + 2 * n * K * K, "flop64": 0,
                                  "bytes": batches * (48 * a * a + 40 * K * K)}
        costs["EK-FAC eigenvalues"] = {
            "flop": 2 * n * D * K + 2 * n * a * a + 2 * n * K * K + 2 * n * K * a, "flop64": 0,
            "bytes": 44 * n * (K + a) + batches * (4 * (a * a + K * K) + 40 * K * a)}
    else:
        # the lazy probabilities are built by the first HVP, inside CG's progress bar
        costs["CG"] = {"flop": cg_iterations * 4 * n * a * K, "flop64": 2 * n * D * K,
                       "bytes": 12 * n * D + 52 * n * K}
    return costs


def estimate_seconds(costs: dict, rate: float, bandwidth: float) -> dict:
    """Seconds per stage the model predicts: float32 GEMM FLOP at ``rate``, float64 at half of it, bytes at
    ``bandwidth`` (bytes/s)."""
    return {k: c["flop"] / rate + c["flop64"] / (rate / 2) + c["bytes"] / bandwidth for k, c in costs.items()}


def matmul_rate() -> float:
    """The machine's float32 matmul rate in FLOP/s: median of a [8192, 2048] x [2048, 1000] matmul."""
    M, Kd, N = MATMUL_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, Kd, generator=g), torch.randn(Kd, N, generator=g)
    out = torch.empty(M, N)
    t = common.time_fn(lambda: torch.matmul(a, b, out=out), warmup=2, reps=7)
    return 2 * M * Kd * N / t["median"]


# -- one case, in a fresh process ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LTCase:
    """One measurement: ``case`` (a key of CASES) on ``shape``, with ``n`` training points (< shape.n: a
    class-stratified subsample)."""

    case: str
    shape: LTShape
    n: int
    seed: int = 0


def _data(case: LTCase):
    shape = case.shape
    counts, p = lt_counts(shape.n, shape.num_classes, shape.n_max, shape.n_min)
    if case.n != shape.n:
        counts = scaled_counts(counts, case.n)
    means = class_means(shape.num_classes, shape.dim, case.seed)
    train = lt_features(counts, means, case.seed + 1)
    val = lt_features([shape.val_per_class] * shape.num_classes, means, case.seed + 2)
    return counts, p, means, train, val


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        right = sum(int((model(x[s:s + 4096]).argmax(1) == y[s:s + 4096]).sum()) for s in range(0, len(y), 4096))
    return right / len(y)


def _influence_kwargs(solver: str) -> dict:
    from iaerf import CGOptions
    from iaerf.hessian.kfac import KFACOptions

    options = CGOptions(tol=CG_TOL) if solver == "cg" else KFACOptions(batch_size=BATCH)
    return dict(solver=solver, solver_options=options, params=None, gauss_newton=True, damping=DAMPING,
                batch_size=BATCH)


def _warm_up(solver: str | None) -> float:
    """One untimed call on WARMUP_SHAPE: lazy imports and torch.func's first-call set-up out of the first stage."""
    import iaerf
    from iaerf.longtail import finetune
    from iaerf.longtail.data import TensorDataset
    from iaerf.longtail.finetuning import classifier_retrain_config

    t0 = time.perf_counter()
    w = WARMUP_SHAPE
    counts = lt_counts(w.n, w.num_classes, w.n_max, w.n_min)[0]
    means = class_means(w.num_classes, w.dim, 0)
    (x, y), val = lt_features(counts, means, 1), lt_features([w.val_per_class] * w.num_classes, means, 2)
    model = ncm_classifier(means)
    if solver is None:
        finetune(model, TensorDataset(x, y, w.num_classes), torch.randn(w.n), beta=1.0,
                 config=classifier_retrain_config(epochs=1), progress=False)
    else:
        iaerf.energy_influence(model, (x, y), val, progress=False, **_influence_kwargs(solver))
    return time.perf_counter() - t0


def measure_case(case: LTCase) -> dict:
    """Build the data and the model of ``case`` and measure it (run it in a fresh process: see the module
    docstring). Returns the timings per stage, the memory figures and checks of the result."""
    kind, _, solver, _ = CASES[case.case]
    torch.manual_seed(case.seed)
    counts, p, means, (x, y), (xv, yv) = _data(case)
    model = ncm_classifier(means)
    info = {"case": case.case, "shape": asdict(case.shape), "n": case.n, "m": len(yv), "p": p,
            "counts_max": counts[0], "counts_min": counts[-1], "val_accuracy": _accuracy(model, xv, yv),
            "warmup_s": _warm_up(solver)}
    if kind == "influence":
        return {**info, **_measure_influence(model, (x, y), (xv, yv), solver)}
    return {**info, **_measure_finetune(model, x, y, case)}


def _measure_influence(model, train, val, solver: str) -> dict:
    import iaerf

    kwargs = _influence_kwargs(solver)
    with common.PeakRss() as peak:
        t0 = time.perf_counter()
        with common.StageClock() as clock:
            scores = iaerf.energy_influence(model, train, val, progress=True, **kwargs)
        total = time.perf_counter() - t0
    stages = dict(clock.seconds)
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {"total_s": total, "stages_s": stages, "cg_iterations": clock.counts.get("CG"),
            "cg_postfix": clock.postfix.get("CG"), "ekfac_batch": getattr(kwargs["solver_options"], "batch_size", None),
            "peak_rss_bytes": peak.high_water, "peak_rss_increase_bytes": peak.increase, "memory_source": peak.source,
            "scores_shape": list(scores.shape), "scores_finite": int(torch.isfinite(scores).sum())}


def _measure_finetune(model, x, y, case: LTCase) -> dict:
    from iaerf.longtail import finetune
    from iaerf.longtail.data import TensorDataset
    from iaerf.longtail.finetuning import classifier_retrain_config

    data = TensorDataset(x, y, case.shape.num_classes)
    influence = torch.randn(len(y), generator=torch.Generator().manual_seed(case.seed + 3))
    config = classifier_retrain_config(epochs=1)
    epochs = {"ce": [], "iaerf": []}
    calls = {"ce": [], "iaerf": []}
    with common.PeakRss() as peak:
        for _ in range(REPS):
            for kind, beta in (("ce", 0.0), ("iaerf", 1.0)):
                t0 = time.perf_counter()
                with common.StageClock() as clock:
                    finetune(model, data, influence, beta=beta, config=config, progress=True)
                calls[kind].append(time.perf_counter() - t0)
                bars = [s for desc, s in clock.seconds.items() if desc.startswith("finetune")]
                if len(bars) != 1:
                    raise RuntimeError(f"expected one fine-tuning progress bar, saw {sorted(clock.seconds)}")
                epochs[kind].append(bars[0])
    return {"epochs_s": epochs, "calls_s": calls, "ratios": [i / c for i, c in zip(epochs["iaerf"], epochs["ce"])],
            "peak_rss_bytes": peak.high_water, "peak_rss_increase_bytes": peak.increase, "memory_source": peak.source}


# -- rows ----------------------------------------------------------------------------------------------------------

_NO_BASELINE = {"median": math.nan, "iqr": math.nan}


def _spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [math.nan] * 3
    return {"median": statistics.median(values), "iqr": q[2] - q[0]}


def _shape_text(result: dict) -> str:
    s = result["shape"]
    sub = f" (subsample of {s['n']})" if result["n"] != s["n"] else ""
    return (f"{s['name']}: n={result['n']}{sub} counts {result['counts_max']}..{result['counts_min']} "
            f"val={result['m']} D={s['dim']} K={s['num_classes']}")


def _target(case: str, value: float, quick: bool) -> str:
    kind, _, _, goal = CASES[case]
    want = f"< {goal / 60:g} min" if kind == "influence" else f"IAERF / CE epoch <= {goal:g}"
    if quick:
        return f"{want} at full shape (quick: not judged)"
    met = value < goal if kind == "influence" else value <= goal
    return f"{want}: {'met' if met else 'not met'}"


def _stage_text(stages: dict, costs: dict, rate: float) -> str:
    parts = []
    for k, v in stages.items():
        flop = costs.get(k, {}).get("flop", 0)
        frac = f" ({100 * flop / (v * rate):.0f}% of fp32 matmul rate)" if flop and v > 0 else ""
        parts.append(f"{k} {common._fmt_time(v)}{frac}")
    return ", ".join(parts)


def _influence_row(result: dict, rate: float, quick: bool) -> dict:
    s = result["shape"]
    _, _, solver, _ = CASES[result["case"]]
    costs = stage_costs(result["case"], result["n"], result["m"], s["dim"], s["num_classes"],
                        result["cg_iterations"] or 0)
    gemm = sum(c["flop"] for c in costs.values())
    extra = []
    if solver == "cg":
        extra.append(f"CG: {result['cg_iterations']} iterations = {result['cg_iterations']} HVPs (one right-hand "
                     f"side), tol={CG_TOL} ({result['cg_postfix'] or 'no residual shown'})")
    else:
        extra.append(f"EK-FAC batch {result['ekfac_batch']}")
    if result["n"] != s["n"]:
        full = head_path_peak_bytes(s["n"], s["dim"], s["num_classes"], solver)
        extra.append(f"SUBSAMPLE: {result['n']} of {s['n']} points, class-stratified; head-path peak "
                     f"{common._fmt_bytes(full)} at full n, budget {common._fmt_bytes(INAT_MEMORY_BUDGET)}")
    r = common.row(
        f"LT scale: energy_influence classifier-only, {solver}", _shape_text(result), "fp32", "none (one run)",
        _NO_BASELINE, {"median": result["total_s"], "iqr": math.nan}, peak_bytes=result["peak_rss_increase_bytes"],
        limit_fraction=gemm / (result["total_s"] * rate), target=_target(result["case"], result["total_s"], quick),
        note=f"stages: {_stage_text(result['stages_s'], costs, rate)}; " + "; ".join(extra)
             + f"; peak RSS +{common._fmt_bytes(result['peak_rss_increase_bytes'])} ({result['memory_source']}), "
               f"process high-water {common._fmt_bytes(result['peak_rss_bytes'])}; NCM val accuracy "
               f"{100 * result['val_accuracy']:.1f}%; profile p={result['p']:.2f}; damping={DAMPING} "
               f"batch={BATCH}; untimed warm-up {common._fmt_time(result['warmup_s'])}")
    r.update(lt_case=result["case"], n=result["n"], stages_s=result["stages_s"], cg_iterations=result["cg_iterations"],
             scores_shape=result["scores_shape"], scores_finite=result["scores_finite"],
             memory_source=result["memory_source"], gemm_flop=gemm)
    return r


def _finetune_row(result: dict, rate: float, quick: bool) -> dict:
    s = result["shape"]
    ratio = statistics.median(result["ratios"])
    flop = stage_costs(result["case"], result["n"], result["m"], s["dim"], s["num_classes"])["epoch"]["flop"]
    iaerf_t = _spread(result["epochs_s"]["iaerf"])
    r = common.row(
        "LT scale: IAERF classifier re-training epoch (finetune, beta=1)", _shape_text(result) + ", batch 512",
        "fp32", "plain CE epoch (beta=0), same batch order", _spread(result["epochs_s"]["ce"]), iaerf_t,
        peak_bytes=result["peak_rss_increase_bytes"], limit_fraction=flop / (iaerf_t["median"] * rate),
        target=_target(result["case"], ratio, quick),
        note=f"median IAERF / CE epoch ratio {ratio:.3f} over {REPS} alternated pairs "
             f"({', '.join(f'{x:.3f}' for x in result['ratios'])}); whole finetune calls CE "
             f"{common._fmt_time(statistics.median(result['calls_s']['ce']))}, IAERF "
             f"{common._fmt_time(statistics.median(result['calls_s']['iaerf']))}; peak RSS "
             f"+{common._fmt_bytes(result['peak_rss_increase_bytes'])} ({result['memory_source']}); NCM val "
             f"accuracy {100 * result['val_accuracy']:.1f}%")
    r.update(lt_case=result["case"], n=result["n"], ratios=result["ratios"], median_ratio=ratio,
             memory_source=result["memory_source"], gemm_flop=flop)
    return r


def plan(cases, quick: bool, inat_n: int | None = None) -> list[LTCase]:
    """The measurements of ``cases`` (keys of CASES), every argument checked before the first case runs."""
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise ValueError(f"cases must be a non-empty selection of {sorted(CASES)}, got {list(cases)!r}")
    if inat_n is not None and "inat-ekfac" not in cases:
        raise ValueError(f"inat_n={inat_n!r} is the size of the inat-ekfac case, which cases={list(cases)!r} leave out")
    out = []
    for name in cases:
        kind, key, solver, _ = CASES[name]
        shape = QUICK_SHAPE if quick else SHAPES[key]
        n = shape.n
        if name == "inat-ekfac":
            n = inat_n if inat_n is not None else (shape.n // 2 if quick else subsample_size(shape, solver))
            if isinstance(n, bool) or not isinstance(n, int) or not shape.num_classes <= n <= shape.n:
                raise ValueError(f"inat_n must be an int in [{shape.num_classes}, {shape.n}] (one point per class "
                                 f"at least), got {n!r}")
        out.append(LTCase(name, shape, n))
    return out


def run(quick: bool = False, cases=None, inat_n: int | None = None) -> list[dict]:
    """Rows (benchmarks/common.py ``row`` plus ``lt_case``, ``n``, ``stages_s``, ... keys) of ``cases`` (default
    DEFAULT_CASES), each measured in a fresh process."""
    todo = plan(tuple(cases) if cases is not None else DEFAULT_CASES, quick, inat_n)
    cap = common.describe_cpu_capability(common.cpu_capability())
    rate = matmul_rate()
    print(f"[lt-scale] fp32 matmul rate {rate / 1e9:.1f} GFLOP/s ({'x'.join(map(str, MATMUL_SHAPE))})", flush=True)
    rows = []
    for case in todo:
        result = common.in_fresh_process(measure_case, case)
        make = _influence_row if CASES[case.case][0] == "influence" else _finetune_row
        r = make(result, rate, quick)
        r.update(cpu_isa=cap, matmul_rate=rate)
        print(f"[lt-scale] {case.case}: {common._fmt_time(r['iaerf_median_s'])}, {r['target']}", flush=True)
        rows.append(r)
    return rows


def estimates(rate: float, bandwidth: float, cg_iterations: int = CG_ITERATIONS_GUESS) -> list[dict]:
    """The model's seconds per stage and in total for every full-size case (``inat-ekfac`` at full n, and at its
    subsample when its head-path peak exceeds INAT_MEMORY_BUDGET), from the matmul ``rate`` (FLOP/s) and copy
    ``bandwidth`` (bytes/s)."""
    out = []
    for name, (kind, key, solver, goal) in CASES.items():
        shape = SHAPES[key]
        sizes = [shape.n]
        if name == "inat-ekfac":
            sizes = sorted({subsample_size(shape, solver), shape.n})
        m = shape.val_per_class * shape.num_classes
        for n in sizes:
            stages = estimate_seconds(stage_costs(name, n, m, shape.dim, shape.num_classes, cg_iterations), rate,
                                      bandwidth)
            total = sum(stages.values()) * (2 * REPS if kind == "finetune" else 1)
            out.append({"case": name, "n": n, "stages_s": stages, "total_s": total, "target": goal,
                        "what": "2 x REPS epochs" if kind == "finetune" else
                        (f"{cg_iterations} CG iterations" if solver == "cg" else "one call")})
    return out


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return common._fmt_bytes(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every case on n=2000, D=64, K=50 (a check that it runs)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None,
                        help=f"default {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--inat-n", type=int, default=None,
                        help="training points of inat-ekfac (default: all of them if the head-path peak fits the "
                             "memory budget, else the largest n that does)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the model's time for every full-size case on this machine; run none")
    common.add_load_arguments(parser)
    args = parser.parse_args()
    common.guard_load_or_exit(args.allow_busy)
    machine = common.machine_description()
    cap = common.describe_cpu_capability(machine["cpu_capability"])
    print(f"machine: {machine['cpu']} | {cap} | {machine['cores']} cores | {machine['torch_threads']} torch threads | "
          f"{_memory_total()} memory")
    if args.estimate:
        rate, bandwidth = matmul_rate(), common.copy_bandwidth()
        print(f"fp32 matmul rate {rate / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        for e in estimates(rate, bandwidth):
            stages = ", ".join(f"{k} {common._fmt_time(v)}" for k, v in e["stages_s"].items())
            print(f"- {e['case']} n={e['n']}: {common._fmt_time(e['total_s'])} ({e['what']}; target "
                  f"{e['target']:g}): {stages}")
        return
    print(common.markdown_table(run(args.quick, args.cases, args.inat_n)))


if __name__ == "__main__":
    main()
