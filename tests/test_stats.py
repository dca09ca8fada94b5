import pytest
import scipy.stats

from iaerf.stats import format_paired, paired_difference


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
