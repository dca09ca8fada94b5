"""One run directory: its settings, the loaded split and device, and the stage runner with resume.

A stage (:mod:`iaerf.pipeline.stages`) is skipped when its marker ``stages/<name>.json`` holds the same key and its
outputs exist and pass their readers' checks (a damaged output is warned about and counts as missing). Every file is
written to a temporary file in the same folder and moved into place, so an interrupted run never leaves a
half-written output and earlier outputs stay intact.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Callable

import torch

from iaerf import data as D
from iaerf._io import ensure_writable_dir, read_json, write_json
from iaerf.pipeline import stages as S
from iaerf.pipeline.files import build_from_arch, read_settings
from iaerf.pipeline.settings import PipelineConfig, SettingError
from iaerf.training import resolve_device

__all__ = ["Pipeline", "DamagedOutputWarning", "fork_run"]


class DamagedOutputWarning(UserWarning):
    """A stage's output file was unreadable or held the wrong content; the stage runs again."""


class Pipeline:
    """The run in ``out``: each public method runs its stage and the stages it needs (or skips those already done)
    and returns what the stage wrote.

    ``methods``: methods the caller will run besides ``config.baselines.methods`` (their settings are checked too).
    Every setting is checked here, before any stage runs and before ``settings.json`` is written, so a bad setting
    neither costs a stage nor ends up stored for the next command.
    """

    def __init__(self, out: str, config: PipelineConfig | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print, methods: tuple[str, ...] = ()):
        self.out = os.path.abspath(out)
        self.progress = progress
        self.log = log
        settings_path = os.path.join(self.out, "settings.json")
        if config is None:
            if not os.path.isfile(settings_path):
                raise FileNotFoundError(f"{settings_path} not found: start the run with `iaerf data` or `iaerf demo`")
            try:
                config = PipelineConfig.from_json(read_settings(settings_path))
            except SettingError as exc:
                raise SettingError(exc.field, f"{settings_path}: {exc}") from None
        self.config = config
        self._split = None
        self._reported: set[str] = set()  # stages already logged as skipped (they are checked many times)
        self._checked: dict[str, tuple[int, int]] = {}  # output path -> (mtime_ns, size) when it last passed its check
        self.device = self._validate(tuple(methods))
        write_json(settings_path, config.to_json())

    def _validate(self, methods: tuple[str, ...]) -> torch.device:
        """Check what PipelineConfig cannot check alone (device, folders, data, parameter names); returns the device.

        The data split is loaded here (the first stage needs it anyway) because whether every class keeps an image,
        and which parameter names exist, depend on it.
        """
        from iaerf.finetuning import _trainable
        from iaerf.hessian.params import select_parameters

        c = self.config
        try:
            device = resolve_device(c.device)
        except (TypeError, ValueError) as exc:
            raise SettingError("device", str(exc)) from None
        split = self.split()
        if c.data.dataset != "features":
            counts = split.counts()
            empty = [k for k, n in enumerate(counts) if n < 1]
            if empty:
                raise SettingError("ratio", f"ratio {c.data.ratio:g} leaves classes {empty} with no training image; "
                                            f"every class must keep at least one, so the ratio must not exceed the "
                                            f"largest class's count n_max = {max(counts)}")
        train_params = c.finetune_config().train_params
        influence_params = c.influence.influence_params
        for method in dict.fromkeys(tuple(c.baselines.methods) + methods):
            with torch.random.fork_rng(devices=[]):  # building the skeleton must not move the seeded global RNG
                skeleton = build_from_arch(S.model_arch(self, method))
            try:
                if influence_params != "finetuned":  # else the fine-tuned selection, checked below
                    select_parameters(skeleton, list(influence_params) if influence_params is not None else None)
            except ValueError as exc:
                raise SettingError("influence_params", f"influence_params for the {method} model: {exc}") from None
            try:
                _trainable(skeleton, train_params)
            except ValueError as exc:
                raise SettingError("finetune_params", f"finetune_params for the {method} model: {exc}") from None
        # last, because it creates the folders: a run that fails an earlier check leaves nothing behind
        ensure_writable_dir(self.out, "run directory")
        for sub in ("stages", "models", "influence", "finetune", "plots", "evaluation"):
            ensure_writable_dir(self.path(sub), f"run directory's {sub}/ folder")
        checkpoint = (c.influence.solver_options or {}).get("checkpoint_path")
        if checkpoint is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(checkpoint)), "folder of solver option checkpoint_path")
        return device

    # -- the run's shared state ------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def split(self) -> D.ImbalancedSplit:
        if self._split is None:
            c, d = self.config, self.config.data
            if d.dataset == "digits":
                self._split = D.load_digits_lt(d.ratio, d.imbalance, seed=c.seed, heldout_val_per_class=d.heldout_val)
            elif d.dataset in ("cifar10", "cifar100"):
                self._split = D.load_cifar_lt(d.data_root, 10 if d.dataset == "cifar10" else 100, d.ratio,
                                              d.imbalance, val_seed=c.seed)
            else:
                self._split = D.load_feature_split(d.train_features, d.test_features, seed=c.seed)
            if d.heldout_val and d.dataset != "digits":  # digits holds out before the long tail is drawn
                try:
                    self._split = D.hold_out_validation(self._split, d.heldout_val, seed=c.seed)
                except ValueError as exc:
                    raise SettingError("heldout_val", str(exc)) from None
        return self._split

    def val(self) -> D.TensorDataset:
        """The validation set behind the influence (Eq. 9) and the beta choice (``DataSettings.validation``)."""
        split = self.split()
        return split.heldout_val if self.config.data.validation_set == "heldout" else split.val

    # -- running stages --------------------------------------------------------------------------------------
    def ensure(self, stage: S.Stage) -> bool:
        """Run ``stage`` (after the stages it needs) unless it is done; returns True when it ran."""
        for need in stage.needs:
            self.ensure(need)
        if self._done(stage):
            if stage.name not in self._reported:
                self.log(f"[iaerf] {stage.name}: done already, skipped")
                self._reported.add(stage.name)
            return False
        t0 = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - t0
        write_json(self._marker(stage), {"key": stage.key, "seconds": seconds})
        self._reported.add(stage.name)
        self.log(f"[iaerf] {stage.name}: {seconds:.1f}s")
        return True

    def _marker(self, stage: S.Stage) -> str:
        return self.path("stages", f"{stage.name}.json")

    def _done(self, stage: S.Stage) -> bool:
        marker = self._marker(stage)
        if not os.path.isfile(marker) or not self._intact(stage.name, marker, lambda p: read_json(p, ("key",))):
            return False
        if read_json(marker)["key"] != stage.key:
            return False
        return all(os.path.isfile(p) and self._intact(stage.name, p, check) for p, check in stage.outputs.items())

    def _intact(self, stage: str, path: str, check: Callable[[str], object]) -> bool:
        """Whether ``path`` passes ``check``; a damaged file is warned about and counts as missing, so its stage
        runs again. A file that passed keeps its verdict until it changes."""
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        if self._checked.get(path) == stamp:
            return True
        try:
            check(path)
        except ValueError as exc:
            warnings.warn(f"{exc}; running the {stage} stage again", DamagedOutputWarning, stacklevel=3)
            return False
        self._checked[path] = stamp
        return True

    # -- the stages, with what they wrote ---------------------------------------------------------------------
    def data(self) -> dict:
        """``data.json``: class counts, shot groups, split sizes."""
        self.ensure(S.data_stage(self))
        return read_json(self.path("data.json"))

    def train(self, method: str) -> None:
        self.ensure(S.train_stage(self, method))

    def influence(self, method: str) -> torch.Tensor:
        """I_val [n_train] of ``method``'s baseline (Eq. 9)."""
        self.ensure(S.influence_stage(self, method))
        return S.read_influence(self, S.influence_path(self, method))

    def finetune(self, method: str, variant: str) -> None:
        self.ensure(S.finetune_stage(self, method, variant))

    def finetune_info(self, method: str, variant: str = "iaerf") -> dict:
        """``finetune/<method>-<variant>.json`` (run :meth:`finetune` first): beta, beta search table, history."""
        return S.read_finetune_info(S.finetune_info_path(self, method, variant))

    def evaluate(self) -> dict:
        """``metrics.json``: test error of every model (each baseline, its CE control, IAERF)."""
        self.ensure(S.evaluate_stage(self))
        return read_json(self.path("metrics.json"))

    def plots(self, fig1: bool | None = None) -> list[str]:
        """Figures 2, 3, 5 of every method (and 1 with ``fig1``, default ``config.figures.fig1``); their paths."""
        fig1 = self.config.figures.fig1 if fig1 is None else fig1
        made = []
        for m in self.config.baselines.methods:
            for stage in [S.plots_stage(self, m)] + ([S.fig1_stage(self, m)] if fig1 else []):
                self.ensure(stage)
                made += list(stage.outputs)
        return made

    def evaluate_influence(self, method: str) -> dict:
        """``evaluation/pbrf_<method>.json``: the energy influence against its PBRF ground truth (Pearson R)."""
        self.ensure(S.pbrf_stage(self, method))
        return read_json(S.pbrf_path(self, method))

    def run_all(self) -> dict:
        self.data()
        metrics = self.evaluate()
        self.plots()
        return metrics

    def checkpoint(self, method: str, variant: str | None = None) -> str:
        return S.checkpoint_path(self, method, variant)

    def influence_path(self, method: str) -> str:
        return S.influence_path(self, method)

    def model(self, method: str, variant: str | None = None) -> torch.nn.Module:
        return S.load_model(self, method, variant)

    def arch(self, method: str) -> dict:
        return S.model_arch(self, method)


def fork_run(source: str, target: str) -> None:
    """Start run directory ``target`` from the finished stages of ``source``: every file but ``settings.json`` is
    hard-linked (copied where links are impossible). A :class:`Pipeline` on ``target`` with other settings then
    re-runs only the stages whose keys changed. Sharing inodes is safe because stages never write a file in place
    (each write replaces the file with a new one)."""
    source, target = os.path.abspath(source), os.path.abspath(target)
    if not os.path.isfile(os.path.join(source, "settings.json")):
        raise FileNotFoundError(f"{source} is not a run directory (no settings.json)")
    if os.path.commonpath([source, target]) == source:
        raise ValueError(f"fork target {target} is inside the run directory {source} it would copy")
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"fork target {target} exists and is not empty")

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True,
                    ignore=lambda folder, names: ["settings.json"] if os.path.samefile(folder, source) else [])
