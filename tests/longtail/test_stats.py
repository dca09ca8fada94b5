import pytest
import scipy.stats

from iaerf.longtail.stats import format_paired, paired_difference


def test_paired_difference_matches_scipy_t_interval():
    a, b = [5.0, 4.2, 6.1, 5.5, 4.9], [5.2, 4.0, 6.5, 5.5, 5.3]
    p = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b)]
    res = scipy.stats.ttest_rel(a, b)
    ci = res.confidence_interval(0.95)
    assert p["mean"] == pytest.approx(sum(d) / 5) and p["low"] == pytest.approx(ci.low) and p["high"] == pytest.approx(ci.high)
    assert (p["wins"], p["losses"], p["ties"], p["n"]) == (3, 1, 1, 5)
    assert format_paired(p).endswith(", 3/5")


def test_paired_difference_single_seed_and_bad_input():
    p = paired_difference([1.0], [2.0])
    assert p["low"] is None and format_paired(p) == "-1.00, 1/1"
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0], [1.0], confidence=1.5)


def test_ablation_quick_runs_and_reports_paired_rows(tmp_path):
    """The ablation command's reduced grid (what CI runs): every cell has its control and a paired row."""
    import json
    import os
    import runpy
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments", "ablation.py")
    argv = sys.argv
    sys.argv = [script, "--quick", "--methods", "erm", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    res = json.load(open(tmp_path / "out" / "ablation.json"))
    assert set(res["results"]) == {"0", "1"}
    cells = res["results"]["0"]
    assert set(cells) == {"erm-paper-classifier-none-0.01", "erm-recommended-classifier-none-0.01"}
    for cell in cells.values():
        assert {"control", "iaerf", "baseline", "beta"} <= set(cell)
    rec = [cells["erm-recommended-classifier-none-0.01"], res["results"]["1"]["erm-recommended-classifier-none-0.01"]]
    assert all(r["val_loss"] <= r["control_val_loss"] for r in rec)  # beta 0 among the candidates
    text = (tmp_path / "out" / "ABLATION.md").read_text()
    assert "## The protocols' own settings" in text and "| ERM | recommended | classifier |" in text
