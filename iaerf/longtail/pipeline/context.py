"""What every stage of a run reads: :class:`RunContext`, the run's settings, its data split and validation set
(loaded once, on first use), device, log, the paths of its files and the digests of the user's data files.

Stages (:mod:`iaerf.longtail.pipeline.stages`) depend on this context only; :class:`~iaerf.longtail.pipeline.Pipeline`
is the context that also holds the run directory's lock and runs the stages.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from iaerf.core.identity import file_digest
from iaerf.longtail import data as D
from iaerf.longtail.pipeline.files import load_checkpoint
from iaerf.longtail.pipeline.settings import PipelineConfig, SettingError
from iaerf.longtail.training import TrainConfig, cifar_config, digits_config, resolve_device

__all__ = ["RunContext"]

# the network each dataset trains when ``BaselineSettings.model`` is None
DEFAULT_MODELS = {"digits": "small_cnn", "cifar10": "resnet32", "cifar100": "resnet32", "features": "linear"}


class RunContext:
    """The run in folder ``out`` under ``config``: ``device`` (``config.device`` resolved; a SettingError naming
    ``device`` when it does not exist), ``progress`` (progress bars), ``log`` (one line per call)."""

    def __init__(self, out: str, config: PipelineConfig, *, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.out = os.path.abspath(out)
        self.config = config
        self.progress = progress
        self.log = log
        try:
            self.device = resolve_device(config.device)
        except (TypeError, ValueError) as exc:
            raise SettingError("device", str(exc)) from None
        self._split = None
        self._user_files: dict[str, str] = {}  # absolute path -> sha256 of each user file the split was read from

    # -- the data ---------------------------------------------------------------------------------------------
    def split(self) -> D.ImbalancedSplit:
        """The run's imbalanced split (``DataSettings``), loaded on the first call."""
        if self._split is None:
            c, d = self.config, self.config.data
            if d.dataset == "digits":
                self._split = D.load_digits_lt(d.ratio, d.imbalance, seed=c.seed, heldout_val_per_class=d.heldout_val)
            elif d.dataset in ("cifar10", "cifar100"):
                classes = 10 if d.dataset == "cifar10" else 100
                self._digest_user_files(p for part in D.cifar_files(d.data_root, classes).values() for p in part)
                self._split = D.load_cifar_lt(d.data_root, classes, d.ratio, d.imbalance, val_seed=c.seed)
            else:
                self._digest_user_files([d.train_features, d.test_features])
                self._split = D.load_feature_split(d.train_features, d.test_features, seed=c.seed)
            if d.heldout_val and d.dataset != "digits":  # digits holds out before the long tail is drawn
                try:
                    self._split = D.hold_out_validation(self._split, d.heldout_val, seed=c.seed)
                except ValueError as exc:
                    raise SettingError("heldout_val", str(exc)) from None
        return self._split

    def _digest_user_files(self, paths) -> None:
        # before they are read: a file replaced while it is read then shows as changed at the next check, never as
        # the content this run read (a missing file is left to the loader's error)
        self._user_files = {os.path.abspath(p): file_digest(p) for p in paths if os.path.isfile(p)}

    def user_files(self) -> dict[str, str]:
        """The user's data files the split was read from (features files, CIFAR batches; none for the bundled
        digits): absolute path -> SHA-256 of the content read."""
        self.split()
        return dict(self._user_files)

    def val(self) -> D.TensorDataset:
        """The validation set behind the influence (Eq. 9) and the beta choice (``DataSettings.validation``)."""
        split = self.split()
        return split.heldout_val if self.config.data.validation_set == "heldout" else split.val

    # -- models and schedules ---------------------------------------------------------------------------------
    def arch(self, method: str) -> dict:
        """The checkpoint architecture of ``method``'s model: {"name", "num_classes", **kwargs}."""
        split = self.split()
        chosen = self.config.baselines.model
        name = chosen or DEFAULT_MODELS[self.config.data.dataset]
        arch = {"name": name, "num_classes": split.num_classes}
        if name == "linear":
            arch["in_features"] = int(split.train.inputs.shape[1])
        if chosen is not None:  # a chosen network takes the data's channels (the presets know theirs)
            arch["in_channels"] = int(split.train.inputs.shape[1])
        if method == "ldam_drw":
            arch["normed_fc"] = True
        return arch

    def model(self, method: str, variant: str | None = None) -> torch.nn.Module:
        """The model a stage wrote (:meth:`checkpoint_path`), on the run's device."""
        model, _ = load_checkpoint(self.checkpoint_path(method, variant), self.arch(method))
        return model.to(self.device)

    def train_config(self, method: str) -> TrainConfig:
        """The baseline schedule: the dataset preset with ``BaselineSettings.epochs`` (its milestones, warm-up and
        DRW epoch scaled to it, so that a short run still decays) and the run's seed."""
        c = self.config
        preset = digits_config if c.data.dataset == "digits" else cifar_config
        over = {"seed": c.seed}
        if c.data.dataset == "features":
            over["augment"] = "none"
        if c.baselines.epochs is not None:
            e = int(c.baselines.epochs)
            base = preset(method)
            scale = e / base.epochs
            over.update(epochs=e, warmup_epochs=min(base.warmup_epochs, max(e // 10, 0)),
                        milestones=tuple(int(m * scale) for m in base.milestones),
                        drw_epoch=int(base.drw_epoch * scale))
        return preset(method, **over)

    # -- the run directory's files ----------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def checkpoint_path(self, method: str, variant: str | None = None) -> str:
        """``models/<method>.pt`` (baseline) or ``finetune/<method>-<variant>.pt`` (a fine-tuning variant,
        :data:`iaerf.longtail.pipeline.report.FINETUNE_VARIANTS`)."""
        return self.path("models", f"{method}.pt") if variant is None else \
            self.path("finetune", f"{method}-{variant}.pt")

    def influence_path(self, method: str) -> str:
        """``influence/<method>.pt``: I_val [n_train] of ``method``'s baseline."""
        return self.path("influence", f"{method}.pt")

    def finetune_info_path(self, method: str, variant: str = "iaerf") -> str:
        """``finetune/<method>-<variant>.json``: beta search, selection, history, schedule, loss."""
        return self.path("finetune", f"{method}-{variant}.json")

    def energy_path(self, method: str, variant: str) -> str:
        """``finetune/<method>-<variant>-energy.pt``: training-set energies [1 + epochs, n_train]."""
        return self.path("finetune", f"{method}-{variant}-energy.pt")

    def posthoc_path(self, method: str, variant: str | None = None) -> str:
        """``posthoc/<method>.json`` (on the baseline) or ``posthoc/<method>-<variant>.json`` (on a fine-tuned
        model)."""
        return self.path("posthoc", f"{method}.json" if variant is None else f"{method}-{variant}.json")

    def pbrf_path(self, method: str) -> str:
        """``evaluation/pbrf_<method>.json``: the energy influence against its PBRF ground truth."""
        return self.path("evaluation", f"pbrf_{method}.json")
