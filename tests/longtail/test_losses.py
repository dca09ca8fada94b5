"""iaerf.longtail.losses: LDAM margins / loss against a float64 reference, DRW class-balanced weights."""
import pytest
import torch
import torch.nn.functional as F

from iaerf.longtail.losses import LDAMLoss, class_balanced_weights, ldam_margins


def test_ldam_margins():
    counts = [5000, 2997, 1796, 50]
    m = ldam_margins(counts, 0.5).double()
    assert float(m.max()) == pytest.approx(0.5) and int(m.argmax()) == 3
    n = torch.tensor(counts, dtype=torch.float64)
    torch.testing.assert_close(m, 0.5 * n.pow(-0.25) / n.pow(-0.25).max(), rtol=1e-6, atol=0)


def test_class_balanced_weights():
    counts = [124, 96, 12]
    w = class_balanced_weights(counts, 0.996).double()
    assert float(w.sum()) == pytest.approx(3.0)
    raw = torch.tensor([(1 - 0.996) / (1 - 0.996 ** n) for n in counts], dtype=torch.float64)
    torch.testing.assert_close(w, raw * 3 / raw.sum(), rtol=1e-6, atol=0)
    assert w[2] > w[1] > w[0]
    torch.testing.assert_close(class_balanced_weights(counts, 0.0), torch.ones(3))  # b = 0: no reweighting


@pytest.mark.parametrize("bad", [[10, 0, 3], [5]])
def test_bad_counts(bad):
    with pytest.raises(ValueError, match="counts"):
        ldam_margins(bad)
    with pytest.raises(ValueError, match="counts"):
        class_balanced_weights(bad)


def test_bad_parameters():
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([3, 4], 1.0)
    with pytest.raises(ValueError, match="max_m"):
        ldam_margins([3, 4], 0.0)
    with pytest.raises(ValueError, match="logits"):
        LDAMLoss([3, 4, 5])(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("blowup", [1.0, 1e3])
def test_ldam_loss_matches_reference(weighted, blowup):
    gen = torch.Generator().manual_seed(int(blowup) + weighted)
    counts = [500, 120, 40, 9, 3]
    cos = torch.rand(64, 5, generator=gen, dtype=torch.float64) * 2 - 1  # cosine logits in [-1, 1]
    y = torch.randint(0, 5, (64,), generator=gen)
    s = 30.0
    weight = class_balanced_weights(counts, 0.9999) if weighted else None
    loss = LDAMLoss(counts, 0.5, s, weight=weight)
    # model logits carry the scale (NormedLinear outputs s*cos); reference: CE(s * (cos - m_y onehot)) as in LDAM-DRW
    m = ldam_margins(counts, 0.5).double()
    ref = F.cross_entropy(s * (cos - F.one_hot(y, 5) * m[y, None]), y,
                          weight=None if weight is None else weight.double())
    torch.testing.assert_close(loss(s * cos, y), ref, rtol=1e-6, atol=1e-9)
    # hostile: logits 1000x larger still give a finite loss equal to the float64 reference
    big = s * cos * blowup
    ref_big = F.cross_entropy(big - s * F.one_hot(y, 5) * m[y, None], y, weight=None if weight is None else weight.double())
    torch.testing.assert_close(loss(big, y), ref_big, rtol=1e-6, atol=1e-6)


def test_ldam_loss_gradcheck_and_set_weight():
    counts = [20, 7, 3]
    loss = LDAMLoss(counts, 0.5, 30.0)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))
    before = float(loss(z.detach(), y))
    loss.set_weight(class_balanced_weights(counts, 0.99))
    assert float(loss(z.detach(), y)) != pytest.approx(before)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (z,))
