"""Pairwise loss influence (Eq. 4 per test point, ``iaerf.loss_influence_on_test``) against one
``iaerf.loss_influence`` call per test point (what a user without a pairwise API writes), and against the peers'
pairwise scores on the same problems, side by side in one run.

Quantity: the [k, n] matrix I[j, i] = -g_test_j^T (G + (weight_decay + damping) I)^{-1} g_train_i, G the Gauss-Newton
matrix of the mean training cross-entropy, g the per-example cross-entropy gradients.
Cases (float64, Gauss-Newton, damping 1e-3, weight decay 1e-2, CG to relative residual 1e-8):
  - tanh MLP (64-128-10, P = 9,610), n = 1,000 training points, k = 10 test points;
  - digits-sized SmallCNN (P = 24,058 with batch norm), n = 300, k = 5.
(--quick: n = 200 / 100, k = 4 / 2.)

Rows per case:
  - iaerf's pairwise call against the loop of k calls (medians over --reps runs, default 1, after one untimed run),
    their ratio, and the largest relative difference between the two [k, n] results (they solve the same systems);
  - one row per peer method (baseline = the peer, iaerf = the same pairwise call), its time (median over --reps
    after one untimed run that gives its scores) and its agreement with iaerf's answer over the same parameters
    (the reference: CG to relative residual 1e-8, which agrees with the exact solve to about 1e-7): max relative
    error (max |peer - ref| / max |ref|), Pearson and Spearman over all k * n entries, the least-squares factor
    that maps the peer's scores (after the sign convention) onto the reference (1 when the scaling is the same),
    and the worst row's Spearman. A peer that is not importable gives a row saying "not installed" and no number.

Peers and their conventions (run in .venv-peers: ``bash benchmarks/setup_peers.sh``):
  - dattri 0.3, ``IFAttributorCG(...).attribute(train_loader, test_loader)``: returns [n, k] of
    +g_train^T (H + regularization I)^{-1} g_test with H the Hessian of its ``loss_func`` over the whole train loader
    (one batch, mean cross-entropy: the same 1/n); iaerf's I is minus its transpose, with ``regularization =
    weight_decay + damping``. dattri inverts the Hessian of the loss it is given: to give it the Gauss-Newton matrix,
    its ``loss_func`` is the cross-entropy of the model linearised at the trained weights (f(theta_0) + J (theta -
    theta_0)), whose Hessian at theta_0 is exactly J^T H_out J and whose gradients are the model's. Its CG has no
    tolerance (it runs ``max_iter`` iterations on every vector): ``max_iter`` is the iterations iaerf's CG needed.
    ``IFAttributorExplicit`` is not run: it builds the dense [P, P] Hessian with torch.func.hessian (forward over
    reverse, P tangents of every activation of every training point at once: tens of GB at these P).
  - kronfluence 1.0.1, ``Analyzer.compute_pairwise_scores`` with ``FactorArguments(strategy="ekfac")`` and
    ``strategy="identity"`` (it offers no exact strategy; identity is the plain gradient dot product): returns [k, n]
    of +g_test^T (F + damping_factor I)^{-1} g_train, F its factored true Fisher of the summed loss averaged over the
    training points (the Gauss-Newton matrix of the mean, in expectation over its sampled labels); iaerf's I is minus
    it, with ``damping_factor = weight_decay + damping``. It covers nn.Linear / nn.Conv2d only: on the SmallCNN the
    reference is iaerf's answer over those parameters (batch norm left out). Factors and scores in float64.

    python -m benchmarks.bench_pairwise [--quick] [--reps 1]
    .venv-peers/bin/python -m benchmarks.bench_pairwise [--quick]      # with the peers' rows
"""
from __future__ import annotations

import argparse
import copy
import math
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import iaerf
from benchmarks import common
from iaerf.hessian.kfac import kfac_parameters
from iaerf.longtail.models import SmallCNN

WEIGHT_DECAY, DAMPING, TOL = 1e-2, 1e-3, 1e-8


def _cases(quick: bool):
    g = torch.Generator().manual_seed(0)
    n, k = (200, 4) if quick else (1000, 10)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    yield ("tanh MLP", mlp, (torch.randn(n, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)),
           (torch.randn(k, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (k,), generator=g)))
    n, k = (100, 2) if quick else (300, 5)
    cnn = SmallCNN(10).double().eval()
    yield ("SmallCNN 8x8", cnn, (torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)),
           (torch.rand(k, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (k,), generator=g)))


def _settings(**overrides) -> iaerf.InfluenceSettings:
    return iaerf.InfluenceSettings(weight_decay=WEIGHT_DECAY, damping=DAMPING, gauss_newton=True, solver="cg",
                                   solver_options={"tol": TOL, "max_iter": 2000}, **overrides)


def _cg_iterations(model, train, test, settings) -> int:
    """The iterations iaerf's batched CG runs on this problem (the budget dattri's tolerance-free CG gets)."""
    import iaerf.hessian

    solve, seen = iaerf.hessian.inverse_hvp, []

    def spy(*args, **kwargs):
        x, info = solve(*args, **kwargs, return_info=True)
        seen.append(info["iterations"])
        return x

    iaerf.hessian.inverse_hvp = spy
    try:
        iaerf.loss_influence_on_test(model, train, test, settings, progress=False)
    finally:
        iaerf.hessian.inverse_hvp = solve
    return max(seen)


# -- the peers: (model, train, test, budget) -> I [k, n] in iaerf's convention --------------------------------------


def _dattri_cg(model, train, test, max_iter: int) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    theta0 = {k: v.detach() for k, v in model.named_parameters()}

    def linearised_ce(params, data):
        # Hessian at theta0 = J^T H_out J (the Gauss-Newton matrix), gradient = the model's: see the module docstring
        x, y = data
        delta = {k: params[k] - theta0[k] for k in theta0}
        out, tangent = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (theta0,), (delta,))
        return F.cross_entropy(out + tangent, y.long())

    task = AttributionTask(loss_func=linearised_ce, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorCG(task, max_iter=max_iter, regularization=WEIGHT_DECAY + DAMPING)
    train_loader = DataLoader(TensorDataset(*train), batch_size=len(train[1]))  # one batch: one H over all of train
    attributor.cache(train_loader)
    scores = attributor.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=len(test[1])))  # [n, k]
    return -scores.detach().T


def _kronfluence(model, train, test, strategy: str) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    f64 = torch.float64
    task = common.kronfluence_ce_task()
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)    # kronfluence wraps the layers in place
    factor_args = FactorArguments(strategy=strategy, activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                                  eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    score_args = ScoreArguments(damping_factor=WEIGHT_DECAY + DAMPING, per_sample_gradient_dtype=f64,
                                precondition_dtype=f64, score_dtype=f64)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench_pairwise", wrapped, task, cpu=True, disable_tqdm=True, disable_model_save=True,
                            output_dir=out)
        train_ds, test_ds = torch.utils.data.TensorDataset(*train), torch.utils.data.TensorDataset(*test)
        analyzer.fit_all_factors("f", train_ds, factor_args=factor_args, per_device_batch_size=len(train[1]),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", test_ds, train_ds, per_device_query_batch_size=len(test[1]),
                                         per_device_train_batch_size=len(train[1]), score_args=score_args,
                                         overwrite_output_dir=True)
        return -analyzer.load_pairwise_scores("s")["all_modules"]   # [k, n]


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# -- agreement ----------------------------------------------------------------------------------------------------


def _ranks(t: torch.Tensor) -> torch.Tensor:
    return t.argsort().argsort().double()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def agreement(peer: torch.Tensor, ref: torch.Tensor) -> dict:
    """How a peer's [k, n] scores (already in iaerf's sign convention) match the reference [k, n]: max relative error
    (max |peer - ref| / max |ref|), Pearson and Spearman over all entries, the worst row's Spearman, and the
    least-squares factor alpha minimising ||alpha peer - ref|| (1 when the scaling conventions agree)."""
    if peer.shape != ref.shape:
        raise ValueError(f"peer scores have shape {tuple(peer.shape)}, the reference {tuple(ref.shape)}")
    a, b = peer.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        return {"max_rel_err": math.inf, "pearson": math.nan, "spearman": math.nan, "worst_row_spearman": math.nan,
                "factor": math.nan}
    return {"max_rel_err": float((a - b).abs().max() / b.abs().max()),
            "pearson": _pearson(a.reshape(-1), b.reshape(-1)),
            "spearman": _pearson(_ranks(a.reshape(-1)), _ranks(b.reshape(-1))),
            "worst_row_spearman": min(_pearson(_ranks(x), _ranks(y)) for x, y in zip(a, b)),
            "factor": float((a * b).sum() / (a * a).sum())}


def _peer_row(name, shape, library, method, peer_t, iaerf_t, agree: dict | None, note: str) -> dict:
    nan = {"median": math.nan, "iqr": math.nan}
    if agree is not None:
        note = (f"vs iaerf: Pearson {agree['pearson']:.6f}, Spearman {agree['spearman']:.6f} (worst row "
                f"{agree['worst_row_spearman']:.4f}), least-squares factor {agree['factor']:.4f}; " + note)
    return common.row(name, shape, "float64", f"{library} {method} (pairwise)", peer_t or nan, iaerf_t,
                      max_err=None if agree is None else agree["max_rel_err"], peers={library: peer_t},
                      target="report: speed and agreement", note=note)


def run(quick: bool = False, reps: int = 1) -> list[dict]:
    rows = []
    for name, model, train, test in _cases(quick):
        settings = _settings()
        k = len(test[1])

        def pairwise():
            return iaerf.loss_influence_on_test(model, train, test, settings, progress=False)

        def loop():
            return torch.stack([iaerf.loss_influence(model, train, (test[0][j:j + 1], test[1][j:j + 1]), settings,
                                                     progress=False) for j in range(k)])

        a, b = pairwise(), loop()
        p = sum(t.numel() for t in model.parameters())
        shape = f"P={p:,}, n={len(train[1]):,}, k={k}"
        pairwise_t = common.time_fn(pairwise, warmup=0, reps=reps)
        rows.append(common.row(
            name, shape, "float64", f"{k} loss_influence calls",
            common.time_fn(loop, warmup=0, reps=reps), pairwise_t,
            max_err=common.max_rel_error(a, b), target="faster than the loop",
            note="max_rel_err: pairwise against the loop (same systems)"))

        # the peers, each against iaerf's answer over the parameters it covers
        covered = list(kfac_parameters(model))
        p_kron = sum(model.get_parameter(c).numel() for c in covered)
        ref_kron = a if p_kron == p or not _installed("kronfluence") else iaerf.loss_influence_on_test(
            model, train, test, _settings(params=covered), progress=False)
        if not _installed("dattri"):
            rows.append(_peer_row(name, shape, "dattri", "CG", None, pairwise_t, None,
                                  "dattri not installed (bash benchmarks/setup_peers.sh, then run from .venv-peers)"))
        else:
            iters = _cg_iterations(model, train, test, settings)
            scores = _dattri_cg(model, train, test, iters)
            agree = agreement(scores, a)
            peer_t = common.time_fn(lambda: _dattri_cg(model, train, test, iters), warmup=0, reps=reps)
            rows.append(_peer_row(name, shape, "dattri", "CG", peer_t, pairwise_t, agree,
                                  f"max_iter {iters} (iaerf's CG iterations at tol {TOL:g}), Gauss-Newton by "
                                  f"linearisation; explicit inverse not run (dense torch.func.hessian at P={p:,})"))
        for strategy in ("ekfac", "identity"):
            if not _installed("kronfluence"):
                rows.append(_peer_row(name, shape, "kronfluence", strategy, None, pairwise_t, None,
                                      "kronfluence not installed (bash benchmarks/setup_peers.sh, then run from "
                                      ".venv-peers)"))
                continue
            scores = _kronfluence(model, train, test, strategy)
            agree = agreement(scores, ref_kron)
            peer_t = common.time_fn(lambda: _kronfluence(model, train, test, strategy), warmup=0, reps=reps)
            where = ("all parameters" if ref_kron is a else
                     f"reference over the {p_kron:,} nn.Linear / nn.Conv2d parameters kronfluence covers")
            rows.append(_peer_row(name, shape, "kronfluence", strategy, peer_t, pairwise_t, agree,
                                  f"{where}; iaerf time: its pairwise call over all {p:,} parameters"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=1)
    common.add_load_arguments(parser)
    args = parser.parse_args()
    common.guard_load_or_exit(args.allow_busy)
    print(common.machine_description())
    print(common.markdown_table(run(quick=args.quick, reps=args.reps)))
