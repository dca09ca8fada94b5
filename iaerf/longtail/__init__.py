"""The long-tailed application of the engine: the paper's experiments and IAERF (Algorithm 1) as a library.

Built on :mod:`iaerf` (the influence engine), never the other way round:

- :mod:`~iaerf.longtail.data`, :mod:`~iaerf.longtail.models`, :mod:`~iaerf.longtail.losses`: long-tailed splits
  (digits, CIFAR-LT, feature files), the paper's networks, LDAM / class-balanced / logit-adjusted losses;
- :mod:`~iaerf.longtail.training`: the long-tail baselines (ERM, LDAM-DRW, cRT, LWS) and evaluation by shot group;
- :mod:`~iaerf.longtail.finetuning`: Algorithm 1, :func:`finetune` and :func:`select_beta` (beta on validation),
  on any data the influence API takes; :mod:`~iaerf.longtail.iaerf_loss`: its per-batch loss :class:`IAERFLoss`,
  for a user's own training loop;
- :mod:`~iaerf.longtail.posthoc`, :mod:`~iaerf.longtail.selection`: the cheap baselines (post-hoc logit
  adjustment, tau-normalisation) and noise-aware selection on validation;
- :mod:`~iaerf.longtail.figures`, :mod:`~iaerf.longtail.stats`: the paper's figures, paired statistics over seeds;
- :mod:`~iaerf.longtail.pipeline`, :mod:`~iaerf.longtail.cli`: the resumable run directory and the ``iaerf``
  command.
"""
from iaerf.longtail.finetuning import FinetuneConfig, FinetuneResult, finetune, select_beta
from iaerf.longtail.iaerf_loss import IAERFLoss, energy_coefficients

__all__ = ["FinetuneConfig", "FinetuneResult", "IAERFLoss", "energy_coefficients", "finetune", "select_beta"]
