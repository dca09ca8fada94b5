"""What every stage of a run reads: :class:`RunContext`, the run's settings, its data split and validation set
(loaded once, on first use), device, log, the paths of its files and the digests of the user's data files.

Stages (:mod:`iaerf.longtail.pipeline.stages`) depend on this context only; :class:`~iaerf.longtail.pipeline.Pipeline`
is the context that also holds the run directory's lock and runs the stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable

import torch

from iaerf.core.identity import file_digest
from iaerf.longtail import data as D
from iaerf.longtail.finetuning import FinetuneConfig
from iaerf.longtail.pipeline.files import load_checkpoint
from iaerf.longtail.pipeline.settings import USER_SOURCES, PipelineConfig, SettingError
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
        self._data_digest: str | None = None  # the content digest of a data factory's sets
        self._network: dict | None = None  # a model factory's network: {"head", "identity"}
        self._archs: dict[str, dict] = {}

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
            elif d.dataset == "features":
                self._digest_user_files([d.train_features, d.test_features])
                self._split = D.load_feature_split(d.train_features, d.test_features, seed=c.seed)
            elif d.dataset == "npz":
                self._digest_user_files([d.data_root])
                self._split = D.load_npz_split(d.data_root, seed=c.seed)
            elif d.dataset == "image_folder":
                files = D.image_folder_files(d.data_root)
                # one digest of the whole tree (every image's path in it and content): markers stay small
                h = hashlib.sha256()
                for part, classes in files.items():
                    for path in (p for ps in classes.values() for p in ps):
                        h.update(f"{os.path.relpath(path, d.data_root)}\0{file_digest(path)}\0".encode())
                self._user_files = {os.path.abspath(d.data_root): h.hexdigest()}
                self._split = D.load_image_folder(d.data_root, d.image_size, seed=c.seed)
            else:
                from iaerf.longtail.pipeline.factories import data_from_factory

                self._split, self._data_digest = data_from_factory(d.factory, c.seed)
            brings_val = d.dataset in USER_SOURCES and self._split.heldout_val is not None
            if brings_val and d.heldout_val:
                raise SettingError("heldout_val", f"heldout_val={d.heldout_val}: the data brings its own validation "
                                                  f"set ({len(self._split.heldout_val)} examples), which is the "
                                                  f"held-out one; give --heldout-val 0")
            if d.heldout_val and d.dataset != "digits":  # digits holds out before the long tail is drawn
                try:
                    self._split = D.hold_out_validation(self._split, d.heldout_val, seed=c.seed)
                except ValueError as exc:
                    raise SettingError("heldout_val", str(exc)) from None
            if d.validation == "heldout" and self._split.heldout_val is None:
                raise SettingError("validation", "validation='heldout' needs a held-out validation set: "
                                                 "heldout_val > 0 images per class, or a val set in the data")
        return self._split

    def _digest_user_files(self, paths) -> None:
        # before they are read: a file replaced while it is read then shows as changed at the next check, never as
        # the content this run read (a missing file is left to the loader's error)
        self._user_files = {os.path.abspath(p): file_digest(p) for p in paths if os.path.isfile(p)}

    def user_files(self) -> dict[str, str]:
        """The user's data files the split was read from (features files, CIFAR batches, an npz file, an image
        folder as one entry: the digest of its images' paths and contents; none for the bundled digits or a data
        factory): absolute path -> SHA-256 of the content read."""
        self.split()
        return dict(self._user_files)

    def data_digest(self) -> str | None:
        """The SHA-256 of the sets a data factory (``--data``) returned, as read; None for every other source."""
        self.split()
        return self._data_digest

    def validation_set(self) -> str:
        """``DataSettings.validation`` resolved: "heldout" or "train_subset"; None means "heldout" when the split
        has a held-out set (``heldout_val`` > 0, or the user's data brought a val set)."""
        given = self.config.data.validation
        return given or ("heldout" if self.split().heldout_val is not None else "train_subset")

    def val(self) -> D.TensorDataset:
        """The validation set behind the influence (Eq. 9) and the beta choice (``DataSettings.validation``)."""
        split = self.split()
        return split.heldout_val if self.validation_set() == "heldout" else split.val

    # -- models and schedules ---------------------------------------------------------------------------------
    def arch(self, method: str) -> dict:
        """The checkpoint architecture of ``method``'s model: {"name", "num_classes", **kwargs}; a ``--model``
        factory's: {"name": "factory", "factory": spec, "num_classes", "head", "identity"} (see
        :mod:`iaerf.longtail.pipeline.factories`), its checks run once, here."""
        if method not in self._archs:
            self._archs[method] = self._arch(method)
        return self._archs[method]

    def _arch(self, method: str) -> dict:
        split = self.split()
        chosen, dataset = self.config.baselines.model, self.config.data.dataset
        if chosen is not None and ":" in chosen:
            network = self._factory_network()
            arch = {"name": "factory", "factory": chosen, "num_classes": split.num_classes, **network}
            if method == "ldam_drw":
                arch["normed_fc"] = True
                self._check_normed_head(arch)
            return arch
        name = chosen or DEFAULT_MODELS.get(dataset) or self._default_model()
        arch = {"name": name, "num_classes": split.num_classes}
        if name == "linear":
            arch["in_features"] = int(split.train.inputs.shape[1])
        elif chosen is not None or dataset in USER_SOURCES:  # a chosen network takes the data's channels
            arch["in_channels"] = int(split.train.inputs.shape[1])
        if method == "ldam_drw":
            arch["normed_fc"] = True
        return arch

    def _default_model(self) -> str:
        """The bundled network for the user's data, by the shape of its inputs."""
        shape = tuple(self.split().train.inputs.shape[1:])
        if len(shape) == 1:
            return "linear"
        if len(shape) == 3:
            return "convnet"
        raise SettingError("model", f"the data's inputs have shape {list(shape)} per example, which no bundled "
                                    f"network takes ([D] features or [C, H, W] images); give --model "
                                    f"package.module:function")

    def _factory_network(self) -> dict:
        """{"head": the network's head name, "identity": its cache identity} of the ``--model`` factory, built once
        under the run's seed and probed on a training input."""
        if self._network is None:
            from iaerf.core.heads import HeadNotFoundError, find_classifier_head
            from iaerf.longtail.pipeline.factories import model_from_factory, model_identity

            spec, split = self.config.baselines.model, self.split()
            with torch.random.fork_rng(devices=[]):  # the seeded build the train stage makes; the global RNG stays
                torch.manual_seed(self.config.seed)
                model = model_from_factory(spec, split.num_classes)
            try:
                head, layer = find_classifier_head(model, split.train.inputs[:2])
            except (HeadNotFoundError, RuntimeError, TypeError) as exc:
                raise SettingError("model", f"--model {spec} on the data's inputs {list(split.train.inputs.shape[1:])}"
                                            f": {exc}") from None
            if layer.out_features != split.num_classes:
                raise SettingError("model", f"--model {spec}: its head {head!r} has {layer.out_features} outputs but "
                                            f"the data has {split.num_classes} classes")
            self._network = {"head": head, "identity": model_identity(spec, model)}
        return self._network

    def _check_normed_head(self, arch: dict) -> None:
        """LDAM-DRW's cosine head swapped into the factory's network must be what produces its logits."""
        from iaerf.core.heads import find_classifier_head
        from iaerf.longtail.models import NormedLinear
        from iaerf.longtail.pipeline.files import build_from_arch

        with torch.random.fork_rng(devices=[]):
            model = build_from_arch(arch)
        try:
            _, layer = find_classifier_head(model, self.split().train.inputs[:2])
        except ValueError:
            layer = None
        if not isinstance(layer, NormedLinear):
            raise SettingError("methods", f"ldam_drw with --model {arch['factory']}: LDAM-DRW replaces the head "
                                          f"{arch['head']!r} by a cosine classifier, but the network's logits do "
                                          f"not come from the replacement (its forward must call "
                                          f"self.{arch['head']}(features)); leave ldam_drw out (--methods erm)")

    def param_names(self, names):
        """Parameter-name prefixes of a setting (``influence_params``, ``finetune_params``) for this run's network:
        "fc" names the classifier head, so for a ``--model`` factory network it becomes the head's own name."""
        chosen = self.config.baselines.model
        if not isinstance(names, tuple) or chosen is None or ":" not in chosen:
            return names
        head = self._factory_network()["head"]
        return tuple(head if n == "fc" else n for n in names)

    def finetune_config(self, record_energy: bool = False) -> FinetuneConfig:
        """:meth:`PipelineConfig.finetune_config` with its parameter prefixes for this run's network
        (:meth:`param_names`)."""
        cfg = self.config.finetune_config(record_energy)
        return dataclasses.replace(cfg, train_params=self.param_names(cfg.train_params))

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
        if c.data.dataset == "features" or c.data.dataset in USER_SOURCES:  # CIFAR's crops and flips fit CIFAR only
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
