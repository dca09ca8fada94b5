"""The IAERF pipeline in one run directory: data -> baselines -> influence -> fine-tuning -> evaluation -> plots.

Layout of ``<run>/``::

    settings.json                 the PipelineConfig (every stage's inputs)
    data.json                     class counts, shot groups, split sizes
    models/<method>.pt            baseline checkpoints (erm, ldam_drw, crt, lws)
    influence/<method>.pt         I_val [n_train] (Eq. 9) in training-set order
    finetune/<method>-<variant>.pt    fine-tuned checkpoints, variant "ce" (control) or "iaerf"
    finetune/<method>-iaerf.json  beta search table (validation only), coefficients summary, history
    metrics.json, table.md        test error overall and per shot group for every model
    plots/fig{1,2,3,5}_<method>.png
    stages/<stage>.json           completion marker: the stage's settings key (written last)

Resume: a stage is skipped when its marker holds the same key and its outputs exist and pass their checks (a
damaged output is warned about and counts as missing). A key hashes the stage's own
settings and its upstream keys, so changing e.g. the damping re-runs influence, fine-tuning and evaluation but not
training. Every file is written to a temporary file in the same folder and moved into place with ``os.replace``,
so an interrupted run never leaves a half-written output, and earlier outputs stay intact.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from iaerf import data as D
from iaerf._io import (atomic_write, ensure_writable_dir, load_tensor_file, read_json, settings_key, write_json,
                       write_text)
from iaerf.finetuning import (BETAS, CAPS, FinetuneConfig, cifar_finetune_config, classifier_retrain_config, config_dict,
                            finetune, select_beta)
from iaerf.heads import find_classifier_head, head_features
from iaerf.models import build_model
from iaerf.training import (ClassifierConfig, TrainConfig, cifar_config, digits_config, evaluate, resolve_device,
                            retrain_classifier, train_baseline)

__all__ = ["PipelineConfig", "Pipeline", "SettingError", "DamagedOutputWarning", "save_checkpoint",
           "load_checkpoint", "save_tensors", "read_json", "read_settings", "classifier_head"]

CHECKPOINT_FORMAT = "iaerf-checkpoint-1"
BASE_METHODS = ("erm", "ldam_drw")
DERIVED_METHODS = ("crt", "lws")  # classifier re-training on the frozen ERM backbone


DATASETS = ("digits", "cifar10", "cifar100", "features")
SOLVERS = ("exact", "cg", "lissa")


class SettingError(ValueError):
    """A run setting with a bad type, range or choice. ``field`` is the :class:`PipelineConfig` field it concerns
    (the command line names the option that sets it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise SettingError(name, f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _real(name: str, value, low: float, expected: str, *, strict: bool = False) -> None:
    """A finite int or float >= low (> low when strict); bools are not numbers here."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        raise SettingError(name, f"{name} must be {expected}, got {value!r}")


def _int(name: str, value, low: int, high: int | None = None, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SettingError(name, f"{name} must be a whole number {bound}{' or None' if optional else ''}, got {value!r}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise SettingError(name, f"{name} must be true or false, got {value!r}")


def _names(name: str, value, kind=str, what: str = "names") -> tuple:
    """A non-empty list / tuple of ``kind`` values, as a tuple (a lone string is not a list of names)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise SettingError(name, f"{name} must be a non-empty list of {what}, got {value!r}")
    return tuple(value)


@dataclass
class PipelineConfig:
    """Everything a run depends on. ``dataset``: "digits", "cifar10", "cifar100" or "features".

    ``heldout_val = k > 0`` (digits only) holds out k images per class as the validation set instead of the paper's
    subset of the training set (an ablation; n_max shrinks by k). ``train_epochs`` / ``finetune_*`` override the per-dataset presets (:func:`iaerf.training.digits_config`,
    :func:`iaerf.training.cifar_config`; fine-tuning: :func:`iaerf.finetuning.cifar_finetune_config` for images,
    :func:`iaerf.finetuning.classifier_retrain_config` for feature files). ``finetune_params``: "auto" = the preset's
    choice, None = every non-batch-norm parameter, or a tuple of parameter-name prefixes.
    """

    dataset: str = "digits"
    data_root: str | None = None
    train_features: str | None = None
    test_features: str | None = None
    imbalance: str = "exp"
    ratio: float = 10.0
    methods: tuple[str, ...] = BASE_METHODS
    train_epochs: int | None = None
    influence_params: tuple[str, ...] | None = ("fc",)
    solver: str = "exact"
    solver_options: dict | None = None
    damping: float = 1e-3
    gauss_newton: bool = False
    weight_decay: float = 0.0
    finetune_epochs: int | None = None
    finetune_batch_size: int | None = None
    finetune_lr: float | None = None
    finetune_params: tuple[str, ...] | str | None = "auto"
    energy_cap: str = "none"
    betas: tuple[float, ...] = BETAS
    select_metric: str = "loss"
    heldout_val: int = 0
    fig1: bool = False
    fig1_points: int = 20
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        _choice("dataset", self.dataset, DATASETS)
        for name in ("data_root", "train_features", "test_features"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise SettingError(name, f"{name} must be a non-empty path string or None, got {value!r}")
        _choice("imbalance", self.imbalance, ("exp", "step"))
        _real("ratio", self.ratio, 1.0, "a finite number >= 1")
        self.methods = _names("methods", self.methods)
        bad = [m for m in self.methods if m not in BASE_METHODS + DERIVED_METHODS]
        if bad:
            raise SettingError("methods", f"methods must be a non-empty subset of {BASE_METHODS + DERIVED_METHODS}, "
                                          f"got {list(self.methods)}")
        _int("train_epochs", self.train_epochs, 1, optional=True)
        if self.influence_params is not None:
            self.influence_params = _names("influence_params", self.influence_params)
        _choice("solver", self.solver, SOLVERS)
        self._check_solver_options()
        _real("damping", self.damping, 0.0, "a finite number >= 0")
        _real("weight_decay", self.weight_decay, 0.0, "a finite number >= 0")
        _bool("gauss_newton", self.gauss_newton)
        _int("finetune_epochs", self.finetune_epochs, 1, optional=True)
        _int("finetune_batch_size", self.finetune_batch_size, 1, optional=True)
        if self.finetune_lr is not None:
            _real("finetune_lr", self.finetune_lr, 0.0, "a finite number > 0", strict=True)
        if self.finetune_params is not None and self.finetune_params != "auto":
            self.finetune_params = _names("finetune_params", self.finetune_params)
        _choice("energy_cap", self.energy_cap, CAPS)
        self.betas = _names("betas", self.betas, kind=(int, float), what="positive finite numbers")
        for b in self.betas:
            _real("betas", b, 0.0, "positive finite numbers", strict=True)
        self.betas = tuple(float(b) for b in self.betas)
        _choice("select_metric", self.select_metric, ("loss", "error"))
        _int("heldout_val", self.heldout_val, 0)
        _bool("fig1", self.fig1)
        _int("fig1_points", self.fig1_points, 1)
        _int("seed", self.seed, 0, 2**32 - 1)  # numpy's seed range (the data split seeds numpy)
        if self.device is not None and not isinstance(self.device, str):
            raise SettingError("device", f"device must be 'cpu', 'cuda', 'cuda:N' or None, got {self.device!r}")
        if self.heldout_val and self.dataset != "digits":
            raise SettingError("heldout_val", "heldout_val (a validation set disjoint from the training set) is only "
                                              "built for digits")
        if self.dataset == "features" and not (self.train_features and self.test_features):
            raise SettingError("train_features", "dataset='features' needs train_features and test_features file paths")
        if self.dataset.startswith("cifar") and not self.data_root:
            raise SettingError("data_root", f"dataset={self.dataset!r} needs data_root (the folder holding the CIFAR "
                                            "pickles)")
        FinetuneConfig(**self._finetune_kwargs())

    def _check_solver_options(self) -> None:
        """The options must be ones the chosen solver accepts, with valid values (the solver's own check)."""
        from iaerf.hessian.inverse import make_solver_options

        opts = self.solver_options
        if opts is None:
            return
        if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
            raise SettingError("solver_options", f"solver_options must be a dict of option names, got {opts!r}")
        try:
            make_solver_options(self.solver, opts, {})
        except (TypeError, ValueError) as exc:
            raise SettingError("solver_options", f"solver_options {opts} for solver {self.solver!r}: {exc}") from None

    def _finetune_kwargs(self) -> dict:
        """Fine-tuning settings: the paper's preset for the dataset (images: 5 epochs, batch 128, lr 1e-4, whole
        network; features: classifier re-training, 10 epochs, batch 512, lr 0.2, fc only), then the explicit fields."""
        preset = classifier_retrain_config() if self.dataset == "features" else cifar_finetune_config()
        kw = dict(epochs=preset.epochs, batch_size=preset.batch_size, lr=preset.lr, train_params=preset.train_params)
        for key, value in (("epochs", self.finetune_epochs), ("batch_size", self.finetune_batch_size),
                           ("lr", self.finetune_lr)):
            if value is not None:
                kw[key] = value
        if self.finetune_params != "auto":
            kw["train_params"] = self.finetune_params
        return dict(kw, energy_cap=self.energy_cap, seed=self.seed)

    def finetune_config(self, record_energy: bool = False) -> FinetuneConfig:
        return FinetuneConfig(record_energy=record_energy, **self._finetune_kwargs())

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "PipelineConfig":
        if not isinstance(d, dict):
            raise ValueError(f"settings must be a JSON object of PipelineConfig fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"settings.json has unknown keys {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# files


class DamagedOutputWarning(UserWarning):
    """A stage's output file was unreadable or held the wrong content; the stage runs again."""


def read_settings(path: str) -> dict:
    """The stored settings of a run (``settings.json``) as a dict; a damaged file is a ValueError that names it and
    the fix."""
    try:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is damaged: expected a JSON object of settings, got {type(obj).__name__}")
    except ValueError as exc:
        raise ValueError(f"{exc}; repair it, or delete it and give the run's settings on the command line") from None
    return obj


def _key(*parts) -> str:
    return settings_key(list(parts), 16)


def save_checkpoint(path: str, model: torch.nn.Module, arch: dict, meta: dict | None = None) -> None:
    """Save ``{"format", "arch": {"name", "num_classes", **kwargs}, "state_dict", "meta"}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_tensors(path, {"format": CHECKPOINT_FORMAT, "arch": arch, "state_dict": state, "meta": meta or {}})


def save_tensors(path: str, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically and byte-reproducibly: saved through a file object, the archive's
    inner folder is "archive" rather than the temporary file's random name, so a re-run writes the same bytes."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def load_checkpoint(path: str, expect_arch: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved by :func:`save_checkpoint`. Raises a ValueError for a corrupt file, a file that is not
    an iaerf checkpoint, or one whose architecture / class count differs from ``expect_arch``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = load_tensor_file(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an iaerf checkpoint (format {CHECKPOINT_FORMAT})")
    arch, state, meta = obj.get("arch"), obj.get("state_dict"), obj.get("meta", {})
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(state, dict)
            and isinstance(meta, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"checkpoint {path} is corrupt: its arch / state_dict / meta entries are malformed")
    if expect_arch is not None and arch != expect_arch:
        raise ValueError(f"checkpoint {path} does not match this run: it holds {arch}, expected {expect_arch}")
    kwargs = {k: v for k, v in arch.items() if k not in ("name", "num_classes")}
    try:
        model = build_model(arch["name"], arch.get("num_classes"), **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is corrupt: its arch {arch} builds no model ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit model {arch['name']}: {exc}") from exc
    return model.eval(), meta


def _read_table(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        text = ""
    if not text.startswith("| model |"):
        raise ValueError(f"{path} is damaged: not the results table")
    return text


def _check_png(path: str) -> None:
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{path} is damaged: not a PNG image")


def _read_vector(path: str, what: str, rows: tuple[int, int] | None, n: int) -> torch.Tensor:
    """A float32 tensor saved by a stage: [n] when ``rows`` is None, else [r, n] with rows[0] <= r <= rows[1]."""
    t = load_tensor_file(path, what)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} {path} is damaged: expected a float32 tensor, got a {got}")
    ok = t.shape == (n,) if rows is None else (t.dim() == 2 and t.shape[1] == n and rows[0] <= t.shape[0] <= rows[1])
    if not ok:
        want = f"[{n}]" if rows is None else f"[{rows[0]}..{rows[1]}, {n}]"
        raise ValueError(f"{what} {path} is damaged: shape {list(t.shape)}, expected {want}")
    return t


@torch.no_grad()
def classifier_head(model: torch.nn.Module, *datasets: D.TensorDataset, device=None):
    """``(head, *feature_datasets)``: the model's classifier head (:func:`iaerf.heads.find_classifier_head`, whatever
    its name: ``fc``, ``head``, ``classifier``) as the ``fc`` of a :class:`~iaerf.models.LinearClassifier`, and every
    dataset mapped to its eval-mode features [n, D] (the head's inputs).

    Classifier-only influence (``params=["fc"]``) depends on the rest of the network only through these frozen
    features, so computing it on the head gives the same numbers while every Hessian-vector product skips the
    backbone -- which matters for a cosine (NormedLinear) fc, where no closed-form linear-head path applies.
    """
    from iaerf.models import LinearClassifier

    if not datasets:
        raise ValueError("classifier_head needs at least one dataset: the head is found on a probe batch of it")
    dev = next(model.parameters()).device
    _, layer = find_classifier_head(model, datasets[0].tensors()[0][:1].to(dev))
    head = LinearClassifier(layer.in_features, layer.out_features)
    # the layer itself, not a rebuilt one: any nn.Linear subclass (NormedLinear's cosine logits) keeps its forward
    head.fc = copy.deepcopy(layer)
    head = head.to(device if device is not None else layer.weight.device).eval()
    out = []
    for ds in datasets:
        x = ds.tensors()[0]
        feats = head_features(model, layer, (x[s:s + 512].to(dev) for s in range(0, len(ds), 512))).cpu()
        out.append(D.TensorDataset(feats, ds.labels, ds.num_classes))
    return (head, *out)


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """Stages of one run in ``out``. Each public method runs its stage (or skips it when already done)."""

    def __init__(self, out: str, config: PipelineConfig | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print, methods: tuple[str, ...] = ()):
        """``methods``: methods the caller will run besides ``config.methods`` (their settings are checked too).

        Every setting is checked here, before any stage runs and before ``settings.json`` is written, so a bad
        setting neither costs a stage nor ends up stored for the next command.
        """
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

        Cheap checks first: the data split is loaded here (the first stage needs it anyway) because whether every
        class keeps an image, and which parameter names exist, depend on it.
        """
        from iaerf.hessian.params import select_parameters
        from iaerf.finetuning import _trainable

        c = self.config
        try:
            device = resolve_device(c.device)
        except (TypeError, ValueError) as exc:
            raise SettingError("device", str(exc)) from None
        checkpoint = (c.solver_options or {}).get("checkpoint_path")
        if checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint):
            raise SettingError("solver_options",
                               f"solver option checkpoint_path must be a file path, got {checkpoint!r}")
        split = self.split()
        if c.dataset != "features":
            counts = split.counts()
            empty = [k for k, n in enumerate(counts) if n < 1]
            if empty:
                raise SettingError("ratio", f"ratio {c.ratio:g} leaves classes {empty} with no training image; every "
                                            f"class must keep at least one, so the ratio must not exceed the largest "
                                            f"class's count n_max = {max(counts)}")
        train_params = c.finetune_config().train_params
        for method in dict.fromkeys(tuple(c.methods) + methods):
            arch = self.arch(method)
            with torch.random.fork_rng(devices=[]):  # building the skeleton must not move the seeded global RNG
                skeleton = build_model(arch["name"], arch["num_classes"],
                                       **{k: v for k, v in arch.items() if k not in ("name", "num_classes")})
            try:
                select_parameters(skeleton, list(c.influence_params) if c.influence_params is not None else None)
            except ValueError as exc:
                raise SettingError("influence_params", f"influence_params for the {method} model: {exc}") from None
            try:
                _trainable(skeleton, train_params)
            except ValueError as exc:
                raise SettingError("finetune_params", f"finetune_params for the {method} model: {exc}") from None
        # last, because it creates the folders: a run that fails an earlier check leaves nothing behind
        ensure_writable_dir(self.out, "run directory")
        for sub in ("stages", "models", "influence", "finetune", "plots"):
            ensure_writable_dir(self.path(sub), f"run directory's {sub}/ folder")
        if checkpoint is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(checkpoint)), "folder of solver option checkpoint_path")
        return device

    # -- helpers ---------------------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _intact(self, stage: str, path: str, check: Callable[[str], object]) -> bool:
        """Whether ``path`` passes ``check`` (which raises ValueError on damage); a damaged file is warned about and
        counts as missing, so its stage runs again. A file that passed keeps its verdict until it changes."""
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        if self._checked.get(path) == stamp:
            return True
        try:
            check(path)
        except ValueError as exc:
            warnings.warn(f"{exc}; running the {stage} stage again", DamagedOutputWarning, stacklevel=2)
            return False
        self._checked[path] = stamp
        return True

    def _done(self, stage: str, key: str, outputs: dict[str, Callable[[str], object]]) -> bool:
        marker = self.path("stages", f"{stage}.json")
        if not os.path.isfile(marker) or not self._intact(stage, marker, lambda p: read_json(p, ("key",))):
            return False
        if read_json(marker)["key"] != key:
            return False
        return all(os.path.isfile(p) and self._intact(stage, p, check) for p, check in outputs.items())

    def _mark(self, stage: str, key: str, seconds: float) -> None:
        write_json(self.path("stages", f"{stage}.json"), {"key": key, "seconds": seconds})

    def _run_stage(self, stage: str, key: str, outputs: dict[str, Callable[[str], object]],
                   fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless done; returns True when it ran. ``outputs``: path -> reader that raises ValueError when
        the file is damaged (wrong format, keys, shape or dtype)."""
        if self._done(stage, key, outputs):
            if stage not in self._reported:
                self.log(f"[iaerf] {stage}: done already, skipped")
                self._reported.add(stage)
            return False
        t0 = time.perf_counter()
        fn()
        self._mark(stage, key, time.perf_counter() - t0)
        self._reported.add(stage)
        self.log(f"[iaerf] {stage}: {time.perf_counter() - t0:.1f}s")
        return True

    # -- data ------------------------------------------------------------------------------------------------
    def split(self) -> D.ImbalancedSplit:
        if self._split is None:
            c = self.config
            if c.dataset == "digits":
                self._split = D.load_digits_lt(c.ratio, c.imbalance, seed=c.seed, heldout_val_per_class=c.heldout_val)
            elif c.dataset in ("cifar10", "cifar100"):
                self._split = D.load_cifar_lt(c.data_root, 10 if c.dataset == "cifar10" else 100, c.ratio, c.imbalance,
                                              val_seed=c.seed)
            else:
                self._split = D.load_feature_split(c.train_features, c.test_features, seed=c.seed)
        return self._split

    def val(self) -> D.TensorDataset:
        """The validation set behind the influence (Eq. 9) and the beta choice: the class-balanced subset of the
        training set (paper), or with ``heldout_val = k`` the k-per-class set held out of training (digits)."""
        split = self.split()
        return split.heldout_val if self.config.heldout_val else split.val

    def data_key(self) -> str:
        c = self.config
        return _key("data", c.dataset, c.data_root, c.train_features, c.test_features, c.imbalance, c.ratio, c.seed,
                    c.heldout_val)

    def data(self) -> dict:
        def run():
            write_json(self.path("data.json"), self.split().describe())

        self._run_stage("data", self.data_key(), {self.path("data.json"): self._read_data_info}, run)
        return self._read_data_info(self.path("data.json"))

    @staticmethod
    def _read_data_info(path: str) -> dict:
        return read_json(path, ("name", "num_classes", "train_counts", "n_train", "n_val", "n_test", "groups"))

    # -- baselines -------------------------------------------------------------------------------------------
    def arch(self, method: str) -> dict:
        split = self.split()
        name = {"digits": "small_cnn", "cifar10": "resnet32", "cifar100": "resnet32", "features": "linear"}[self.config.dataset]
        arch = {"name": name, "num_classes": split.num_classes}
        if name == "linear":
            arch["in_features"] = int(split.train.inputs.shape[1])
        if method == "ldam_drw":
            arch["normed_fc"] = True
        return arch

    def train_config(self, method: str) -> TrainConfig:
        c = self.config
        preset = digits_config if c.dataset == "digits" else cifar_config
        over = {"seed": c.seed}
        if c.dataset == "features":
            over["augment"] = "none"
        if c.train_epochs is not None:
            e = int(c.train_epochs)
            base = preset(method)
            scale = e / base.epochs  # shrink the milestones with the schedule so a short run still decays
            over.update(epochs=e, warmup_epochs=min(base.warmup_epochs, max(e // 10, 0)),
                        milestones=tuple(int(m * scale) for m in base.milestones), drw_epoch=int(base.drw_epoch * scale))
        return preset(method, **over)

    def train_key(self, method: str) -> str:
        if method in DERIVED_METHODS:
            return _key("train", method, self.train_key("erm"), asdict(ClassifierConfig(method, seed=self.config.seed)))
        return _key("train", method, self.data_key(), asdict(self.train_config(method)), self.arch(method))

    def checkpoint(self, method: str, variant: str | None = None) -> str:
        return self.path("models", f"{method}.pt") if variant is None else self.path("finetune", f"{method}-{variant}.pt")

    def train(self, method: str) -> None:
        if method in DERIVED_METHODS:
            self.train("erm")

        def run():
            split = self.split()
            if method in DERIVED_METHODS:
                base, _ = load_checkpoint(self.checkpoint("erm"), self.arch("erm"))
                model = retrain_classifier(base, split.train, ClassifierConfig(method, seed=self.config.seed),
                                           device=self.device, progress=self.progress)
                history = []
            else:
                torch.manual_seed(self.config.seed)  # model initialisation is part of the seeded run
                arch = self.arch(method)
                model = build_model(arch["name"], arch["num_classes"],
                                    **{k: v for k, v in arch.items() if k not in ("name", "num_classes")})
                model, history = train_baseline(model, split.train, self.train_config(method), device=self.device,
                                                progress=self.progress)
            save_checkpoint(self.checkpoint(method), model, self.arch(method), {"method": method, "history": history})

        self._run_stage(f"train-{method}", self.train_key(method),
                        {self.checkpoint(method): self._checkpoint_check(method)}, run)

    def _checkpoint_check(self, method: str) -> Callable[[str], object]:
        return lambda path: load_checkpoint(path, self.arch(method))

    def model(self, method: str, variant: str | None = None) -> torch.nn.Module:
        model, _ = load_checkpoint(self.checkpoint(method, variant), self.arch(method))
        return model.to(self.device)

    # -- influence -------------------------------------------------------------------------------------------
    def influence_key(self, method: str) -> str:
        c = self.config
        return _key("influence", self.train_key(method), c.influence_params, c.solver, c.solver_options, c.damping,
                    c.weight_decay, c.gauss_newton)

    def influence_path(self, method: str) -> str:
        return self.path("influence", f"{method}.pt")

    def influence(self, method: str) -> torch.Tensor:
        self.train(method)

        def run():
            import iaerf.influence as infl

            c, split = self.config, self.split()
            model, train, val = self.model(method), split.train, self.val()
            if c.influence_params == ("fc",):
                model, train, val = classifier_head(model, train, val, device=self.device)
            values = infl.energy_influence(
                model, train, val,
                params=list(c.influence_params) if c.influence_params is not None else None,
                weight_decay=c.weight_decay, damping=c.damping, gauss_newton=c.gauss_newton, solver=c.solver,
                solver_options=dict(c.solver_options) if c.solver_options else None, device=self.device,
                progress=self.progress, seed=c.seed)
            if values.shape != (len(split.train),) or not bool(torch.isfinite(values).all()):
                raise FloatingPointError(f"influence for {method} is not a finite [n_train] vector; raise the damping")
            save_tensors(self.influence_path(method), values.detach().cpu().float())

        self._run_stage(f"influence-{method}", self.influence_key(method),
                        {self.influence_path(method): self._read_influence}, run)
        return self._read_influence(self.influence_path(method))

    def _read_influence(self, path: str) -> torch.Tensor:
        """I_val [n_train] float32, finite (the stage refuses to write anything else)."""
        values = _read_vector(path, "influence file", None, len(self.split().train))
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"influence file {path} is damaged: it holds NaN or inf")
        return values

    def _read_energies(self, path: str) -> torch.Tensor:
        """Training-set energies [1 + epochs run, n_train]: before fine-tuning and after each epoch."""
        return _read_vector(path, "energy file", (1, self.config.finetune_config().epochs + 1), len(self.split().train))

    def _read_finetune_info(self, path: str) -> dict:
        info = read_json(path, ("beta", "beta_effective", "beta_search", "history", "config"))
        if not (isinstance(info["beta"], (int, float)) and isinstance(info["beta_search"], list)):
            raise ValueError(f"{path} is damaged: beta must be a number and beta_search a list")
        return info

    # -- fine-tuning -----------------------------------------------------------------------------------------
    def finetune_key(self, method: str, variant: str) -> str:
        c = self.config
        ft = config_dict(c.finetune_config())
        if variant == "ce":
            ft.pop("energy_cap")
            return _key("finetune-ce", self.train_key(method), ft)
        return _key("finetune-iaerf", self.influence_key(method), ft, c.betas, c.select_metric)

    def finetune(self, method: str, variant: str) -> None:
        if variant not in ("ce", "iaerf"):
            raise ValueError(f"variant must be 'ce' (control) or 'iaerf', got {variant!r}")
        influence = self.influence(method) if variant == "iaerf" else None
        self.train(method)
        info_path = self.path("finetune", f"{method}-{variant}.json")
        energy_path = self.path("finetune", f"{method}-{variant}-energy.pt")

        def run():
            c, split = self.config, self.split()
            base = self.model(method)
            cfg = c.finetune_config(record_energy=True)
            if variant == "ce":
                result, table = finetune(base, split.train, None, beta=0.0, config=cfg, device=self.device,
                                         progress=self.progress), []
            else:
                _, result, table = select_beta(base, split.train, self.val(), influence, betas=c.betas, config=cfg,
                                               metric=c.select_metric, device=self.device, progress=self.progress)
            energies = torch.stack(result.energies) if result.energies else torch.empty(0)
            save_tensors(energy_path, energies)
            save_checkpoint(self.checkpoint(method, variant), result.model, self.arch(method),
                            {"method": method, "variant": variant, "beta": result.beta})
            write_json(info_path, {"beta": result.beta, "beta_effective": result.beta_effective,
                                   "beta_search": table, "history": result.history,
                                   "config": config_dict(cfg)})

        self._run_stage(f"finetune-{method}-{variant}", self.finetune_key(method, variant),
                        {self.checkpoint(method, variant): self._checkpoint_check(method),
                         info_path: self._read_finetune_info, energy_path: self._read_energies}, run)

    def finetune_info(self, method: str, variant: str = "iaerf") -> dict:
        """``finetune/<method>-<variant>.json`` (run :meth:`finetune` first): beta, beta search table, history."""
        return self._read_finetune_info(self.path("finetune", f"{method}-{variant}.json"))

    # -- evaluation ------------------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str | None]]:
        """(label, method, variant) for every model of the table."""
        names = {"erm": "ERM", "ldam_drw": "LDAM-DRW", "crt": "cRT", "lws": "LWS"}
        out = []
        for m in self.config.methods:
            out += [(names[m], m, None), (f"{names[m]} + CE fine-tuning", m, "ce"), (f"{names[m]} + IAERF", m, "iaerf")]
        return out

    def evaluate(self) -> dict:
        for _, m, v in self.rows():
            if v is None:
                self.train(m)
            else:
                self.finetune(m, v)
        keys = [self.train_key(m) if v is None else self.finetune_key(m, v) for _, m, v in self.rows()]

        def run():
            split = self.split()
            results = []
            for label, m, v in self.rows():
                ev = evaluate(self.model(m, v), split.test, split.counts(), split.shot_groups, device=self.device)
                row = {"model": label, "method": m, "variant": v or "baseline", **ev}
                if v == "iaerf":
                    row["beta"] = self.finetune_info(m)["beta"]
                results.append(row)
            metrics = {"dataset": split.describe(), "settings": self.config.to_json(), "results": results}
            write_json(self.path("metrics.json"), metrics)
            table = format_table(results)
            write_text(self.path("table.md"), table + "\n")

        self._run_stage("evaluate", _key("evaluate", keys),
                        {self.path("metrics.json"): self._read_metrics, self.path("table.md"): _read_table}, run)
        return self._read_metrics(self.path("metrics.json"))

    def _read_metrics(self, path: str) -> dict:
        metrics = read_json(path, ("dataset", "settings", "results"))
        results, dataset = metrics["results"], metrics["dataset"]
        if not (isinstance(dataset, dict) and "name" in dataset and "shot_groups" in dataset):
            raise ValueError(f"{path} is damaged: 'dataset' must describe the data set (name, shot_groups)")
        row_keys = ("model", "method", "variant", "error", "many_error", "medium_error", "few_error")
        if not (isinstance(results, list) and len(results) == len(self.rows())
                and all(isinstance(r, dict) and all(k in r for k in row_keys) for r in results)):
            raise ValueError(f"{path} is damaged: 'results' must hold one row {list(row_keys)} per model "
                             f"({len(self.rows())})")
        return metrics

    # -- plots -----------------------------------------------------------------------------------------------
    def plots(self, fig1: bool | None = None) -> list[str]:
        from iaerf import plots as P

        fig1 = self.config.fig1 if fig1 is None else fig1
        split = self.split()
        made = []
        for m in self.config.methods:
            influence = self.influence(m)
            outputs = [self.path("plots", f"fig{i}_{m}.png") for i in (2, 3, 5)]
            self.finetune(m, "iaerf")

            def run(m=m, influence=influence, outputs=outputs):
                model = self.model(m)
                P.fig2_influence_vs_energy_loss(model, split.train, influence, outputs[0], device=self.device)
                P.fig3_class_influence(influence, split.train.labels, split.num_classes, outputs[1])
                energies = self._read_energies(self.path("finetune", f"{m}-iaerf-energy.pt"))
                P.fig5_energy_distribution(energies, outputs[2])

            self._run_stage(f"plots-{m}", _key("plots", self.finetune_key(m, "iaerf")),
                            dict.fromkeys(outputs, _check_png), run)
            made += outputs
            if fig1:
                out1 = self.path("plots", f"fig1_{m}.png")

                def run1(m=m, influence=influence, out1=out1):
                    P.fig1_predicted_vs_actual(self.model(m), split.train, self.val(), influence, out1,
                                               params=self.config.influence_params, points=self.config.fig1_points,
                                               seed=self.config.seed, progress=self.progress)

                self._run_stage(f"fig1-{m}", _key("fig1", self.influence_key(m), self.config.fig1_points),
                                {out1: _check_png}, run1)
                made.append(out1)
        return made

    def run_all(self) -> dict:
        self.data()
        metrics = self.evaluate()
        self.plots()
        return metrics


def format_table(results: list[dict]) -> str:
    """Markdown table of test error (%) overall and per shot group."""
    lines = ["| model | error | many | medium | few | beta |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        beta = f"{r['beta']:g}" if r.get("beta") is not None else ""
        lines.append(f"| {r['model']} | {r['error']:.2f} | {_fmt(r['many_error'])} | {_fmt(r['medium_error'])} | "
                     f"{_fmt(r['few_error'])} | {beta} |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
