"""Influence of energy regularization (paper Eq. 7-9) by one inverse-HVP solve and one forward-mode pass.

- :func:`energy_influence`: I_val(x_i) for every training point (Eq. 9), ``[n_train]``.
- :func:`energy_influence_on_test`: I_{x_test_j}(x_i) (Eq. 8), ``[n_test, n_train]``.
- :func:`loss_influence`: the classic influence of upweighting x_i on the validation loss (Eq. 4), ``[n_train]``.
- :func:`loss_influence_on_test`: the pairwise loss influence, Eq. 4 per test point, ``[n_test, n_train]``;
  :func:`top_influences` ranks the most helpful and harmful training points of each test point.
- :class:`InfluenceSettings`: what a computation computes (solver, options, damping, weight decay, scope, task,
  batch size, seed, cache, process group); the functions take it as ``settings=`` or its fields as keywords.
- :class:`InfluenceTask`: the training loss, measurement, regularized quantity and item layout (default: the paper's).
- :mod:`iaerf.influence.validation`: re-optimisation checks (the Eq. 7 convex check, the paper's Fig. 1 protocol).
"""
from iaerf.influence.ranking import TopInfluences, top_influences
from iaerf.influence.scores import energy_influence, energy_influence_on_test, loss_influence, loss_influence_on_test
from iaerf.influence.settings import InfluenceSettings
from iaerf.influence.task import InfluenceTask

__all__ = ["InfluenceSettings", "InfluenceTask", "TopInfluences", "top_influences", "loss_influence_on_test", "energy_influence", "energy_influence_on_test", "loss_influence"]
