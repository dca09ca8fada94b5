"""benchmarks/bench_pcg.py: one ``--quick`` run (row structure, HVP counts, the reference and the targets; no timing
value is checked) and its argument checks."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_pcg


@pytest.fixture
def one_thread():
    """No timing is checked here: one thread keeps the run short on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs, match", [
    ({"resnet_n": 5}, "resnet_n must be an int >= 10"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
    ({"only": ("digits", "imagenet")}, "only must name some of"),
    ({"only": ()}, "only must name some of"),
])
def test_run_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_pcg.run(quick=True, **kwargs)


def test_quick_run_rows(one_thread):
    rows = bench_pcg.run(quick=True)
    assert len(rows) == 3 * 3                                # three cases x (K-FAC, EK-FAC, diagonal)
    cases = {r["raw"]["case"] for r in rows}
    assert any("SmallCNN" in c for c in cases) and any("ResNet-32" in c for c in cases)
    for r in rows:
        raw = r["raw"]
        assert [res["method"] for res in raw["results"]] == ["plain", "kfac", "ekfac", "diagonal"]
        plain = raw["results"][0]
        assert plain["reached"] and plain["final_error"] <= bench_pcg.TARGET and plain["hvps"] >= 1
        assert r["baseline_hvps"] == plain["hvps"] and r["hvps"] >= 1
        assert r["hvp_ratio"] == pytest.approx(plain["hvps"] / r["hvps"])
        assert r["reached"] == (r["max_rel_err_vs_fp64"] <= bench_pcg.TARGET)
        assert r["iaerf_median_s"] > 0 and r["baseline_median_s"] > 0 and math.isfinite(r["speedup"])
        assert r["vector_extensions"] and "CPU vector extensions" in r["note"]
        assert "3x fewer HVPs" in r["target"]
        assert ("exact dense solve" in raw["reference"]) == (raw["num_params"] <= bench_pcg.EXACT_MAX_PARAMS)
    # every parameter is in the solve: batch norm gets diagonal blocks beside the K-FAC ones
    cnn = next(r for r in rows if "SmallCNN" in r["case"] and "(ekfac)" in r["case"])
    ekfac = cnn["raw"]["results"][2]
    assert ekfac["blocks"]["kfac"] > 0 and ekfac["blocks"]["diagonal"] > 0
