"""The paper's figures as PNG files (matplotlib, Agg backend; no display needed).

- Fig. 1: predicted influence vs actual change of the validation loss for the most influential training points.
- Fig. 2: influence vs energy and vs training loss of every training point, with Pearson's R.
- Fig. 3: per-class mean influence vs class count, with Pearson's R.
- Fig. 5: training-set energy distribution across fine-tuning epochs.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from iaerf.core.plotting import pearson_r, pyplot, save_figure

__all__ = ["fig1_predicted_vs_actual", "fig2_influence_vs_energy_loss", "fig3_class_influence",
           "fig5_energy_distribution", "class_mean_influence"]


def class_mean_influence(influence: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [C], mean influence per class [C]) -- Fig. 3's points."""
    labels = labels.cpu().long()
    infl = influence.detach().cpu().double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, infl)
    return counts.numpy(), (sums / counts.clamp_min(1)).numpy()


def fig2_influence_vs_energy_loss(model, train, influence: torch.Tensor, path: str, *, device=None) -> dict:
    """Scatter of I_val(x_i) against E(x_i) and against CE(x_i) over the training set (paper Fig. 2)."""
    from iaerf.ops import energy
    from iaerf.longtail.training import predict_logits

    logits = predict_logits(model, train, device=device)
    e = energy(logits).double().numpy()
    loss = F.cross_entropy(logits.double(), train.labels, reduction="none").numpy()
    infl = influence.detach().cpu().double().numpy()
    r_e, r_l = pearson_r(e, infl), pearson_r(loss, infl)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].scatter(e, infl, s=6, alpha=0.6)
    axes[0].set(xlabel="energy E(x)", ylabel="influence I_val(x)", title=f"(a) vs energy, Pearson R = {r_e:.2f}")
    # CE of fitted points spans decades down to ~0: a log axis (floored at 1e-8) shows them, as the paper's Fig. 2(b)
    axes[1].scatter(np.maximum(loss, 1e-8), infl, s=6, alpha=0.6)
    axes[1].set(xlabel="training loss (CE)", xscale="log", title=f"(b) vs loss, Pearson R = {r_l:.2f}")
    save_figure(fig, path)
    return {"r_energy": r_e, "r_loss": r_l}


def fig3_class_influence(influence: torch.Tensor, labels: torch.Tensor, num_classes: int, path: str) -> dict:
    """Per-class mean influence against the class's training count (paper Fig. 3)."""
    counts, means = class_mean_influence(influence, labels, num_classes)
    r = pearson_r(counts, means)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter(counts, means)
    for c in range(num_classes):
        ax.annotate(str(c), (counts[c], means[c]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="training images in class", ylabel="mean influence", title=f"Pearson R = {r:.2f}")
    save_figure(fig, path)
    return {"r": r}


def fig5_energy_distribution(energies: torch.Tensor, path: str) -> str:
    """Histograms of the training-set energy, one per epoch (energies [epochs + 1, n]; row 0 = before fine-tuning)."""
    energies = torch.as_tensor(energies).double()
    if energies.dim() != 2 or energies.shape[0] < 1:
        raise ValueError(f"energies must be [epochs + 1, n], got shape {tuple(energies.shape)}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    bins = np.linspace(float(energies.min()), float(energies.max()), 40)
    cmap = plt.get_cmap("viridis")
    for t in range(energies.shape[0]):
        name = "before" if t == 0 else f"epoch {t}"
        ax.hist(energies[t].numpy(), bins=bins, histtype="step", color=cmap(t / max(1, energies.shape[0] - 1)), label=name)
    ax.set(xlabel="energy E(x)", ylabel="training images", title="training-set energy during fine-tuning")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def fig1_predicted_vs_actual(model, train, val, influence: torch.Tensor, path: str, *, params=("fc",), points: int = 20,
                             eps: float | None = None, epochs: int = 50, lr: float = 1e-2, seed: int = 0,
                             progress: bool = True, full_model: dict | None = None) -> dict:
    """Paper Fig. 1: for the ``points`` training points of largest |I_val|, the predicted influence against the actual
    change of the validation loss per unit of energy regularization, measured by fine-tuning with eps * E(x_i)
    added (batch norm frozen) vs without, via :func:`iaerf.influence.validation.actual_energy_effect` (symmetric
    difference +-eps). ``eps`` defaults to 0.05 / n_train: a twentieth of one point's weight in the mean training
    loss, small enough for the validation loss to respond linearly (at 1 / n_train the energy term already bends it).

    ``full_model``: a second panel drawn to the right, ``{"predicted": [p], "actual": [p], "title": str,
    "ylabel": str}`` (the pipeline passes the full-model influence against its PBRF ground truth).
    """
    from iaerf.influence.validation import actual_energy_effect

    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    infl = influence.detach().cpu()
    idx = torch.argsort(infl.abs(), descending=True)[:points].tolist()
    eps = 0.05 / len(train) if eps is None else eps
    actual = actual_energy_effect(model, train, val, idx, eps=eps, params=list(params) if params else None,
                                  epochs=epochs, lr=lr, seed=seed, symmetric=True, progress=progress).numpy()
    predicted = infl[idx].double().numpy()
    r = pearson_r(predicted, actual)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if full_model else 1, figsize=(9.2 if full_model else 4.6, 3.6), squeeze=False)
    axes[0, 0].scatter(predicted, actual)
    axes[0, 0].set(xlabel="predicted influence I_val", ylabel="actual change of val loss / eps",
                   title=f"top {points} points, Pearson R = {r:.2f}")
    if full_model:
        right = axes[0, 1]
        right.scatter(full_model["predicted"], full_model["actual"], color="tab:orange")
        right.set(xlabel="predicted influence I_val (full model)", ylabel=full_model["ylabel"],
                  title=f"{full_model['title']}, R = "
                        f"{pearson_r(np.asarray(full_model['predicted']), np.asarray(full_model['actual'])):.2f}")
    save_figure(fig, path)
    return {"r": r, "indices": idx, "predicted": predicted.tolist(), "actual": actual.tolist()}
