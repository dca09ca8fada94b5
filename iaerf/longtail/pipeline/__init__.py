"""The IAERF pipeline in one run directory: data -> baselines -> influence -> fine-tuning -> evaluation -> plots.

- :mod:`~iaerf.longtail.pipeline.settings`: :class:`PipelineConfig` and its groups (each field's check and option), the
  named protocols.
- :mod:`~iaerf.longtail.pipeline.context`: :class:`RunContext`, what the stages read: settings, split, validation
  set, device, log, the run's file paths.
- :mod:`~iaerf.longtail.pipeline.stages`: the stages as functions of the context declaring needs, the settings they
  read (their key) and outputs.
- :mod:`~iaerf.longtail.pipeline.run`: :class:`Pipeline`, the context that holds the run directory's lock and runs
  the stages with resume.
- :mod:`~iaerf.longtail.pipeline.files`: checkpoints and the readers that check every output.
- :mod:`~iaerf.longtail.pipeline.factories`: the user's own data and network (``--data`` / ``--model``
  ``package.module:function``), read once and keyed by content.
- :mod:`~iaerf.longtail.pipeline.report`: the results table.

Layout of ``<run>/``::

    settings.json                 the PipelineConfig (every stage's inputs), flat, by option name
    data.json                     class counts, shot groups, split sizes
    models/<method>.pt            baseline checkpoints (erm, ldam_drw, crt, lws)
    influence/<method>.pt         {"values": I_val [n_train]} (Eq. 9) in training-set order
    finetune/<method>-<variant>.pt    fine-tuned checkpoints, variant "ce" (the control), "iaerf", "iaerf-class",
                                  "iaerf-la" (IAERF on the logit-adjusted loss), "la", "cb" (loss baselines)
    finetune/<method>-<variant>.json  beta search table and selection (validation only), history, config, loss
    finetune/<method>-<variant>-energy.pt  {"values": training-set energies [1 + epochs, n_train]}, before and
                                  after each fine-tuning epoch
    (every .pt file also records the SHA-256 of its content, checked on every read)
    posthoc/<method>[-<variant>].json  post-hoc taus chosen on validation (logit adjustment, tau-normalisation)
    metrics.json, table.md        validation score, test error overall and per shot group for every model
    plots/fig{1,2,3,5}_<method>.png, plots/pbrf_<method>.png
    evaluation/pbrf_<method>.json energy influence vs its PBRF ground truth (``iaerf evaluate-influence``)
    stages/<stage>.json           completion marker: the stage's settings key and the SHA-256 of every output it
                                  wrote and every input it read (removed when the stage starts, written last)
    .lock                         held (``fcntl.flock``) by the one Pipeline writing the run; holds its pid

A key hashes the fields of the settings groups the stage reads and its inputs' keys, so changing e.g. the damping re-runs influence,
fine-tuning and evaluation but not training; a stage whose outputs or inputs (upstream outputs, the user's data
files) differ from the digests its marker recorded runs again too.
"""
from iaerf.core.io import read_json, write_json
from iaerf.longtail.models import classifier_head
from iaerf.longtail.pipeline.context import RunContext
from iaerf.longtail.pipeline.files import load_checkpoint, read_settings, save_checkpoint, save_vector
from iaerf.longtail.pipeline.report import format_table
from iaerf.longtail.pipeline.run import DamagedOutputWarning, Pipeline, RunLockedError, fork_run
from iaerf.longtail.pipeline.settings import (BaselineSettings, DataSettings, FigureSettings, FineTuningSettings,
                                     InfluenceStageSettings, PipelineConfig, SettingError)

__all__ = ["PipelineConfig", "DataSettings", "BaselineSettings", "InfluenceStageSettings", "FineTuningSettings",
           "FigureSettings", "Pipeline", "RunContext", "SettingError", "DamagedOutputWarning", "RunLockedError", "fork_run",
           "save_checkpoint", "load_checkpoint", "save_vector", "read_json", "write_json", "read_settings",
           "classifier_head", "format_table"]
