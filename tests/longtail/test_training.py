"""iaerf.longtail.training: schedules, ERM / LDAM-DRW loops, cRT / LWS re-training, shot-group evaluation."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from iaerf.longtail.data import ShotGroups, TensorDataset, load_digits_lt
from iaerf.longtail.models import LinearClassifier, SmallCNN
from iaerf.longtail.training import (ClassifierConfig, TrainConfig, _augment_cifar, cifar_config, digits_config, evaluate,
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


class _TorchvisionStyle(nn.Module):
    """A classifier whose head is ``classifier[1]`` (torchvision style), with no ``fc`` and no ``features()``."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 16), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, k))

    def forward(self, x):
        return self.classifier(self.body(x))


@pytest.mark.parametrize("method", ["crt", "lws"])
def test_classifier_retraining_finds_a_head_not_named_fc(method):
    train = _separable()
    torch.manual_seed(0)
    model = _TorchvisionStyle(train.tensors()[0].shape[1], 3)
    out = retrain_classifier(model, train, ClassifierConfig(method, epochs=2, batch_size=32), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]) == (not k.startswith("classifier.1.")), k
    assert "error" in evaluate(out, train, train.class_counts())


def test_model_without_a_linear_head_is_refused_by_name():
    train = _separable()
    with pytest.raises(TypeError, match="model must end in a final nn.Linear classifier head"):
        retrain_classifier(nn.Sequential(nn.Flatten()), train, ClassifierConfig("crt", epochs=1), progress=False)


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


# --------------------------------------------------------------------------------------------------------------
# The training-loop core and the loops built on it

from iaerf.longtail.losses import LDAMLoss, class_balanced_weights  # noqa: E402
from iaerf.core.train_loop import shuffled_batches, train_loop  # noqa: E402


def _reference_baseline(model, train, config):
    """train_baseline as it was written before the loop core, kept as the pin for its numbers."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = train.tensors()
    decay = [p for p in model.parameters() if p.dim() != 1]
    no_decay = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, momentum=config.momentum)
    counts = train.class_counts()
    ldam = LDAMLoss(counts, config.max_m, config.s) if config.method == "ldam_drw" else None
    history = []
    for epoch in range(config.epochs):
        lr = config.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        if ldam is not None and epoch >= config.drw_epoch:
            ldam.set_weight(class_balanced_weights(counts, config.cb_beta))
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total, correct = 0.0, 0
        for start in range(0, len(perm), config.batch_size):
            idx = perm[start:start + config.batch_size]
            x, y = x_all[idx], y_all[idx]
            if config.augment == "cifar":
                x = _augment_cifar(x, gen)
            logits = model(x)
            loss = ldam(logits, y) if ldam is not None else torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch, "lr": lr, "loss": total / len(train), "train_acc": correct / len(train)})
    return model.eval(), history


@pytest.mark.parametrize("method,augment", [("erm", "cifar"), ("ldam_drw", "none")])
def test_train_baseline_bit_identical_to_the_loop_before_the_core(method, augment):
    """Same seeds -> the same batch order, augmentation draws, DRW switch and history as the hand-written loop."""
    g = torch.Generator().manual_seed(5)
    train = TensorDataset(torch.rand(50, 1, 8, 8, generator=g), torch.arange(50) % 3, 3)
    cfg = digits_config(method, epochs=3, batch_size=16, warmup_epochs=1, milestones=(2,), drw_epoch=1,
                        augment=augment)
    torch.manual_seed(0)
    init = SmallCNN(3, width=4, normed_fc=method == "ldam_drw")
    ref, ref_hist = _reference_baseline(copy.deepcopy(init), train, cfg)
    got, hist = train_baseline(copy.deepcopy(init), train, cfg, progress=False)
    assert hist == ref_hist
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k


def test_retrain_classifier_bit_identical_to_the_loop_before_the_core():
    train = _separable()
    torch.manual_seed(0)
    model = LinearClassifier(6, 3)
    cfg = ClassifierConfig("crt", epochs=3, batch_size=16)
    got = retrain_classifier(model, train, cfg, progress=False)
    # the pre-core loop: class-aware draws (randint, rand) per step, cosine lr stepped after every step
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ref.fc.reset_parameters()
    n_c = torch.tensor(train.class_counts())
    start_c = torch.cumsum(n_c, 0) - n_c
    order = torch.argsort(train.labels, stable=True)
    opt = torch.optim.SGD(ref.fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    for _ in range(cfg.epochs * steps):
        cls = torch.randint(0, 3, (cfg.batch_size,), generator=gen)
        pick = order[start_c[cls] + (torch.rand(cfg.batch_size, generator=gen) * n_c[cls]).long()]
        loss = torch.nn.functional.cross_entropy(ref.fc(train.inputs[pick]), train.labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    assert torch.equal(got.fc.weight, ref.fc.weight) and torch.equal(got.fc.bias, ref.fc.bias)


def test_train_loop_history_lr_schedule_and_step_count():
    torch.manual_seed(0)
    w = torch.zeros(3, requires_grad=True)
    x, y = torch.randn(10, 3), torch.randn(10)
    seen = []

    def loss_fn(epoch, idx):
        seen.append(idx)
        err = x[idx] @ w - y[idx]
        return (err ** 2).mean(), {"sq": (err ** 2).detach().sum(), "count": float(len(idx))}

    gen = torch.Generator().manual_seed(3)
    epochs_done = []
    hist = train_loop([w], loss_fn, shuffled_batches(10, 4, gen), epochs=2, lr=0.1, lr_at=lambda e: 0.1 / (e + 1),
                      record=True, on_epoch=epochs_done.append)
    assert [len(i) for i in seen] == [4, 4, 2, 4, 4, 2] and epochs_done == [0, 1]
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(torch.cat(seen[:3]), torch.randperm(10, generator=g2))  # one permutation per epoch
    assert torch.equal(torch.cat(seen[3:]), torch.randperm(10, generator=g2))
    assert [h["lr"] for h in hist] == [0.1, 0.05] and [h["epoch"] for h in hist] == [0, 1]
    assert list(hist[0]) == ["epoch", "lr", "loss", "sq", "count"] and hist[0]["count"] == 1.0
    assert hist[0]["loss"] == pytest.approx(hist[0]["sq"])  # the loss is the batch mean: sums agree


def test_train_loop_frozen_bn_keeps_statistics_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))

    def loss_fn(epoch, idx):
        assert model[0].training and not model[1].training and not model[1].weight.requires_grad
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    train_loop(list(model.parameters()), loss_fn, shuffled_batches(12, 4, torch.Generator().manual_seed(0)),
               epochs=2, lr=0.1, model=model, mode="frozen_bn")
    after = model.state_dict()
    for k in ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_train_loop_rejects_bad_input_and_reports_divergence():
    w = torch.zeros(1, requires_grad=True)
    batches = shuffled_batches(4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mode"):
        train_loop([w], lambda e, i: w.sum(), batches, epochs=1, lr=0.1, mode="frozen")
    with pytest.raises(ValueError, match="epochs"):
        train_loop([w], lambda e, i: w.sum(), batches, epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        shuffled_batches(4, 0, torch.Generator())
    with pytest.raises(FloatingPointError, match="toy diverged at epoch 0.*lower the lr"):
        train_loop([w], lambda e, i: w.sum() * float("nan"), batches, epochs=1, lr=0.1, record=True, desc="toy")
