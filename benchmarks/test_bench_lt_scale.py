"""benchmarks/bench_lt_scale.py: the class profiles, the subsample, the features and the NCM classifier, the FLOP
model, argument checks, and one ``--quick`` run of every case in its own process (the rows' structure, stages and
checks of the results; no timing value is checked)."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_lt_scale as lt


@pytest.mark.parametrize("key", sorted(lt.SHAPES))
def test_lt_counts_of_the_real_shapes(key):
    s = lt.SHAPES[key]
    counts, p = lt.lt_counts(s.n, s.num_classes, s.n_max, s.n_min)
    assert len(counts) == s.num_classes and sum(counts) == s.n
    assert counts[0] == s.n_max and counts[-1] == s.n_min
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    # the counts round the profile: each within one point of n_min + (n_max - n_min) (1 - k / (K - 1))^p
    K = s.num_classes
    for k in (0, 1, K // 10, K // 2, K - 2):
        assert abs(counts[k] - (s.n_min + (s.n_max - s.n_min) * (1 - k / (K - 1)) ** p)) < 1 + 1e-9


@pytest.mark.parametrize("n, K, n_max, n_min, match", [
    (10, 1, 5, 1, "num_classes"), (100, 10, 5, 5, "n_max"), (100, 10, 20, 0, "n_min"),
    (10 + 9 * 2, 10, 10, 2, "n must be"), (9 * 10 + 2, 10, 10, 2, "n must be"), (50.0, 10, 10, 2, "n must be"),
])
def test_lt_counts_rejects(n, K, n_max, n_min, match):
    with pytest.raises(ValueError, match=match):
        lt.lt_counts(n, K, n_max, n_min)


def test_scaled_counts_keeps_every_class_and_the_sum():
    full = lt.lt_counts(437_513, 8142, 1000, 2)[0]
    for n in (8142, 8143, 97_078, 437_513):
        sub = lt.scaled_counts(full, n)
        assert sum(sub) == n and min(sub) >= 1 and len(sub) == len(full)
    assert lt.scaled_counts(full, 437_513) == full
    with pytest.raises(ValueError, match="n must be"):
        lt.scaled_counts(full, 8141)


def test_features_labels_and_ncm_classifier():
    counts = [30, 20, 10]
    means = lt.class_means(3, 16, seed=0)
    x, y = lt.lt_features(counts, means, seed=1)
    assert x.shape == (60, 16) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=3).tolist() == counts
    x2, y2 = lt.lt_features(counts, means, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    model = lt.ncm_classifier(means)
    # the argmax of the logits is the nearest class mean (float64 reference on fresh points)
    probe = torch.randn(200, 16, dtype=torch.float64) * 0.5
    nearest = torch.cdist(probe, means.double()).argmin(1)
    with torch.no_grad():
        assert torch.equal(model.double()(probe).argmax(1), nearest)


def test_head_path_peak_and_subsample_size():
    inat, imagenet = lt.SHAPES["inat2018"], lt.SHAPES["imagenet-lt"]
    n, D, K = inat.n, inat.dim, inat.num_classes
    # K-FAC / EK-FAC never build HeadHessian's probabilities; the solvers that multiply by the operator add them
    assert lt.head_path_peak_bytes(n, D, K, "ekfac") == lt.head_path_peak_bytes(n, D, K, "kfac") == 12 * n * D
    for solver in ("cg", "lissa"):
        assert lt.head_path_peak_bytes(n, D, K, solver) - lt.head_path_peak_bytes(n, D, K, "ekfac") == 4 * n * K
    with pytest.raises(ValueError, match="method must be one of"):
        lt.head_path_peak_bytes(n, D, K, "newton")
    # the iNaturalist EK-FAC case now runs at full n within the budget; CG there would not fit
    assert lt.head_path_peak_bytes(n, D, K, "ekfac") <= lt.INAT_MEMORY_BUDGET
    assert lt.subsample_size(inat, "ekfac") == n and lt.subsample_size(imagenet, "ekfac") == imagenet.n
    assert lt.subsample_size(imagenet, "cg") == imagenet.n
    for solver, budget in (("cg", lt.INAT_MEMORY_BUDGET), ("ekfac", 6 * 2**30)):
        sub = lt.subsample_size(inat, solver, budget)
        assert K <= sub < n
        assert lt.head_path_peak_bytes(sub, D, K, solver) <= budget < lt.head_path_peak_bytes(sub + 1, D, K, solver)
    assert lt.subsample_size(inat, "ekfac", budget=1) == K   # one point per class at least
    plan = {c.case: c for c in lt.plan(("inat-ekfac",), quick=False)}
    assert plan["inat-ekfac"].n == n and plan["inat-ekfac"].shape == inat


def test_influence_options_batch():
    assert lt._influence_kwargs("ekfac")["solver_options"].batch_size == lt.BATCH
    assert lt._influence_kwargs("cg")["solver_options"].tol == lt.CG_TOL


def test_stage_costs_and_estimates():
    n, m, D, K = 1000, 100, 64, 50
    a = D + 1
    batches = math.ceil(n / lt.BATCH)
    ek = lt.stage_costs("ekfac", n, m, D, K)
    # eigenvalues: forward, both projections and the one GEMM of the squared projections; no [b, K, a] bytes
    assert ek["EK-FAC eigenvalues"]["flop"] == 2 * n * D * K + 2 * n * a * a + 2 * n * K * K + 2 * n * K * a
    assert ek["EK-FAC eigenvalues"]["bytes"] == 44 * n * (K + a) + batches * (4 * (a * a + K * K) + 40 * K * a)
    assert ek["EK-FAC eigenvalues"]["bytes"] < 16 * n * K * a   # the old per-example temporary's traffic
    assert ek["K-FAC factors"]["bytes"] == batches * (48 * a * a + 40 * K * K)
    # "other" holds the eigendecompositions only: no n K probabilities for EK-FAC
    assert ek["other"] == {"flop": 0, "flop64": 9 * (a ** 3 + K ** 3), "bytes": 0}
    assert ek["energy influence (JVP)"]["flop"] == 4 * n * D * K and ek["features"]["flop"] == 2 * (n + m) * D * K
    cg = lt.stage_costs("cg", n, m, D, K, cg_iterations=7)
    assert cg["CG"] == {"flop": 7 * 4 * n * a * K, "flop64": 2 * n * D * K, "bytes": 12 * n * D + 52 * n * K}
    assert "K-FAC factors" not in cg and "other" not in cg
    assert lt.stage_costs("finetune", n, m, D, K) == {"epoch": {"flop": 4 * n * D * K, "flop64": 0, "bytes": 0}}
    seconds = lt.estimate_seconds({"s": {"flop": 4e9, "flop64": 2e9, "bytes": 3e9}}, rate=1e9, bandwidth=1e9)
    assert seconds == {"s": pytest.approx(4 + 4 + 3)}
    rows = lt.estimates(1e11, 1e10)
    # the iNaturalist EK-FAC case fits at full n: one row for it, at full n
    assert [r["n"] for r in rows if r["case"] == "inat-ekfac"] == [lt.SHAPES["inat2018"].n]
    assert all(r["total_s"] > 0 and math.isfinite(r["total_s"]) for r in rows)


@pytest.mark.parametrize("kwargs, match", [
    ({"cases": ("nope",)}, "cases must be"),
    ({"cases": ()}, "cases must be"),
    ({"cases": ("ekfac",), "inat_n": 500}, "leave out"),
    ({"cases": ("inat-ekfac",), "inat_n": 10}, "inat_n must be"),
    ({"cases": ("inat-ekfac",), "inat_n": 10**7}, "inat_n must be"),
])
def test_run_rejects_bad_arguments_before_any_case(kwargs, match, monkeypatch):
    def no_case(*args):
        raise AssertionError("a case ran before the arguments were checked")

    monkeypatch.setattr(lt.common, "in_fresh_process", no_case)
    monkeypatch.setattr(lt, "matmul_rate", no_case)
    with pytest.raises(ValueError, match=match):
        lt.run(quick=True, **kwargs)


def test_quick_run_rows(capfd):
    rows = lt.run(quick=True)
    err = capfd.readouterr().err
    for desc in ("features", "K-FAC factors", "EK-FAC eigenvalues", "CG", "energy influence (JVP)", "finetune"):
        assert desc in err   # the measuring processes' progress bars reach the command's stderr
    assert [r["lt_case"] for r in rows] == list(lt.DEFAULT_CASES)
    q = lt.QUICK_SHAPE
    for r in rows:
        for key in ("case", "shape", "dtype", "baseline", "note", "load", "target", "cpu_isa"):
            assert key in r
        assert "quick: not judged" in r["target"]
        assert r["iaerf_median_s"] > 0 and r["iaerf_peak_bytes"] is not None and r["limit_fraction"] > 0
        assert r["memory_source"] in ("getrusage ru_maxrss", "sampled /proc/self/statm")
    ekfac, cg, inat, ft = rows
    for r in (ekfac, cg, inat):
        assert r["scores_shape"] == [r["n"]] and r["scores_finite"] == r["n"]
        assert {"features", "validation gradient", "energy influence (JVP)", "other"} <= set(r["stages_s"])
    assert {"K-FAC factors", "EK-FAC eigenvalues"} <= set(ekfac["stages_s"]) and "CG" not in ekfac["stages_s"]
    assert "CG" in cg["stages_s"] and 1 <= cg["cg_iterations"] < 1000 and "HVPs" in cg["note"]
    assert ekfac["n"] == cg["n"] == ft["n"] == q.n
    assert inat["n"] == q.n // 2 and "SUBSAMPLE" in inat["note"] and "head-path peak" in inat["note"]
    assert f"EK-FAC batch {lt.BATCH}" in ekfac["note"] and f"EK-FAC batch {lt.BATCH}" in inat["note"]
    assert len(ft["ratios"]) == lt.REPS and ft["median_ratio"] == pytest.approx(sorted(ft["ratios"])[1])
    assert math.isfinite(ft["baseline_median_s"]) and ft["speedup"] > 0
    table = lt.common.markdown_table(rows)
    assert table.count("\n| ") == len(rows) and "LT scale" in table   # one line per row below the header
