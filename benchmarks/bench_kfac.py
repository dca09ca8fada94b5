"""EK-FAC influence in iaerf and in kronfluence 1.0.1, side by side (issue 13): same model, data and damping.

For each case: time to fit the EK-FAC factors (both passes), time to score every training point against the mean
validation loss (iaerf: one solve + one forward-mode JVP pass; kronfluence: per-example gradients against the
preconditioned query gradients), the Pearson between the two libraries' scores and, where affordable, of each with
the exact Gauss-Newton influence (CG on iaerf's Gauss-Newton operator, tol 1e-8).

Cases: the digits SmallCNN (full model, batch norm frozen and left out) and ResNet-32 on CIFAR-10-LT-sized random
data (12,406 training points; no exact reference). kronfluence runs only when importable:

    bash benchmarks/setup_peers.sh          # .venv-peers, with kronfluence 1.0.1 beside dattri and pyDVL
    .venv-peers/bin/python -m benchmarks.bench_kfac [--smoke] [--device cuda] [--out FILE.json]

or, with every other benchmark, ``.venv-peers/bin/python -m benchmarks.run_all``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch

from benchmarks import common
from iaerf.core.io import write_json
from iaerf.hessian import ModuleHessian, inverse_hvp
from iaerf.hessian.kfac import KFACOperator, kfac_parameters
from iaerf.hessian.params import flatten, unflatten
from iaerf.core.indexed_data import IndexedData
from iaerf.influence.gradients import directional_derivatives, loss_from_logits, loss_gradients
from iaerf.longtail.models import ResNet32, SmallCNN


def _pearson(a, b) -> float:
    return float(torch.corrcoef(torch.stack([a.double().cpu(), b.double().cpu()]))[0, 1])


def _case_data(shape, n_train, n_val, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand((n_train,) + shape, generator=g), torch.randint(0, classes, (n_train,), generator=g)),
            (torch.rand((n_val,) + shape, generator=g), torch.randint(0, classes, (n_val,), generator=g)))


def iaerf_ekfac(model, train, val, damping, batch_size, device):
    """``(scores [n], fit seconds, score seconds)``: I_loss(x_i) = -g_val^T (G_ekfac + damping I)^{-1} g_i."""
    t0 = time.perf_counter()
    # K-FAC covers the Linear and Conv2d layers; batch norm (frozen, as in fine-tuning) is left out by name
    op = KFACOperator(model, train, params=list(kfac_parameters(model)), method="ekfac", batch_size=batch_size,
                      device=device, progress=False)
    t1 = time.perf_counter()
    params = {k: p for k, p in model.named_parameters() if k in op.param_names}
    tr, va = IndexedData(train, "train"), IndexedData(val, "val")
    g = flatten(loss_gradients(model, params, va, range(len(va)), total=len(va), batch_size=batch_size,
                               device=device))
    s = op.solve(g, damping)
    scores = -directional_derivatives(model, params, unflatten(s, params), tr, range(len(tr)), fn=loss_from_logits,
                                      batch_size=batch_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return scores, t1 - t0, time.perf_counter() - t1, op.param_names


def exact_ggn(model, train, val, names, damping, batch_size, device):
    """The exact Gauss-Newton influence by CG (the reference both libraries approximate)."""
    H = ModuleHessian(model, train, params=names, gauss_newton=True, batch_size=batch_size, device=device)
    params = {k: p for k, p in model.named_parameters() if k in names}
    va, tr = IndexedData(val, "val"), IndexedData(train, "train")
    g = flatten(loss_gradients(model, params, va, range(len(va)), total=len(va), batch_size=batch_size,
                               device=device))
    s = inverse_hvp(H, g, "cg", damping=damping, tol=1e-8, max_iter=2000, progress=False)
    return -directional_derivatives(model, params, unflatten(s, params), tr, range(len(tr)), fn=loss_from_logits,
                                    batch_size=batch_size, device=device)


def kronfluence_ekfac(model, train, val, damping, batch_size, device):
    """``(scores [n], fit seconds, score seconds)`` from kronfluence's EK-FAC, the mean over validation queries of
    its pairwise scores, negated to iaerf's sign (kronfluence scores g_val^T H^-1 g_i)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = common.kronfluence_ce_task()
    model = prepare_model(copy.deepcopy(model).eval(), task)   # kronfluence wraps the layers in place
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", model, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=out)
        tds = torch.utils.data.TensorDataset(*train)
        vds = torch.utils.data.TensorDataset(*val)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("f", tds, factor_args=FactorArguments(strategy="ekfac"),
                                 per_device_batch_size=batch_size, overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores("s", "f", vds, tds, per_device_query_batch_size=len(val[0]),
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(damping_factor=damping),
                                         overwrite_output_dir=True)
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
    return -scores.mean(0), t1 - t0, t2 - t1


def run_case(name, model, shape, n_train, n_val, classes, damping, batch_size, device, exact):
    train, val = _case_data(shape, n_train, n_val, classes, 0)
    model = model.to(device).eval()
    train = tuple(t.to(device) for t in train)
    val = tuple(t.to(device) for t in val)
    ours, fit, score, names = iaerf_ekfac(model, train, val, damping, batch_size, device)
    row = {"case": name, "n_train": n_train, "num_params": sum(model.get_parameter(k).numel() for k in names),
           "damping": damping, "iaerf_fit_s": fit, "iaerf_score_s": score}
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        row["kronfluence"] = "not installed (bash benchmarks/setup_peers.sh, then run from .venv-peers)"
    else:
        theirs, kfit, kscore = kronfluence_ekfac(model, train, val, damping, batch_size, device)
        row.update(kronfluence_fit_s=kfit, kronfluence_score_s=kscore, pearson_iaerf_kronfluence=_pearson(ours, theirs),
                   speedup_end_to_end=(kfit + kscore) / (fit + score))
    if exact:
        ref = exact_ggn(model, train, val, names, damping, batch_size, device)
        row["pearson_iaerf_exact"] = _pearson(ours, ref)
        if "pearson_iaerf_kronfluence" in row:
            row["pearson_kronfluence_exact"] = _pearson(theirs, ref)
    return row


def cases(quick: bool, resnet_n: int = 12406) -> list[tuple]:
    """(name, model, input shape, n_train, n_val, classes, damping, batch_size, exact reference?) per case."""
    if quick:
        return [("SmallCNN digits (smoke)", SmallCNN(width=2), (1, 8, 8), 64, 8, 10, 1e-3, 32, True),
                ("ResNet-32 (smoke)", ResNet32(num_classes=10), (3, 8, 8), 16, 4, 10, 1e-3, 8, False)]
    return [("SmallCNN digits", SmallCNN(), (1, 8, 8), 1437, 180, 10, 1e-3, 256, True),
            (f"ResNet-32 {'CIFAR-10-LT size' if resnet_n == 12406 else 'random 32x32'}", ResNet32(num_classes=10),
             (3, 32, 32), resnet_n, 500, 10, 1e-3, 128, False)]


def _table_row(r: dict) -> dict:
    """``r`` (a :func:`run_case` result) as a benchmarks/common.py row: kronfluence end to end is the baseline."""
    ours = {"median": r["iaerf_fit_s"] + r["iaerf_score_s"], "iqr": math.nan}
    theirs = ({"median": r["kronfluence_fit_s"] + r["kronfluence_score_s"], "iqr": math.nan}
              if "kronfluence_fit_s" in r else {"median": math.nan, "iqr": math.nan})
    parts = [f"iaerf fit {r['iaerf_fit_s']:.2f} s + score {r['iaerf_score_s']:.2f} s"]
    if "kronfluence_fit_s" in r:
        parts.append(f"kronfluence fit {r['kronfluence_fit_s']:.2f} s + score {r['kronfluence_score_s']:.2f} s; "
                     f"Pearson iaerf-kronfluence {r['pearson_iaerf_kronfluence']:.4f}")
    else:
        parts.append(f"kronfluence {r['kronfluence']}")
    if "pearson_iaerf_exact" in r:
        parts.append(f"Pearson with the exact Gauss-Newton influence: iaerf {r['pearson_iaerf_exact']:.4f}"
                     + (f", kronfluence {r['pearson_kronfluence_exact']:.4f}" if "pearson_kronfluence_exact" in r
                        else ""))
    parts.append(f"damping {r['damping']:g}; one run each (minutes per case)")
    row = common.row(f"EK-FAC loss influence of every training point, {r['case']}",
                     f"n={r['n_train']} P={r['num_params']}", "fp32", "kronfluence 1.0.1 EK-FAC (fit + score)",
                     theirs, ours, target=">= 2x at equal accuracy", note="; ".join(parts))
    row["raw"] = r
    return row


def run(quick: bool = False, device: str = "cpu", resnet_n: int | None = None) -> list[dict]:
    """benchmarks/run_all.py's entry: one row per case of :func:`cases`. ``resnet_n`` (default: the environment
    variable IAERF_BENCH_KFAC_RESNET_N, else CIFAR-10-LT's 12,406) sets the ResNet-32 case's training points."""
    if resnet_n is None:
        resnet_n = int(os.environ.get("IAERF_BENCH_KFAC_RESNET_N", "12406"))
    torch.manual_seed(0)
    dev = torch.device(device)
    # untimed warm-up of both libraries on the smoke case: the first call of either pays one-time costs that are
    # not the method's (torch.func's first grad imports torch._dynamo, ~1.7 s here)
    name, model, shape, n, m, k, d, bs, _ = cases(True)[0]
    run_case(name, model, shape, n, m, k, d, bs, dev, False)
    return [_table_row(run_case(name, model, shape, n, m, k, d, bs, dev, exact))
            for name, model, shape, n, m, k, d, bs, exact in cases(quick, resnet_n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--resnet-n", type=int, default=12406,
                        help="ResNet-32 training points (default: CIFAR-10-LT's 12,406)")
    common.add_load_arguments(parser)
    args = parser.parse_args(argv)
    common.guard_load_or_exit(args.allow_busy)
    print(common.machine_description())
    rows = run(args.smoke, args.device, args.resnet_n)
    print(common.markdown_table(rows))
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
