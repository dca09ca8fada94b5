"""Ground truth for the influence numbers: what they estimate, measured by actually changing the training.

- :func:`pbrf_effect`: the proximal Bregman response function, the quantity the damped Gauss-Newton influence of a
  network estimates (energy or loss, central differences, Newton-CG to a reported tolerance);
- :func:`loo_correlation`: leave-one-out re-fits against the loss influence for L2-regularised softmax regression;
- :func:`lds`: the linear datamodeling score over random training subsets (:func:`softmax_regression_trainer`
  re-trains the convex model, :func:`mlp_trainer` a small tanh MLP); :func:`energy_lds` its energy analogue;
- :func:`scatter_predicted_vs_actual`: the predicted-vs-actual scatter (paper Fig. 1) with Pearson R.

Every evaluation takes ``out_dir=`` (a resumable results folder, see :mod:`iaerf.core.store`).
"""
from iaerf.core.store import ResultsFolder, SettingsMismatchError
from iaerf.groundtruth.lds import energy_lds, fit_tanh_mlp, lds, mlp_trainer, softmax_regression_trainer
from iaerf.groundtruth.loo import loo_correlation
from iaerf.groundtruth.pbrf import PBRFInfo, pbrf_effect
from iaerf.groundtruth.scatter import scatter_predicted_vs_actual

__all__ = ["PBRFInfo", "ResultsFolder", "SettingsMismatchError", "energy_lds", "fit_tanh_mlp", "lds",
           "loo_correlation", "mlp_trainer", "pbrf_effect", "scatter_predicted_vs_actual",
           "softmax_regression_trainer"]
