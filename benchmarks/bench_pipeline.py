"""Classifier-only energy influence computed through the whole network vs on the extracted head.

``iaerf.longtail.pipeline.classifier_head`` maps the data to the frozen eval-mode features once and hands ``fc`` alone to
``iaerf.energy_influence``; the result is mathematically the same (the influence of ``params=["fc"]`` depends on the
backbone only through those features). It matters for LDAM's cosine classifier (``NormedLinear``), which the
closed-form linear-head path does not cover, so every Hessian-vector product otherwise runs through the backbone.
Baseline: ``energy_influence(model, train, val, params=["fc"])``; iaerf: feature extraction + the same call on the
head (the extraction is inside the timed region). Error: max |difference| / max |influence|.
"""
from __future__ import annotations

import torch

import iaerf.influence as influence_mod
from benchmarks.common import max_rel_error, row, time_fn
from iaerf.longtail.data import TensorDataset
from iaerf.longtail.models import ResNet32, SmallCNN
from iaerf.longtail.pipeline import classifier_head


def _case(name, model, input_shape, n, num_classes, solver, options, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, *input_shape), generator=gen)
    y = torch.arange(n) % num_classes
    train = TensorDataset(x, y, num_classes)
    val = train.subset(range(0, n, 4))
    kw = dict(params=["fc"], solver=solver, solver_options=options, damping=1e-3, progress=False)
    model.eval()

    def full():
        return influence_mod.energy_influence(model, train, val, **kw)

    def head():
        h, ftrain, fval = classifier_head(model, train, val)
        return influence_mod.energy_influence(h, ftrain, fval, **kw)

    err = max_rel_error(head(), full())
    t_full = time_fn(full, warmup=0, reps=reps)
    t_head = time_fn(head, warmup=1, reps=reps)
    return row(f"classifier-only influence ({name})", f"n={n}, val={len(val)}, K={num_classes}", "float32",
               "through the whole network", t_full, t_head, max_err=err,
               note=f"solver={solver}" + (f" {options}" if options else ""))


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    reps = 1 if quick else 3
    return [
        _case("digits SmallCNN, cosine fc (LDAM)", SmallCNN(10, normed_fc=True), (1, 8, 8), 256 if quick else 512,
              10, "exact", None, reps),
        _case("digits SmallCNN, linear fc (ERM)", SmallCNN(10), (1, 8, 8), 256 if quick else 512, 10, "exact", None,
              reps),
        _case("ResNet-32, cosine fc (LDAM)", ResNet32(10, normed_fc=True), (3, 32, 32), 32 if quick else 64, 10,
              "exact", None, reps),
    ]


if __name__ == "__main__":
    from benchmarks.common import markdown_table

    print(markdown_table(run()))
