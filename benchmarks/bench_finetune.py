"""One IAERF fine-tuning epoch (Algorithm 1 with the fused energy loss) vs one plain CE fine-tuning epoch.

Both loops are identical (same model, data order, SGD, frozen batch norm) except for the per-batch loss:
``F.cross_entropy`` (baseline), ``iaerf.energy_regularized_cross_entropy`` with c_i (iaerf), and the plain
autograd composition CE + c * (-logsumexp) (peer). Target (issue 6): IAERF overhead <= 5%, i.e. speed-up >= 0.95.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import row, time_fn
from iaerf.longtail.finetuning import freeze_batchnorm
from iaerf.longtail.models import ResNet32, SmallCNN
from iaerf.ops import energy_regularized_cross_entropy


def _epoch_fn(model, x, y, coef, loss_kind: str, batch_size: int):
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def epoch():
        model.train()
        freeze_batchnorm(model)
        for start in range(0, len(x), batch_size):
            xb, yb, cb = x[start:start + batch_size], y[start:start + batch_size], coef[start:start + batch_size]
            logits = model(xb)
            if loss_kind == "ce":
                loss = F.cross_entropy(logits, yb)
            elif loss_kind == "iaerf":
                loss = energy_regularized_cross_entropy(logits, yb, cb)
            else:
                loss = (F.cross_entropy(logits, yb, reduction="none") + cb * -torch.logsumexp(logits, 1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def _case(name, make_model, input_shape, n, num_classes, batch_size, reps, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, *input_shape), generator=gen).to(device)
    y = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    coef = (0.1 * torch.randn(n, generator=gen)).to(device)
    timings = {}
    for kind in ("ce", "iaerf", "autograd"):
        torch.manual_seed(0)
        model = make_model().to(device)
        timings[kind] = time_fn(_epoch_fn(model, x, y, coef, kind, batch_size), warmup=1, reps=reps, device=device)
    return row(
        f"fine-tuning epoch ({name})", f"n={n}, batch={batch_size}, K={num_classes}", "float32",
        "plain CE epoch", timings["ce"], timings["iaerf"], peers={"autograd CE + c*E": timings["autograd"]},
        target=">= 0.95x (overhead <= 5%)",
    )


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reps = 3 if quick else 5
    return [
        _case("digits SmallCNN", lambda: SmallCNN(10), (1, 8, 8), 512 if quick else 2048, 10, 128, reps, device),
        _case("ResNet-32, CIFAR-sized", lambda: ResNet32(10), (3, 32, 32), 128 if quick else 512, 10, 128, reps,
              device),
    ]


if __name__ == "__main__":
    from benchmarks.common import markdown_table

    print(markdown_table(run()))
