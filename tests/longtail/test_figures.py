"""iaerf.longtail.figures: Pearson R and per-class means against numpy, and every figure written as a PNG."""
import numpy as np
import pytest
import torch

from iaerf.longtail.data import TensorDataset
from iaerf.longtail.models import LinearClassifier
from iaerf.longtail.figures import (class_mean_influence, fig2_influence_vs_energy_loss, fig3_class_influence,
                         fig5_energy_distribution, pearson_r)

PNG = b"\x89PNG\r\n\x1a\n"


def test_pearson_r_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.3 * a + rng.normal(size=50)
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert pearson_r(a * 1e12 + 5, b) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)  # hostile scale/offset
    assert np.isnan(pearson_r(np.ones(5), np.arange(5)))
    with pytest.raises(ValueError, match="equal-length"):
        pearson_r([1, 2, 3], [1, 2])


def test_class_mean_influence():
    infl = torch.tensor([1.0, 3.0, -2.0, 5.0, 0.5])
    labels = torch.tensor([0, 0, 1, 2, 2])
    counts, means = class_mean_influence(infl, labels, 4)
    assert counts.tolist() == [2, 1, 2, 0] and means.tolist() == [2.0, -2.0, 2.75, 0.0]


def test_figures_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(60, 4, generator=g), torch.tensor([0] * 35 + [1] * 17 + [2] * 8), 3)
    model = LinearClassifier(4, 3)
    infl = torch.randn(60, generator=g)
    r2 = fig2_influence_vs_energy_loss(model, train, infl, str(tmp_path / "f2.png"))
    r3 = fig3_class_influence(infl, train.labels, 3, str(tmp_path / "f3.png"))
    fig5_energy_distribution(torch.randn(4, 60, generator=g), str(tmp_path / "f5.png"))
    for name in ("f2.png", "f3.png", "f5.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert -1 <= r2["r_energy"] <= 1 and -1 <= r3["r"] <= 1
    with pytest.raises(ValueError, match="energies"):
        fig5_energy_distribution(torch.randn(60), str(tmp_path / "bad.png"))
