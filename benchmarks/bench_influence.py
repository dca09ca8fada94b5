"""Benchmark of the energy influence (issue 4): the forward-mode pass against a plain forward and against the
per-example-gradient loop that influence libraries use today, and the stages of an end-to-end run.

Cases (fp32, eval mode, random CIFAR-sized inputs 3x32x32 unless noted):
  - JVP pass cost: ``directional_derivatives`` (one forward-mode pass, all parameters get the tangent s) vs one
    plain no-grad forward over the same n inputs, for iaerf.longtail.models.SmallCNN and ResNet32. Target: JVP / forward
    <= 4 (the floor is about 3: the primal plus the tangent of every layer).
  - All-training-point influence: the JVP pass vs torch-influence's loop (batch size 1: forward, backward, flatten
    the per-example gradient, dot with s). SmallCNN on n = 5,000 digits-sized 1x8x8 inputs (its use in this
    project) timed in full, and on n = 5,000 CIFAR-sized inputs and ResNet-32 on n = 1,024 with the loop timed on
    a subset and extrapolated linearly to n. Errors of both against a float64 reference on the looped points.
    Timings of different methods are interleaved rep by rep (the 2-core machine is shared). In fp32 a few points
    sit on a ReLU / max-pool kink where rounding picks the other branch (the derivative jumps); the note counts
    the points off by more than 1e-5 of max |I| for each method.
  - End-to-end ``energy_influence`` on long-tailed digits (SmallCNN, 503 training points, balanced test set as
    val), split by stage: validation gradient, Hessian set-up + inverse-HVP solve, JVP pass (the rest: probing,
    label checks, feature capture). Full model with LiSSA, and classifier-only with CG on the native head operator.

    python -m benchmarks.bench_influence [--quick] [--device cuda]
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from benchmarks import common
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.gradients import directional_derivatives, energy_from_logits
from iaerf.longtail.models import ResNet32, SmallCNN


# Batch size of the forward-mode pass per input size. On a CPU, conv activations and their tangents should stay in
# cache: at 3x32x32, batches of 16-64 run the pass 1.5-2.9x faster than 256 (measured here); tiny 8x8 inputs
# prefer large batches (per-call overhead dominates).
BATCH = {(3, 32, 32): 64, (1, 8, 8): 256}


def _model(name: str, device, in_channels: int = 3):
    torch.manual_seed(0)
    model = SmallCNN(10, in_channels=in_channels) if name == "small_cnn" else ResNet32(10)
    # non-trivial batch-norm statistics, so eval mode is a real affine map
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.to(device).eval()


def _inputs(n, device, seed=0, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _direction(model, device, shape=(3, 32, 32)):
    """A realistic direction s: the gradient of the mean CE over 64 other inputs (what H^{-1} is applied to).

    A random s makes the directional derivative an ill-conditioned sum with heavy cancellation, where fp32 loses
    about 3 digits for either method; a loss gradient is what the influence actually dots with.
    """
    params = dict(model.named_parameters())
    x, y = _inputs(64, device, seed=5, shape=shape)
    dtype = next(iter(params.values())).dtype
    g = torch.autograd.grad(F.cross_entropy(model(x.to(dtype)), y), list(params.values()))
    return params, {k: v.detach() for k, v in zip(params, g)}


def _jvp_pass(model, params, s, data, n, batch_size, device):
    return -directional_derivatives(model, params, s, data, range(n), batch_size=batch_size, device=device)


def _forward_pass(model, data, n, batch_size, device):
    with torch.no_grad():
        return torch.cat([model(x).float() for x, _ in data.batches(range(n), batch_size, device)])


def _per_example_loop(model, params, s, x, indices):
    """torch-influence's way: one forward + backward per training point, flatten, dot with s."""
    names = list(params)
    flat_s = torch.cat([s[k].reshape(-1) for k in names])
    out = []
    for i in indices:
        energy = energy_from_logits(model(x[i:i + 1])).sum()
        grads = torch.autograd.grad(energy, [params[k] for k in names])
        out.append(-(torch.cat([g.reshape(-1) for g in grads]) @ flat_s))
    return torch.stack(out)


def _interleaved(fns: dict, reps: int, warmup: int = 1, device=None) -> dict:
    """Time several functions rep by rep in alternation, so that a load spike on this shared machine hits all of
    them alike; returns ``{name: common.time_fn-style dict}``."""
    import statistics

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            common._sync(device)
            t0 = time.perf_counter()
            fn()
            common._sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median": statistics.median(ts), "min": ts[0], "max": ts[-1], "iqr": q[2] - q[0], "n": len(ts)}
    return out


def _jvp_vs_forward_rows(quick, device):
    rows = []
    for name in ("small_cnn", "resnet32"):
        n = (256 if name == "small_cnn" else 128) if quick else (2048 if name == "small_cnn" else 512)
        bs = BATCH[(3, 32, 32)]
        model = _model(name, device)
        params, s = _direction(model, device)
        x, y = _inputs(n, device)
        data = IndexedData((x, y), "train")
        t = _interleaved({"fwd": lambda: _forward_pass(model, data, n, bs, device),
                          "jvp": lambda: _jvp_pass(model, params, s, data, n, bs, device)},
                         reps=3 if quick else 7, device=device)
        ratio = t["jvp"]["median"] / t["fwd"]["median"]
        rows.append(common.row(
            f"JVP pass vs forward, {name}", f"n={n}, 3x32x32, batch {bs}, P={sum(p.numel() for p in params.values())}",
            "float32", "plain forward (no grad)", t["fwd"], t["jvp"], target="JVP / forward <= 4",
            note=f"JVP / forward = {ratio:.2f} (speedup column = forward / JVP; min-time ratio "
                 f"{t['jvp']['min'] / t['fwd']['min']:.2f})"))
    return rows


def _all_points_rows(quick, device):
    rows = []
    # (model, input shape, n, points looped: None = all n)
    cases = [
        ("small_cnn", (1, 8, 8), 1000 if quick else 5000, None),
        ("small_cnn", (3, 32, 32), 500 if quick else 5000, 200 if quick else 1000),
        ("resnet32", (3, 32, 32), 128 if quick else 1024, 32 if quick else 200),
    ]
    for name, shape, n, looped in cases:
        model = _model(name, device, in_channels=shape[0])
        params, s = _direction(model, device, shape)
        x, y = _inputs(n, device, seed=2, shape=shape)
        data = IndexedData((x, y), "train")
        idx = list(range(n if looped is None else looped))
        out = {}

        def jvp_all():
            out["jvp"] = _jvp_pass(model, params, s, data, n, BATCH[shape], device)

        def loop_some():
            out["loop"] = _per_example_loop(model, params, s, x, idx)
        # warm-up of both on a few points (oneDNN builds its kernels per input shape), then the long loop once,
        # interleaved with the JVP reps
        _per_example_loop(model, params, s, x, idx[:3])
        _jvp_pass(model, params, s, IndexedData((x[:300], y[:300]), "train"), min(n, 300), BATCH[shape], device)
        t = _interleaved({"jvp": jvp_all, "loop": loop_some}, reps=1, warmup=0, device=device)
        t_jvp = common.time_fn(jvp_all, warmup=0, reps=2, device=device)
        t_jvp = t_jvp if t_jvp["median"] <= t["jvp"]["median"] else t["jvp"]
        # float64 reference on the looped points: the forward-mode pass in float64 (equal to the explicit
        # per-example definition to 1e-10 in tests/influence/test_influence_gradients.py)
        m64 = _model(name, device, in_channels=shape[0]).double()
        p64 = dict(m64.named_parameters())
        s64 = {k: v.double() for k, v in s.items()}
        ref = _jvp_pass(m64, p64, s64, IndexedData((x[idx].double(), y[idx]), "train"), len(idx), 256, device)
        err_jvp = common.max_rel_error(out["jvp"][idx], ref)
        err_loop = common.max_rel_error(out["loop"], ref)
        agree = common.max_rel_error(out["jvp"][idx], out["loop"])
        scale = n / len(idx)
        t_loop_n = {k: (v * scale if isinstance(v, float) else v) for k, v in t["loop"].items()}
        def outliers(v):  # points off by > 1e-5 of the largest |I|: ReLU / max-pool kinks that fp32 flips
            return int(((v.double().cpu() - ref.cpu()).abs() > 1e-5 * ref.abs().max().cpu()).sum())
        note = (f"rel err vs fp64: JVP {err_jvp:.1e} ({outliers(out['jvp'][idx])}/{len(idx)} points > 1e-5), "
                f"loop {err_loop:.1e} ({outliers(out['loop'])}/{len(idx)}); JVP vs loop {agree:.1e}")
        if scale != 1:
            note += f"; loop timed on {len(idx)} points, extrapolated x{scale:.1f} to n={n}"
        target = ">= 4x (CPU), >= 30x (GPU)" if name == "small_cnn" else ">= 2x (CPU), >= 30x (GPU)"
        rows.append(common.row(
            f"all-point influence, {name}", f"n={n}, {'x'.join(map(str, shape))}, "
            f"P={sum(p.numel() for p in params.values())}", "float32",
            "per-example grad loop (torch-influence)", t_loop_n, t_jvp, max_err=err_jvp, target=target, note=note))
    return rows


@contextlib.contextmanager
def _stage_timers(device):
    """Time the three stages of energy_influence by wrapping the functions it calls (no change to the code)."""
    from iaerf.influence import scores as energy_mod

    times = {"validation gradient": 0.0, "solve": 0.0, "JVP pass": 0.0}
    saved = (energy_mod.loss_gradients, energy_mod.directional_derivatives, energy_mod._solve)

    def timed(fn, key):
        def wrapper(*a, **k):
            common._sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            common._sync(device)
            times[key] += time.perf_counter() - t0
            return out
        return wrapper

    energy_mod.loss_gradients = timed(saved[0], "validation gradient")
    energy_mod.directional_derivatives = timed(saved[1], "JVP pass")
    times["_solve_total"] = 0.0
    energy_mod._solve = timed(saved[2], "_solve_total")
    try:
        yield times
    finally:
        energy_mod.loss_gradients, energy_mod.directional_derivatives, energy_mod._solve = saved
        # _solve = validation gradient + Hessian set-up + inverse-HVP
        times["solve"] = times.pop("_solve_total") - times["validation gradient"]


def _pretrained_digits(device):
    from iaerf.longtail.data import load_digits_lt

    torch.manual_seed(0)
    split = load_digits_lt(ratio=10.0, seed=0)
    x, y = split.train.tensors()
    model = SmallCNN(10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), 64):
            i = perm[start:start + 64]
            loss = F.cross_entropy(model(x[i].to(device)), y[i].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), split


def _end_to_end_rows(quick, device):
    from iaerf.influence import energy_influence

    model, split = _pretrained_digits(device)
    rows = []
    cases = [
        # Gauss-Newton: the CNN's Hessian is indefinite at damping 0.01, and LiSSA's curvature check refuses it
        ("full model, Gauss-Newton LiSSA", dict(damping=0.01, solver="lissa", gauss_newton=True,
                                                solver_options={"depth": 100 if quick else 500, "repeats": 2,
                                                                "batch_size": 64})),
        ("classifier-only, CG", dict(params="fc", solver="cg", solver_options={"tol": 1e-8})),
    ]
    for label, kw in cases:
        with _stage_timers(device) as stages:
            t0 = time.perf_counter()
            values = energy_influence(model, split.train, split.test, weight_decay=5e-4, progress=False, **kw)
            total = time.perf_counter() - t0
        other = total - sum(stages.values())
        detail = ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in stages.items())
        t_total = {"median": total, "iqr": 0.0}
        rows.append(common.row(
            f"energy_influence end to end, digits SmallCNN, {label}",
            f"n_train={len(split.train)}, n_val={len(split.test)}, 1x8x8", str(values.dtype).replace("torch.", ""),
            "(stage split)", t_total, t_total, target="report",
            note=f"{detail}, other {other:.3f} s; finite={bool(torch.isfinite(values).all())}"))
    return rows


PARTS = {"jvp_vs_forward": _jvp_vs_forward_rows, "all_points": _all_points_rows, "end_to_end": _end_to_end_rows}


def run(quick: bool = False, device: str = "cpu", only: tuple[str, ...] = tuple(PARTS)) -> list[dict]:
    return common.run_parts(PARTS, only, quick, device)


if __name__ == "__main__":
    common.parts_main(PARTS, __doc__)
