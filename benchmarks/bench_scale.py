"""Scale on one machine: energy influence of every training point for ResNet-32 at CIFAR-10-LT size (issue 15, item 7).

Two variants of ``iaerf.energy_influence`` on random CIFAR-sized data (uint8 [n, 3, 32, 32], 10 classes, the
CIFAR-10-LT class profile of imbalance ratio 100 scaled to n; 12,406 points at full size), each at three training
set sizes (default n = 1,000, 4,000, 12,406; a fixed class-balanced validation set of 500):

- ``classifier``: params="fc" (the classifier head's weight and bias, P = 650): one features pass through the
  frozen network, the native head Hessian (for a linear head it is the Gauss-Newton matrix), an exact solve;
- ``full-ekfac``: every parameter but batch norm's (P = 461,882 of the model's 464,154), gauss_newton=True,
  solver="ekfac": two factor passes, a validation-gradient pass, a closed-form solve, one forward-mode JVP pass.
  Exact and CG solves are out of reach at this P on a CPU.

Per case: wall time of the whole call, the time of each stage that shows a progress bar (read off iaerf's own tqdm
bars, each from its creation to its close: "features", "K-FAC factors", "EK-FAC eigenvalues", "validation gradient", "energy
influence (JVP)"; what no bar covers is "other": the probe forward, EK-FAC's eigendecompositions of its factors --
two per layer, up to 577 x 577, the same at every n -- and the solve), the peak resident memory, and
the growth exponent of each figure with n (least-squares slope of log value against log n over the sizes).

Each case runs in a fresh process (multiprocessing "spawn"), so that ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
is that case's own high-water mark: the reported increase is ru_maxrss after the call minus the resident set just
before it (data and model already built). When the call did not raise the high-water mark (it is below a peak set
while the data were built) the increase is the sampling thread's maximum of /proc/self/statm instead, and the row
says so. On CUDA, torch.cuda.max_memory_allocated over the call is reported as well.

    python -m benchmarks.bench_scale [--quick] [--sizes 1000 4000 12406] [--device cpu|cuda] [--variants ...]

The progress bars of every stage are shown on stderr (the measuring process inherits it); one line per finished
case goes to stdout. ``--quick``: n = 32, 64, 128 on 8x8 images with 10 validation points (a check that the code
runs; its timings say nothing about 32x32 images).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks import common

NUM_CLASSES = 10
FULL_SIZES = (1000, 4000, 12406)
QUICK_SIZES = (32, 64, 128)
# CIFAR-10-LT (imbalance ratio 100): 5000 images of the head class down to 50 of the tail, 12,406 in all
LT_N_MAX, LT_RATIO = 5000, 100.0

VARIANTS = {
    "classifier": {"params": "fc", "solver": "exact", "gauss_newton": False},
    "full-ekfac": {"params": None, "solver": "ekfac", "gauss_newton": True},
}
VARIANT_TITLES = {
    "classifier": "classifier-only (fc, native head Hessian, exact solve)",
    "full-ekfac": "full model but batch norm, Gauss-Newton, EK-FAC",
}
# the stages of energy_influence that open a progress bar (their desc), in the order they run
STAGES = ("features", "K-FAC factors", "EK-FAC eigenvalues", "validation gradient", "energy influence (JVP)")
# training and validation points of the untimed call that precedes each measured one
WARMUP_POINTS = 16


@dataclass(frozen=True)
class ScaleCase:
    """One measurement: ``variant`` (a key of VARIANTS) at ``n`` training points of ``image_size``-pixel images."""

    variant: str
    n: int
    val: int
    image_size: int
    device: str
    damping: float = 1e-3
    batch_size: int = 256
    seed: int = 0


def long_tailed_counts(n: int) -> list[int]:
    """Per-class counts [10] summing to ``n``: the CIFAR-10-LT profile (``iaerf.longtail.data.imbalance_counts(10, 5000,
    100)``, 12,406 images) scaled to n, rounded by largest remainder; every class keeps at least one point."""
    from iaerf.longtail.data import imbalance_counts

    if isinstance(n, bool) or not isinstance(n, int) or n < NUM_CLASSES:
        raise ValueError(f"n must be an int >= {NUM_CLASSES} (one point per class at least), got {n!r}")
    base = imbalance_counts(NUM_CLASSES, LT_N_MAX, LT_RATIO)
    total = sum(base)
    exact = [n * c / total for c in base]
    counts = [max(1, math.floor(x)) for x in exact]
    # hand the missing points to the largest remainders (or take surplus ones from the smallest, when the floor of
    # one made a tail class 1 and overshot)
    order = sorted(range(NUM_CLASSES), key=lambda k: exact[k] - math.floor(exact[k]), reverse=True)
    i = 0
    while sum(counts) != n:
        k = order[i % NUM_CLASSES] if sum(counts) < n else order[-1 - i % NUM_CLASSES]
        if sum(counts) < n:
            counts[k] += 1
        elif counts[k] > 1:
            counts[k] -= 1
        i += 1
    return counts


def cifar_like(counts: list[int], image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images ``[sum(counts), 3, image_size, image_size]`` and int64 labels ``[sum(counts)]`` with
    ``counts[k]`` points of class k, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[torch.randperm(n, generator=g)]
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    return images, labels


def growth_exponent(ns, values) -> float:
    """Least-squares slope of log(value) against log(n): the p of value ~ n^p. NaN when a value is not > 0 (e.g.
    a memory increase of 0 at a tiny n)."""
    ns, values = list(ns), list(values)
    if len(ns) != len(values):
        raise ValueError(f"ns and values must have the same length, got {len(ns)} and {len(values)}")
    if len(set(ns)) < 2 or any(not n > 0 for n in ns):
        raise ValueError(f"ns must hold at least two distinct sizes > 0, got {ns!r}")
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        return math.nan
    x = [math.log(n) for n in ns]
    y = [math.log(v) for v in values]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def _calibrate_batch_norm(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device) -> None:
    """Running statistics of every batch-norm layer from two batches of the training images: with the initial
    (0, 1) statistics a random ResNet-32 in eval mode doubles its activations' scale at every block and saturates
    the softmax, which no trained model does."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for start in range(0, min(len(images), 2 * batch_size), batch_size):
            model(images[start:start + batch_size].to(device))
    model.eval()


def measure_case(case: ScaleCase) -> dict:
    """Build the data and the model of ``case`` and time one ``iaerf.energy_influence`` call on them (run it in a
    fresh process: see the module docstring). Returns the total and per-stage seconds, the memory figures and a
    check of the result (its shape and how many values are finite)."""
    import iaerf
    from iaerf.longtail.models import build_model

    device = torch.device(case.device)
    torch.manual_seed(case.seed)
    train = cifar_like(long_tailed_counts(case.n), case.image_size, case.seed)
    val = cifar_like([case.val // NUM_CLASSES] * NUM_CLASSES, case.image_size, case.seed + 1)
    model = build_model("resnet32", NUM_CLASSES).to(device)
    _calibrate_batch_norm(model, train[0], case.batch_size, device)
    num_params = sum(p.numel() for p in model.parameters())

    variant = dict(VARIANTS[case.variant])
    if variant["params"] is None:  # every parameter K-FAC covers: batch norm is left out by name
        from iaerf.hessian.kfac import kfac_parameters

        variant["params"] = list(kfac_parameters(model))
    kwargs = dict(damping=case.damping, batch_size=case.batch_size, device=device, seed=case.seed, **variant)
    # lazy imports and torch.func's first-call set-up would otherwise land in the first stage's time (seconds, the
    # same at every n) and flatten the growth exponents; the cheap classifier-only call warms the same transforms
    t0 = time.perf_counter()
    import iaerf.hessian.kfac  # noqa: F401
    warm = WARMUP_POINTS
    iaerf.energy_influence(model, (train[0][:warm], train[1][:warm]), (val[0][:warm], val[1][:warm]),
                           progress=False, **{**kwargs, **VARIANTS["classifier"]})
    warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    with common.PeakRss() as peak:
        t0 = time.perf_counter()
        with common.StageClock() as clock:
            scores = iaerf.energy_influence(model, train, val, progress=True, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    stages = {desc: sec for desc, sec in clock.seconds.items() if desc in STAGES}
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {
        "case": asdict(case),
        "num_params": num_params,
        "total_s": total,
        "warmup_s": warmup_s,
        "stages_s": stages,
        "peak_rss_bytes": peak.high_water,
        "peak_rss_increase_bytes": peak.increase,
        "memory_source": peak.source,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() - cuda_base if device.type == "cuda" else None,
        "scores_shape": list(scores.shape),
        "scores_finite": int(torch.isfinite(scores).sum()),
    }


def _in_fresh_process(case: ScaleCase) -> dict:
    return common.in_fresh_process(measure_case, case)


def _single(seconds: float) -> dict:
    # one run per case (a full-size case takes minutes): no spread to report
    return {"median": seconds, "iqr": math.nan}


_NO_BASELINE = {"median": math.nan, "iqr": math.nan}


def _case_row(result: dict, title: str) -> dict:
    case = result["case"]
    stages = ", ".join(f"{k} {common._fmt_time(v)}" for k, v in result["stages_s"].items())
    cuda = (f"; CUDA peak allocated {common._fmt_bytes(result['cuda_peak_bytes'])}"
            if result["cuda_peak_bytes"] is not None else "")
    r = common.row(
        f"scale: {title}", f"n={case['n']} val={case['val']} {case['image_size']}x{case['image_size']} "
        f"P={result['num_params']} {case['device']}", "fp32", "none (one run per size)", _NO_BASELINE,
        _single(result["total_s"]), peak_bytes=result["peak_rss_increase_bytes"],
        note=f"stages: {stages}; peak RSS +{common._fmt_bytes(result['peak_rss_increase_bytes'])} "
             f"({result['memory_source']}), process high-water {common._fmt_bytes(result['peak_rss_bytes'])}{cuda}; "
             f"untimed classifier-only warm-up call on {WARMUP_POINTS} points {common._fmt_time(result['warmup_s'])}; "
             f"damping={case['damping']} batch={case['batch_size']}")
    r.update(variant=case["variant"], n=case["n"], stages_s=result["stages_s"],
             peak_rss_bytes=result["peak_rss_bytes"], memory_source=result["memory_source"],
             cuda_peak_bytes=result["cuda_peak_bytes"], warmup_s=result["warmup_s"],
             scores_shape=result["scores_shape"], scores_finite=result["scores_finite"])
    return r


def _growth_row(results: list[dict], title: str) -> dict:
    ns = [r["case"]["n"] for r in results]
    exponents = {"total": growth_exponent(ns, [r["total_s"] for r in results]),
                 "peak_rss_increase": growth_exponent(ns, [r["peak_rss_increase_bytes"] for r in results])}
    for stage in results[-1]["stages_s"]:
        exponents[stage] = growth_exponent(ns, [r["stages_s"].get(stage, 0.0) for r in results])
    last = results[-1]
    r = common.row(
        f"scale: {title}, growth with n", f"n={'/'.join(map(str, ns))} {last['case']['device']}", "fp32",
        "none", _NO_BASELINE, _single(last["total_s"]), peak_bytes=last["peak_rss_increase_bytes"],
        note="log-log slope against n: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items())
             + " (1.00 = linear; the time shown is the largest n's)")
    r.update(variant=last["case"]["variant"], sizes=ns, growth_exponents=exponents)
    return r


def run(quick: bool = False, sizes=None, device: str = "cpu", variants=None, val: int | None = None,
        image_size: int | None = None) -> list[dict]:
    """Rows (benchmarks/common.py ``row``, plus ``variant``, ``n``, ``stages_s``, ... keys) of every variant at
    every size, each variant followed by its growth row (``growth_exponents``: stage or figure -> slope)."""
    sizes = tuple(sizes) if sizes is not None else (QUICK_SIZES if quick else FULL_SIZES)
    variants = tuple(variants) if variants is not None else tuple(VARIANTS)
    val = val if val is not None else (10 if quick else 500)
    image_size = image_size if image_size is not None else (8 if quick else 32)
    for n in sizes:
        long_tailed_counts(n)  # every size checked before the first, possibly long, case
    if len(set(sizes)) < 2:
        raise ValueError(f"sizes must hold at least two distinct n to give a growth exponent, got {sizes!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty selection of {sorted(VARIANTS)}, got {variants!r}")
    if isinstance(val, bool) or not isinstance(val, int) or val < NUM_CLASSES or val % NUM_CLASSES:
        raise ValueError(f"val must be a positive multiple of {NUM_CLASSES} (class-balanced), got {val!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4 (ResNet-32 downsamples twice), got {image_size!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")

    rows = []
    for variant in variants:
        results = []
        for n in sorted(sizes):
            result = _in_fresh_process(ScaleCase(variant, n, val, image_size, device))
            print(f"[scale] {variant} n={n}: {result['total_s']:.2f} s, peak RSS "
                  f"+{common._fmt_bytes(result['peak_rss_increase_bytes'])}, stages "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in result["stages_s"].items()), flush=True)
            results.append(result)
            rows.append(_case_row(result, VARIANT_TITLES[variant]))
        rows.append(_growth_row(results, VARIANT_TITLES[variant]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"n = {QUICK_SIZES} on 8x8 images")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"training set sizes (default {FULL_SIZES})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--val", type=int, default=None, help="validation points (default 500; --quick 20)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default 32; --quick 8)")
    common.add_load_arguments(parser)
    args = parser.parse_args()
    common.guard_load_or_exit(args.allow_busy)
    print(common.machine_description())
    rows = run(args.quick, args.sizes, args.device, args.variants, args.val, args.image_size)
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()
