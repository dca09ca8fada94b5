"""iaerf.training: schedules, ERM / LDAM-DRW loops, cRT / LWS re-training, shot-group evaluation."""
import pytest
import torch
import torch.nn as nn

from iaerf.data import ShotGroups, TensorDataset, load_digits_lt
from iaerf.models import LinearClassifier, SmallCNN
from iaerf.training import (ClassifierConfig, TrainConfig, _augment_cifar, cifar_config, digits_config, evaluate,
                            retrain_classifier, train_baseline)


def test_reference_lr_schedule():
    c = cifar_config()
    assert [c.lr_at(e) for e in (0, 4)] == pytest.approx([0.02, 0.1])
    assert c.lr_at(159) == pytest.approx(0.1) and c.lr_at(160) == pytest.approx(1e-3) and c.lr_at(180) == pytest.approx(1e-5)
    assert c.epochs == 200 and c.batch_size == 128 and c.weight_decay == 2e-4 and c.drw_epoch == 160
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="focal")
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="mixup")


def test_augment_cifar_is_crop_of_padded_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = _augment_cifar(x, g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):  # every output image is some 32x32 window of its padded image, possibly flipped
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if torch.equal(out[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert hits


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_lt(seed=0)


@pytest.mark.parametrize("method", ["erm", "ldam_drw"])
def test_baselines_learn_digits_and_are_deterministic(digits, method):
    cfg = digits_config(method, epochs=6, milestones=(4,), drw_epoch=4)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = SmallCNN(10, normed_fc=method == "ldam_drw")
        m, hist = train_baseline(m, digits.train, cfg, progress=False)
        models.append(m)
    assert hist[-1]["loss"] < hist[0]["loss"]
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, models[1].state_dict()[k]), k
    ev = evaluate(models[0], digits.test, digits.counts(), digits.shot_groups)
    assert ev["error"] < 40.0  # 6 epochs on 503 images: far better than chance (90%)


def test_evaluate_groups_by_hand():
    # a "model" that predicts class 0 for everything: classes 1..3 all wrong
    model = LinearClassifier(2, 4)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    test = TensorDataset(torch.zeros(8, 2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4)
    ev = evaluate(model, test, [200, 50, 50, 5], ShotGroups())
    assert ev["error"] == pytest.approx(75.0)
    assert ev["many_error"] == pytest.approx(0.0) and ev["medium_error"] == pytest.approx(100.0)
    assert ev["few_error"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="train_counts"):
        evaluate(model, test, [1, 2], ShotGroups())
    with pytest.raises(ValueError, match="outputs"):
        evaluate(LinearClassifier(2, 3), test, [1, 1, 1, 1])


def _separable(n_per=(40, 10, 4), d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per)])
    centers = torch.randn(len(n_per), d, generator=g) * 3
    return TensorDataset(centers[ys] + torch.randn(len(ys), d, generator=g), ys, len(n_per))


def test_crt_retrains_only_the_classifier():
    train = _separable()
    torch.manual_seed(0)
    model = SmallCNN(3)
    data = TensorDataset(torch.rand(len(train), 1, 8, 8), train.labels, 3)
    out = retrain_classifier(model, data, ClassifierConfig("crt", epochs=2, batch_size=32), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]) == (not k.startswith("fc.")), k


def test_lws_scales_rows_and_crt_balances():
    train = _separable()
    torch.manual_seed(0)
    model = LinearClassifier(6, 3)
    crt = retrain_classifier(model, train, ClassifierConfig("crt", epochs=5, batch_size=64, lr=0.2), progress=False)
    assert evaluate(crt, train, train.class_counts())["error"] < 10.0
    lws = retrain_classifier(crt, train, ClassifierConfig("lws", epochs=2, batch_size=64), progress=False)
    # LWS folds one scale per class into W and b: each row (w_j, b_j) is a multiple of the cRT row
    old = torch.cat([crt.fc.weight, crt.fc.bias[:, None]], 1)
    new = torch.cat([lws.fc.weight, lws.fc.bias[:, None]], 1)
    scales = (new * old).sum(1) / (old * old).sum(1)
    torch.testing.assert_close(new, scales[:, None] * old, rtol=1e-5, atol=1e-6)
    assert isinstance(lws.fc, nn.Linear) and all(p.requires_grad for p in lws.parameters())
    with pytest.raises(ValueError, match="method"):
        ClassifierConfig("tau_norm")
