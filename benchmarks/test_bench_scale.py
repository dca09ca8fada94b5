"""benchmarks/bench_scale.py: the long-tailed data, the growth exponent, argument checks, and one ``--quick`` run
(its row structure, stages and slopes; no timing value is checked)."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_scale
from iaerf.longtail.data import imbalance_counts


def test_long_tailed_counts_full_size_is_cifar10_lt():
    assert bench_scale.long_tailed_counts(12406) == imbalance_counts(10, 5000, 100.0)
    assert sum(bench_scale.long_tailed_counts(12406)) == 12406


@pytest.mark.parametrize("n", [10, 64, 1000, 4000, 20000])
def test_long_tailed_counts_scaled(n):
    counts = bench_scale.long_tailed_counts(n)
    assert len(counts) == 10 and sum(counts) == n and min(counts) >= 1
    assert counts[0] > counts[-1] or n == 10


@pytest.mark.parametrize("n", [9, 0, 64.0, True])
def test_long_tailed_counts_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be an int"):
        bench_scale.long_tailed_counts(n)


def test_cifar_like_shapes_and_classes():
    counts = bench_scale.long_tailed_counts(100)
    x, y = bench_scale.cifar_like(counts, 8, seed=3)
    assert x.shape == (100, 3, 8, 8) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).tolist() == counts
    x2, y2 = bench_scale.cifar_like(counts, 8, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_growth_exponent():
    ns = [100, 400, 1600]
    assert bench_scale.growth_exponent(ns, [3 * n ** 1.5 for n in ns]) == pytest.approx(1.5, abs=1e-12)
    assert bench_scale.growth_exponent(ns, [7.0, 7.0, 7.0]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bench_scale.growth_exponent(ns, [1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="two distinct sizes"):
        bench_scale.growth_exponent([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        bench_scale.growth_exponent([5, 6], [1.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": (64,)}, "at least two distinct n"),
    ({"sizes": (5, 64)}, "n must be an int"),
    ({"variants": ("exact-full",)}, "variants must be"),
    ({"val": 15}, "val must be a positive multiple of 10"),
    ({"image_size": 2}, "image_size must be"),
])
def test_run_rejects_bad_arguments_before_any_case(kwargs, match, monkeypatch):
    def no_case(case):
        raise AssertionError("a case ran before the arguments were checked")

    monkeypatch.setattr(bench_scale, "_in_fresh_process", no_case)
    with pytest.raises(ValueError, match=match):
        bench_scale.run(quick=True, **kwargs)


def test_quick_run_rows_stages_and_slopes(capfd):
    rows = bench_scale.run(quick=True)
    err = capfd.readouterr().err
    # the measuring processes' progress bars reach the command's stderr
    for desc in ("features", "K-FAC factors", "EK-FAC eigenvalues", "energy influence (JVP)"):
        assert desc in err

    expected_stages = {"classifier": {"features", "validation gradient", "energy influence (JVP)", "other"},
                       "full-ekfac": {"K-FAC factors", "EK-FAC eigenvalues", "validation gradient",
                                      "energy influence (JVP)", "other"}}
    per_variant = len(bench_scale.QUICK_SIZES) + 1
    assert len(rows) == per_variant * len(bench_scale.VARIANTS)
    for v, variant in enumerate(bench_scale.VARIANTS):
        chunk = rows[v * per_variant:(v + 1) * per_variant]
        cases, growth = chunk[:-1], chunk[-1]
        assert [r["n"] for r in cases] == list(bench_scale.QUICK_SIZES)
        for r in cases:
            assert r["variant"] == variant
            assert set(r["stages_s"]) == expected_stages[variant]
            assert r["iaerf_median_s"] > 0 and r["iaerf_peak_bytes"] is not None
            assert r["memory_source"] in ("getrusage ru_maxrss", "sampled /proc/self/statm")
            assert r["scores_shape"] == [r["n"]] and r["scores_finite"] == r["n"]
            for key in ("case", "shape", "dtype", "baseline", "note", "load"):
                assert key in r
        assert growth["sizes"] == list(bench_scale.QUICK_SIZES)
        slope = bench_scale.growth_exponent(growth["sizes"], [r["iaerf_median_s"] for r in cases])
        assert growth["growth_exponents"]["total"] == pytest.approx(slope)
        assert math.isfinite(growth["growth_exponents"]["total"])
        assert set(expected_stages[variant]) <= set(growth["growth_exponents"])
