"""iaerf.longtail.selection: per-point validation losses against float64 formulas, the paired bootstrap, choices that
respect the validation noise, grid extension and its stops, diverged candidates, bad input."""
import json
import math

import pytest
import torch

from iaerf.longtail.selection import paired_bootstrap, pointwise_loss, select_on_validation

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(n=200, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _signs(n, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)[perm]


def test_pointwise_loss_matches_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    labels = torch.tensor([0, 2, 0, 1])
    z = logits.double()
    ce = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(z.tolist(), labels.tolist())]
    torch.testing.assert_close(pointwise_loss(logits, labels, "loss", balanced=False),
                               torch.tensor(ce, dtype=torch.float64))
    torch.testing.assert_close(pointwise_loss(logits, labels, "error", balanced=False),
                               torch.tensor([0.0, 0.0, 100.0, 100.0], dtype=torch.float64))
    # balanced: class 0 has 2 points, classes 1 and 2 one each -> weights 4 / (3 * n_y)
    w = torch.tensor([2 / 3, 4 / 3, 2 / 3, 4 / 3], dtype=torch.float64)
    bal = pointwise_loss(logits, labels, "loss", balanced=True)
    torch.testing.assert_close(bal, torch.tensor(ce, dtype=torch.float64) * w)
    # its mean is the mean over classes of each class's mean loss
    per_class = [(ce[0] + ce[2]) / 2, ce[3], ce[1]]
    assert float(bal.mean()) == pytest.approx(sum(per_class) / 3, rel=1e-12)
    # on a balanced set every weight is exactly 1
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    lg = torch.randn(6, 3)
    assert torch.equal(pointwise_loss(lg, lab), pointwise_loss(lg, lab, balanced=False))


def test_pointwise_loss_nan_and_errors():
    logits = torch.tensor([[float("nan"), 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0])
    for metric in ("loss", "error"):
        out = pointwise_loss(logits, labels, metric)
        assert math.isnan(float(out[0])) and float(out[1]) < 100  # a NaN row is not a plain mistake
    with pytest.raises(ValueError, match="metric"):
        pointwise_loss(logits, labels, "accuracy")
    with pytest.raises(ValueError, match="logits"):
        pointwise_loss(torch.zeros(3), labels)
    with pytest.raises(ValueError, match="labels"):
        pointwise_loss(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="rows"):
        pointwise_loss(torch.zeros(3, 2), labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        pointwise_loss(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_paired_bootstrap_reference_and_determinism():
    ref = _noise()
    # a constant improvement: every resample has the same mean gain
    iv = paired_bootstrap(ref, ref - 0.25, n_boot=500)
    assert iv["gain"] == pytest.approx(0.25) and iv["low"] == pytest.approx(0.25) and iv["high"] == pytest.approx(0.25)
    cand = ref + (_noise(seed=1) - 0.5) * 0.2
    a, b = paired_bootstrap(ref, cand, seed=3), paired_bootstrap(ref, cand, seed=3)
    assert a == b and a["low"] < a["gain"] < a["high"]
    assert a["gain"] == pytest.approx(float((ref - cand).mean()), rel=1e-12)
    # reference: the same resamples drawn by hand (one chunk), quantiles by numpy's default rule
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(ref), (2000, len(ref)), generator=gen)
    gains = (ref - cand)[idx].mean(1)
    assert a["low"] == pytest.approx(float(torch.quantile(gains, 0.025)), rel=1e-12)
    assert a["high"] == pytest.approx(float(torch.quantile(gains, 0.975)), rel=1e-12)
    # the sampling spread of a mean of n points: the interval is about +-1.96 sd / sqrt(n)
    sd = float((ref - cand).std()) / math.sqrt(len(ref))
    assert (a["high"] - a["low"]) == pytest.approx(2 * 1.96 * sd, rel=0.15)
    with pytest.raises(ValueError, match="candidate has 3"):
        paired_bootstrap(ref, ref[:3])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(ref, cand, n_boot=10)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(ref, cand, confidence=1.0)


def test_clear_gain_is_chosen_noise_is_not():
    ref = _noise(seed=0)
    signs = _signs(200, seed=5)  # exactly half +1, half -1: the spread adds nothing to the mean
    noisy = ref - 0.02 - 0.5 * signs  # mean gain 0.02 with a point-to-point spread of 0.5: within noise
    clear = ref - 0.3 + 0.05 * signs  # mean gain ~0.3, spread 0.05: clearly better
    table = {0.0: ref, 1.0: noisy, 2.0: clear}
    sel = select_on_validation(lambda v: table[v], [0.0, 1.0, 2.0], reference_value=0.0)
    assert sel.replaced and sel.chosen == 2.0 and sel.best == 2.0
    assert sel.row(2.0)["low"] > 0 and sel.row(2.0)["chosen"]
    assert sel.row(0.0)["gain"] == 0.0 and not sel.row(0.0)["significant"]  # the reference cannot beat itself
    # the noisy candidate alone: its mean is better, its interval straddles 0 -> the reference stays
    sel = select_on_validation(lambda v: table[v], [0.0, 1.0], reference_value=0.0)
    row = sel.row(1.0)
    assert row["gain"] > 0 and row["low"] < 0 < row["high"]
    assert not sel.replaced and sel.chosen == 0.0 and sel.best == 1.0
    assert sel.interval == {k: row[k] for k in ("value", "gain", "low", "high")}  # why it stayed, reported
    assert "kept the reference" in sel.summary()
    json.dumps(sel.to_dict(), allow_nan=False)


def test_significant_candidate_beats_a_better_mean_within_noise():
    """The choice is the largest gain among candidates that clear the noise, not the best mean overall."""
    ref = _noise()
    signs = _signs(200, seed=1)
    table = {1.0: ref - 0.1 - 0.01 * signs, 2.0: ref - 0.15 - 2.0 * signs}
    sel = select_on_validation(lambda v: table[v], [1.0, 2.0], reference=ref)
    assert sel.best == 2.0 and sel.chosen == 1.0 and sel.replaced
    assert sel.reference_value is None


def _bowl(center_log10, n=100):
    """Per-point losses whose mean is lowest at value 10**center_log10 (a clear, noise-free bowl in log10 v)."""
    base = _noise(n)

    def score(v):
        return base + (math.log10(v) - center_log10) ** 2 if v > 0 else base + 100.0
    return score, base


def test_grid_extension_multiply_until_not_improving():
    score, base = _bowl(2.0)  # best at 100, grid stops at 10
    sel = select_on_validation(score, [0.1, 1.0, 10.0], reference_value=0.1, extend="multiply")
    assert sel.extended == [100.0, 1000.0] and sel.stop_reason == "not_improving"
    assert sel.best == 100.0 and sel.chosen == 100.0
    assert [r["value"] for r in sel.candidates] == [0.1, 1.0, 10.0, 100.0, 1000.0]
    assert sel.row(1000.0)["extended"] and not sel.row(10.0)["extended"]
    # the best inside the grid: no extension
    score, _ = _bowl(0.0)
    sel = select_on_validation(score, [0.1, 1.0, 10.0], reference_value=0.1, extend="multiply")
    assert sel.extended == [] and sel.stop_reason is None and sel.chosen == 1.0
    # monotone improvement: stops after max_extensions
    score, _ = _bowl(9.0)
    sel = select_on_validation(score, [0.1, 1.0], reference_value=0.1, extend="multiply", max_extensions=3)
    assert sel.extended == [10.0, 100.0, 1000.0] and sel.stop_reason == "max_extensions" and sel.chosen == 1000.0
    # a grid of 0 only cannot grow by x10
    sel = select_on_validation(lambda v: base + 1 - v, [0.0], reference=base + 2, extend="multiply")
    assert sel.stop_reason == "cannot_extend"


def test_grid_extension_add_uses_the_grid_step():
    base = _noise(60)
    calls = []

    def score(tau):
        calls.append(tau)
        return base + (tau - 1.6) ** 2

    sel = select_on_validation(score, [0.0, 0.5, 1.0], reference_value=0.0, extend="add")
    assert sel.extended == [1.5, 2.0] and sel.stop_reason == "not_improving" and sel.chosen == 1.5
    assert calls == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]  # the reference (tau 0) once, then each value once
    sel = select_on_validation(score, [0.1, 0.2, 0.3], reference_value=0.0, extend="add", max_extensions=20)
    assert 1.6 in sel.extended and sel.chosen == 1.6  # 0.3 + 0.1 steps, rounded: 1.6 exactly, not 1.6000000000000003


def test_diverged_candidates_reported_never_chosen():
    base = _noise(80)

    def score(v):
        if v == 2.0:
            return torch.full_like(base, float("nan"))  # the best-looking value diverged
        if v >= 100.0:
            raise FloatingPointError("loss is nan")
        return base - 0.1 * math.log10(v + 1) * 5

    sel = select_on_validation(score, [0.0, 1.0, 2.0, 10.0], reference_value=0.0, extend="multiply")
    assert sel.row(2.0)["diverged"] and sel.row(2.0)["val_loss"] is None and not sel.row(2.0)["chosen"]
    assert sel.extended == [100.0] and sel.stop_reason == "diverged" and sel.row(100.0)["diverged"]
    assert sel.chosen == 10.0 and sel.best == 10.0
    json.dumps(sel.to_dict(), allow_nan=False)
    # every candidate diverged: the reference stays, nothing raises
    sel = select_on_validation(lambda v: torch.full_like(base, float("inf")), [1.0, 2.0], reference=base)
    assert not sel.replaced and sel.chosen is None and sel.best is None
    assert sel.interval["gain"] is None and "every candidate diverged" in sel.summary()


def test_selection_is_deterministic_and_only_sees_scores():
    score, _ = _bowl(0.3)
    a = select_on_validation(score, [0.5, 1.0, 2.0, 4.0], reference_value=0.5, seed=7)
    b = select_on_validation(score, [4.0, 2.0, 1.0, 0.5], reference_value=0.5, seed=7)  # order does not matter
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=[]), "grid is empty"),
    (dict(grid=[1.0, float("nan")]), "grid values"),
    (dict(grid=[1.0, 1.0]), "repeated"),
    (dict(grid=["a"]), "grid values"),
    (dict(grid=None), "grid must be"),
    (dict(extend="double"), "extend"),
    (dict(extend="multiply", factor=1.0), "factor"),
    (dict(extend="add", grid=[1.0]), "step"),
    (dict(extend="add", step=-1.0), "step"),
    (dict(max_extensions=-1), "max_extensions"),
    (dict(n_boot=5), "n_boot"),
    (dict(confidence=0.3), "confidence"),
    (dict(reference_value=None), "reference"),
    (dict(reference=torch.tensor([1.0, float("nan"), 0.0])), "reference"),
    (dict(reference=torch.ones(1, dtype=torch.float64)), "at least 2"),
    (dict(reference=torch.ones(4, dtype=torch.float64)), r"score\(1\) .* reference has 4"),
    (dict(reference_value=float("inf")), "reference_value"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(grid=[1.0, 2.0], reference_value=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_on_validation(lambda v: torch.ones(3, dtype=torch.float64) * v, args.pop("grid"), **args)
    with pytest.raises(TypeError, match="score"):
        select_on_validation(None, [1.0], reference_value=0.0)


def test_a_rounding_sized_gain_is_not_above_the_noise():
    """A candidate that leaves the model unchanged up to float32 rounding (tau-normalising a cosine head) has a
    gain a millionth of the loss: its interval lies above 0 but it never replaces the reference."""
    ref = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    sel = select_on_validation(lambda v: ref - 1e-9 * (1 + v), [1.0, 2.0], reference=ref, reference_value=0.0)
    assert all(r["low"] > 0 and not r["significant"] for r in sel.candidates) and not sel.replaced
    sel = select_on_validation(lambda v: ref - 1e-3 * v, [1.0, 2.0], reference=ref, reference_value=0.0)
    assert sel.replaced and sel.chosen == 2.0
