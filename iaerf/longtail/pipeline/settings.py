"""A run's settings: five small groups (data, baselines, influence, fine-tuning, figures) plus the seed and device.

Each field carries its own check and its command-line option in its metadata, so the ``iaerf`` command's options,
the checks and the stored ``settings.json`` all come from this one place. A group whose fields mirror a schedule
dataclass uses that dataclass's field names (:class:`BaselineSettings` ``epochs`` is
:class:`~iaerf.longtail.training.TrainConfig`'s, :class:`FineTuningSettings` ``epochs``, ``batch_size``, ``lr``,
``train_params``, ``energy_cap`` are :class:`~iaerf.longtail.finetuning.FinetuneConfig`'s), so field names repeat
across groups; each setting's flat name is its option's (``--finetune-lr`` -> ``finetune_lr``), unique across the
run. ``settings.json`` is one flat JSON object of those names, and :meth:`PipelineConfig.from_options` builds a
config from them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from iaerf.hessian import solver_names
from iaerf.influence.settings import InfluenceSettings
from iaerf.longtail.finetuning import BETAS, CAPS, SELECT_RULES, FinetuneConfig, cifar_finetune_config, classifier_retrain_config

__all__ = ["BASE_METHODS", "DERIVED_METHODS", "ROWS", "DataSettings", "BaselineSettings", "InfluenceStageSettings",
           "FineTuningSettings", "FigureSettings", "PipelineConfig", "SettingError", "SettingTypeError", "protocol_settings",
           "describe_protocol", "setting_fields"]

BASE_METHODS = ("erm", "ldam_drw")
DERIVED_METHODS = ("crt", "lws")  # classifier re-training on the frozen ERM backbone
# the table's rows beside each baseline, its CE control and IAERF (iaerf.longtail.pipeline.report.table_rows):
# posthoc: logit adjustment (tau on validation, and tau = 1) and tau-normalisation of the baseline model;
# la / cb: logit-adjusted / class-balanced loss fine-tuning on the control's schedule; iaerf-class: class-level
# IAERF; iaerf-la: IAERF on the logit-adjusted loss; iaerf-posthoc: IAERF's model + post-hoc logit adjustment
ROWS = ("posthoc", "la", "cb", "iaerf-class", "iaerf-la", "iaerf-posthoc")
DATASETS = ("digits", "cifar10", "cifar100", "features", "image_folder", "npz", "factory")
# the user's own data: used as given (no long tail drawn), and it may bring its own validation set
USER_SOURCES = ("image_folder", "npz", "factory")
SOLVERS = solver_names()  # the registered inverse-HVP solvers (iaerf.hessian.solvers)
VALIDATIONS = ("train_subset", "heldout")
IMAGE_MODELS = ("small_cnn", "convnet")  # networks a run can train on images of any channel count (iaerf.longtail.models)
PROTOCOLS = ("paper", "recommended")
# torch accepts any thread count but crashes (segfault) on very large ones; far above any machine's core count
MAX_THREADS = 1024
# far beyond any schedule (CIFAR's is 200 epochs), short of one that would never end
MAX_EPOCHS = 10_000


class SettingError(ValueError):
    """A run setting with a bad type, range or choice. ``field`` is the setting it concerns (the command line names
    the option that sets it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SettingTypeError(SettingError, TypeError):
    """A setting that names something of the wrong type: a factory returning other than what it must."""


# -- checks: each takes (name, value) and returns the value in its stored form, or raises SettingError -----------

def _choice(*allowed):
    def check(name, value):
        if not isinstance(value, str) or value not in allowed:
            raise SettingError(name, f"{name} must be one of {tuple(allowed)}, got {value!r}")
        return value
    return check


def _real(low: float, expected: str, *, strict: bool = False, optional: bool = False):
    """A finite int or float >= low (> low when strict); bools are not numbers here."""
    def check(name, value):
        if optional and value is None:
            return value
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (value > low if strict else value >= low))
        if not ok:
            raise SettingError(name, f"{name} must be {expected}, got {value!r}")
        return value
    return check


def _int(low: int, high: int | None = None, *, optional: bool = False):
    def check(name, value):
        if optional and value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise SettingError(name, f"{name} must be a whole number {bound}{' or None' if optional else ''}, "
                                     f"got {value!r}")
        return value
    return check


def _bool(name, value):
    if not isinstance(value, bool):
        raise SettingError(name, f"{name} must be true or false, got {value!r}")
    return value


def _path(name, value):
    if value is not None and not (isinstance(value, str) and value):
        raise SettingError(name, f"{name} must be a non-empty path string or None, got {value!r}")
    return value


def _names(kind=str, what: str = "names", *, optional: bool = False, keep: tuple = ()):
    """A non-empty list / tuple of ``kind`` values, stored as a tuple (a lone string is not a list of names);
    None when ``optional``; any value in ``keep`` as it is."""
    def check(name, value):
        if (optional and value is None) or value in keep:
            return value
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value \
                or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise SettingError(name, f"{name} must be a non-empty list of {what}, got {value!r}")
        return tuple(value)
    return check


def _methods(name, value):
    value = _names()(name, value)
    if any(m not in BASE_METHODS + DERIVED_METHODS for m in value):
        raise SettingError(name, f"methods must be a non-empty subset of {BASE_METHODS + DERIVED_METHODS}, "
                                 f"got {list(value)}")
    return value


def _rows(name, value):
    if value in ((), []):
        return ()
    value = _names()(name, value)
    unknown = [r for r in value if r not in ROWS]
    if unknown or len(set(value)) != len(value):
        raise SettingError(name, f"rows must be distinct names among {ROWS} (or none), got {list(value)}")
    return tuple(r for r in ROWS if r in value)  # one order, so equal sets are equal settings


def _betas(name, value):
    value = _names(kind=(int, float), what="finite numbers >= 0 (0: the CE control)")(name, value)
    for b in value:
        _real(0.0, "finite numbers >= 0 (0: the CE control)")(name, b)
    if not any(b > 0 for b in value):
        raise SettingError(name, f"betas must hold at least one beta > 0 (0 alone is the control), got {list(value)}")
    return tuple(float(b) for b in value)


def _options(name, value):
    if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        raise SettingError(name, f"solver_options must be a dict of option names, got {value!r}")
    return value


def _spec(name, value):
    """A ``"package.module:function"`` string (checked for form only: it is imported when the run opens)."""
    module, sep, attr = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (sep and module and attr and all(p.isidentifier() for p in module.split(".") + attr.split("."))):
        raise SettingError(name, f"{name} must be 'package.module:function' (a module on sys.path or in the current "
                                 f"directory, and the function in it), got {value!r}")
    return value


def _model(name, value):
    if value is None or (isinstance(value, str) and ":" in value):
        return value if value is None else _spec(name, value)
    if not isinstance(value, str) or value not in IMAGE_MODELS:
        raise SettingError(name, f"{name} must be one of {IMAGE_MODELS} or 'package.module:function', got {value!r}")
    return value


def _device(name, value):
    if value is not None and not isinstance(value, str):
        raise SettingError(name, f"device must be 'cpu', 'cuda', 'cuda:N' or None, got {value!r}")
    return value


# the ``preset`` of a setting that always overrides its schedule dataclass's value
ALWAYS_GIVEN = object()


def setting(default, check, option: str, help: str = "", *, cli: str = "value", type=str,
            words: dict | None = None, preset=ALWAYS_GIVEN, name: str | None = None):
    """A settings field set by ``option`` (``--finetune-lr``), whose flat name is ``name``, by default the option's
    (``finetune_lr``: ``settings.json``, :meth:`PipelineConfig.from_options`, :attr:`SettingError.field`).
    ``cli``: "value" (``--opt V``), "list" (``--opt V [V ...]``), "flag" (``--opt`` sets True) or "key_value"
    (repeatable ``--opt KEY=VALUE``); ``type`` converts each command-line value; ``words``: a list option given as
    this one word means the mapped value (``--influence-params all``); ``preset``: the value that leaves the
    dataset preset's value of the schedule dataclass field of the same name in place."""
    # defaults are immutable (None, numbers, strings, tuples), so one default object can serve every instance
    meta = {"check": check, "option": option, "name": name or option[2:].replace("-", "_"), "help": help, "cli": cli,
            "type": type, "words": words or {}, "preset": preset}
    return field(default=default, metadata=meta)


def _check_fields(obj) -> None:
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, f.metadata["check"](f.metadata["name"], getattr(obj, f.name)))


@dataclass
class DataSettings:
    """The imbalanced split. ``heldout_val = k > 0`` holds k images per class out of training (digits: before the
    long tail is drawn, so n_max shrinks by k; CIFAR and feature files: out of the long-tailed training set, so
    every class must have more than k); ``validation`` says which set drives the influence and the beta choice: "train_subset" (the
    paper's class-balanced subset of the training set), "heldout" (the held-out images), None = "heldout" when
    ``heldout_val`` holds images out, else "train_subset"."""

    dataset: str = setting("digits", _choice(*DATASETS), "--dataset", "digits | cifar10 | cifar100 | features | "
                           "image_folder | npz | factory (--data sets it)")
    data_root: str | None = setting(None, _path, "--data-root", "cifar: folder holding cifar-10-batches-py / "
                                    "cifar-100-python; image_folder: folder of train/<class>/*.png, test/<class>/..., "
                                    "optional val/<class>/...; npz: the .npz file of x_train y_train x_test y_test "
                                    "(x_val y_val)")
    factory: str | None = setting(None, lambda n, v: v if v is None else _spec(n, v), "--data",
                                  "your data: package.module:function returning {'train': ..., 'test': ..., "
                                  "optional 'val', 'num_classes', 'name'} (each set a TensorDataset, (inputs, labels) "
                                  "or a dataset of (input, label) items, read into memory); imported from sys.path "
                                  "and the current directory, called with no argument, or seed=<--seed> when it has a "
                                  "'seed' parameter; sets --dataset factory", name="data")
    train_features: str | None = setting(None, _path, "--train-features",
                                         "features+labels file (.pt/.npz/.safetensors) for dataset=features")
    test_features: str | None = setting(None, _path, "--test-features", "test features+labels file for dataset=features")
    imbalance: str = setting("exp", _choice("exp", "step"), "--imbalance", "exp (long-tailed) | step")
    ratio: float = setting(10.0, _real(1.0, "a finite number >= 1"), "--ratio", "imbalance ratio n_max / n_min (>= 1)",
                           type=float)
    heldout_val: int = setting(0, _int(0), "--heldout-val", "hold K images per class out of training as a "
                               "validation set (default 0: none)", type=int)
    validation: str | None = setting(None, lambda n, v: v if v is None else _choice(*VALIDATIONS)(n, v),
                                     "--validation", "set behind influence and beta choice: train_subset | heldout "
                                     "(default: heldout when --heldout-val > 0 or your data brings a val set, else "
                                     "train_subset)")
    image_size: int = setting(32, _int(1, 4096), "--image-size", "image_folder: every image is resized to this many "
                              "pixels a side (default 32)", type=int)

    def __post_init__(self):
        _check_fields(self)

    @property
    def validation_set(self) -> str:
        """The resolved ``validation``: "heldout" or "train_subset"."""
        return self.validation or ("heldout" if self.heldout_val else "train_subset")


@dataclass
class BaselineSettings:
    """Which baselines to train and for how long: ``epochs`` is :class:`~iaerf.longtail.training.TrainConfig`'s
    (None: the dataset preset, :func:`iaerf.longtail.training.digits_config` /
    :func:`iaerf.longtail.training.cifar_config`, whose milestones scale with it)."""

    methods: tuple[str, ...] = setting(BASE_METHODS, _methods, "--methods", "baselines: erm ldam_drw crt lws",
                                       cli="list")
    epochs: int | None = setting(None, _int(1, MAX_EPOCHS, optional=True), "--train-epochs",
                                 "baseline epochs (milestones scale with it)", type=int)
    model: str | None = setting(None, _model, "--model",
                                "network: small_cnn | convnet, or your own as package.module:function, called with "
                                "num_classes and returning an nn.Module whose final nn.Linear (any name) gives the "
                                "logits (default: the dataset's, small_cnn for digits, resnet32 for CIFAR, convnet "
                                "for other images [N, C, H, W], a linear classifier for features [N, D]; feature "
                                "files always use a linear classifier)")
    rows: tuple[str, ...] = setting(ROWS, _rows, "--rows", "table rows beside each baseline, its CE control and "
                                    "IAERF: posthoc la cb iaerf-class iaerf-la iaerf-posthoc (default: all; 'none': "
                                    "no more)", cli="list", words={"none": (), "all": ROWS})

    def __post_init__(self):
        _check_fields(self)


@dataclass
class InfluenceStageSettings:
    """The energy influence I_val (Eq. 9): over which parameters (None: all; ("fc",): the classifier, on frozen
    features; "finetuned": exactly the parameters the fine-tuning moves), which inverse-HVP solver with which
    options, damping, L2 term, Gauss-Newton or exact Hessian. The fields :class:`iaerf.InfluenceSettings` has carry
    its names; :meth:`PipelineConfig.influence_settings` builds that object from them."""

    params: tuple[str, ...] | None = setting(
        ("fc",), _names(optional=True, keep=("finetuned",)), "--influence-params",
        "parameter prefixes of the influence (default: fc); 'all' = every one; 'finetuned' = the parameters "
        "fine-tuning moves (scope matched)", cli="list", words={"all": None, "finetuned": "finetuned"})
    solver: str = setting("exact", _choice(*SOLVERS), "--solver", "inverse-HVP solver: exact | cg | lissa | kfac | ekfac "
                         "(exact over more than max_exact_params parameters falls back to ekfac)")
    solver_options: dict | None = setting(None, _options, "--solver-option",
                                          "inverse-HVP solver option, repeatable (LiSSA: depth=5000 repeats=10 "
                                          "batch_size=128 ...)", cli="key_value", name="solver_options")
    damping: float = setting(1e-3, _real(0.0, "a finite number >= 0"), "--damping", "Hessian damping", type=float)
    gauss_newton: bool = setting(True, _bool, "--gauss-newton", "use the Gauss-Newton matrix (positive "
                                 "semi-definite; the default) or, with --no-gauss-newton, the Hessian itself, which "
                                 "every solver refuses where H + damping I is not positive definite", cli="flag")
    weight_decay: float = setting(0.0, _real(0.0, "a finite number >= 0"), "--weight-decay", "L2 term of the Hessian",
                                  type=float)
    influence_loss: str = setting("own", _choice("own", "cross_entropy"), "--influence-loss",
                                  "training loss whose Hessian the influence uses: own (LDAM-DRW's for LDAM-DRW) | "
                                  "cross_entropy")

    def __post_init__(self):
        _check_fields(self)
        self._check_solver_options()

    def _check_solver_options(self) -> None:
        """The options must be ones the chosen solver accepts, with valid values (the solver's own check)."""
        from iaerf.hessian.solvers import make_options

        if self.solver_options is None:
            return
        try:
            make_options(self.solver, self.solver_options, {})
        except (TypeError, ValueError) as exc:
            raise SettingError("solver_options", f"solver_options {self.solver_options} for solver {self.solver!r}: "
                                                 f"{exc}") from None
        checkpoint = self.solver_options.get("checkpoint_path")
        if checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint):
            raise SettingError("solver_options", f"solver option checkpoint_path must be a file path, got {checkpoint!r}")


@dataclass
class FineTuningSettings:
    """Algorithm 1's fine-tuning and its beta search. ``epochs``, ``batch_size``, ``lr``, ``train_params`` and
    ``energy_cap`` are :class:`~iaerf.longtail.finetuning.FinetuneConfig`'s fields (:meth:`PipelineConfig.finetune_config`
    builds it); None / "auto" take the dataset preset (images: 5 epochs, batch 128, lr 1e-4, whole network; feature
    files: classifier re-training, 10 epochs, batch 512, lr 0.2, fc only); ``train_params``: None = every
    non-batch-norm parameter, or a tuple of parameter-name prefixes."""

    epochs: int | None = setting(None, _int(1, MAX_EPOCHS, optional=True), "--finetune-epochs",
                                 "fine-tuning epochs (paper: 5; feature files: 10)", type=int, preset=None)
    batch_size: int | None = setting(None, _int(1, optional=True), "--finetune-batch-size",
                                     "fine-tuning batch size (paper: 128; feature files: 512)", type=int, preset=None)
    lr: float | None = setting(None, _real(0.0, "a finite number > 0", strict=True, optional=True), "--finetune-lr",
                               "fine-tuning SGD lr (paper: 1e-4; feature files: 0.2)", type=float, preset=None)
    train_params: tuple[str, ...] | str | None = setting(
        "auto", _names(optional=True, keep=("auto",)), "--finetune-params",
        "parameter prefixes to fine-tune; 'all' = all but batch norm; default 'auto' = all for images, fc for "
        "feature files", cli="list", words={"all": None, "auto": "auto"}, preset="auto")
    energy_cap: str = setting("none", _choice(*CAPS), "--energy-cap", "App. B rule: none | per_sample | global")
    betas: tuple[float, ...] = setting(BETAS, _betas, "--betas", "beta grid (paper: 0.1 0.5 1 10)", cli="list",
                                       type=float)
    select_metric: str = setting("loss", _choice("loss", "error"), "--select-metric",
                                 "validation metric that picks beta and tau: loss | error")
    select_rule: str = setting("noise_aware", _choice(*SELECT_RULES), "--select-rule",
                               "how beta and tau are chosen on validation: noise_aware (a candidate replaces the "
                               "control only when the paired-bootstrap interval of its gain lies above 0; the grid "
                               "grows while its largest value wins) | lowest (the paper's: the lowest validation "
                               "metric of the grid)")

    def __post_init__(self):
        _check_fields(self)


@dataclass
class FigureSettings:
    """Fig. 1 (predicted vs actual, one fine-tuning per plotted point) is off by default."""

    fig1: bool = setting(False, _bool, "--fig1", "also Fig. 1 (fine-tunes once per plotted point)", cli="flag")
    fig1_points: int = setting(20, _int(1), "--fig1-points", "training points in Fig. 1", type=int)
    pbrf_points: int = setting(30, _int(2), "--pbrf-points", "training points of `iaerf evaluate-influence` (a third "
                               "the largest |I|, the rest drawn at random)", type=int)

    def __post_init__(self):
        _check_fields(self)


_GROUPS = {"data": DataSettings, "baselines": BaselineSettings, "influence": InfluenceStageSettings,
           "fine_tuning": FineTuningSettings, "figures": FigureSettings}


@dataclass
class PipelineConfig:
    """Everything a run depends on: the five groups, the seed (data split, initialisation, batch order), the
    device ("cpu", "cuda", "cuda:N"; None: CUDA when available) and the torch CPU thread count every stage of the
    run computes with (None: the count the run directory's settings.json stores, or for a new run torch's count
    at that moment; :class:`~iaerf.longtail.pipeline.Pipeline` resolves it and stores the number). Build one from flat
    setting names with :meth:`from_options` (``PipelineConfig.from_options(dataset="digits", damping=1e-2)``)."""

    data: DataSettings = field(default_factory=DataSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    influence: InfluenceStageSettings = field(default_factory=InfluenceStageSettings)
    fine_tuning: FineTuningSettings = field(default_factory=FineTuningSettings)
    figures: FigureSettings = field(default_factory=FigureSettings)
    protocol: str | None = setting(None, lambda n, v: v if v is None else _choice(*PROTOCOLS)(n, v), "--protocol",
                                   "preset of the validation, beta, App. B and scope settings: paper | recommended | none (iaerf demo: "
                                   "recommended unless given) "
                                   "(iaerf.longtail.pipeline.settings.protocol_settings); options given with it still win")
    seed: int = setting(0, _int(0, 2**32 - 1), "--seed", "seed of data split, initialisation, batches", type=int)
    device: str | None = setting(None, _device, "--device", "cpu | cuda (default: cuda when available)")
    threads: int | None = setting(None, _int(1, MAX_THREADS, optional=True), "--threads",
                                  f"torch CPU threads of every stage of the run, 1..{MAX_THREADS} (default: torch's "
                                  "count when the run starts; demo: 1, fastest for its tiny model); the count "
                                  "changes float sums, so changing it re-runs every stage but data", type=int)

    def __post_init__(self):
        for name, cls in _GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise SettingError(name, f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        for f in _settings_of(self):
            setattr(self, f.name, f.metadata["check"](f.metadata["name"], getattr(self, f.name)))
        d = self.data
        if d.validation == "heldout" and not d.heldout_val and d.dataset not in USER_SOURCES:
            # the user's data may bring its own validation set: checked when it is read
            raise SettingError("validation", "validation='heldout' needs heldout_val > 0 images per class held out")
        if (d.dataset == "factory") != (d.factory is not None):
            raise SettingError("data", "dataset='factory' needs data (--data package.module:function)"
                               if d.factory is None else f"data={d.factory!r} needs dataset='factory', got "
                                                         f"dataset={d.dataset!r}")
        if d.dataset in ("image_folder", "npz") and not d.data_root:
            raise SettingError("data_root", f"dataset={d.dataset!r} needs data_root (the "
                                            f"{'image folder' if d.dataset == 'image_folder' else '.npz file'})")
        if d.dataset == "features" and not (d.train_features and d.test_features):
            raise SettingError("train_features", "dataset='features' needs train_features and test_features file paths")
        if d.dataset == "features" and self.baselines.model is not None:
            raise SettingError("model", f"model={self.baselines.model!r} is for image data; dataset='features' trains "
                                        "a linear classifier on the given features")
        if d.dataset.startswith("cifar") and not d.data_root:
            raise SettingError("data_root", f"dataset={d.dataset!r} needs data_root (the folder holding the CIFAR "
                                            "pickles)")
        self.finetune_config()  # FinetuneConfig's own checks of the combination

    def finetune_config(self, record_energy: bool = False) -> FinetuneConfig:
        """The fine-tuning schedule: the dataset's preset, with every field of ``fine_tuning`` that FinetuneConfig
        has (same name) and that is not its ``preset`` value, and the run's seed."""
        preset = classifier_retrain_config() if self.data.dataset == "features" else cifar_finetune_config()
        own = {f.name for f in dataclasses.fields(FinetuneConfig)}
        given = {f.name: getattr(self.fine_tuning, f.name) for f in dataclasses.fields(self.fine_tuning)
                 if f.name in own and getattr(self.fine_tuning, f.name) != f.metadata["preset"]}
        return dataclasses.replace(preset, **given, seed=self.seed, record_energy=record_energy)

    def influence_settings(self, **resolved) -> InfluenceSettings:
        """The :class:`iaerf.InfluenceSettings` of the influence stage: every field of ``influence`` that it has (same
        name), the run's seed, and ``resolved`` (what the stage works out: the parameter selection, the task, a
        solver fallback) in their place."""
        own = {f.name for f in dataclasses.fields(InfluenceSettings) if f.init}
        given = {f.name: getattr(self.influence, f.name) for f in dataclasses.fields(self.influence) if f.name in own}
        return InfluenceSettings(**{**given, "seed": self.seed, **resolved})

    @classmethod
    def from_options(cls, **options) -> "PipelineConfig":
        """A config from flat setting names (those of ``settings.json`` and, with dashes, of the command line);
        every name not given keeps its default. An unknown name is a ValueError listing the known ones."""
        unknown = sorted(set(options) - set(setting_fields()))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(setting_fields())}")
        if options.get("data") is not None and "dataset" not in options:
            options = {**options, "dataset": "factory"}  # a data factory names the source
        if options.get("protocol") is not None:
            options = {**protocol_settings(options["protocol"], options.get("dataset", "digits")), **options}
        groups = {name: group(**_given(group, options)) for name, group in _GROUPS.items()}
        return cls(**groups, **_given(cls, options))

    def to_json(self) -> dict:
        """The flat settings (``settings.json``): tuples as lists."""
        out = {}
        for holder in [getattr(self, g) for g in _GROUPS] + [self]:
            for f in _settings_of(holder):
                value = getattr(holder, f.name)
                out[f.metadata["name"]] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, d: dict) -> "PipelineConfig":
        if not isinstance(d, dict):
            raise ValueError(f"settings must be a JSON object of PipelineConfig fields, got {type(d).__name__}")
        unknown = sorted(set(d) - set(setting_fields()))
        if unknown:
            raise ValueError(f"settings.json has unknown keys {unknown}")
        return cls.from_options(**d)


def protocol_settings(name: str, dataset: str) -> dict:
    """The flat settings protocol ``name`` sets for ``dataset``. Named protocols are presets of the settings that
    decide what Algorithm 1 is compared on:

    - ``paper``: the paper as written. Validation = the class-balanced subset of the *training* set, beta from
      {0.1, 0.5, 1, 10} chosen on it by the lowest validation loss (``select_rule="lowest"``), App. B's rule in its per-sample reading, the paper's fine-tuning schedule (images:
      whole network, 5 epochs, lr 1e-4, batch 128; feature files: classifier re-training), and the influence over the
      parameters that fine-tuning moves (images: the whole network but batch norm, Gauss-Newton + CG, the stable stand-in
      for the paper's LiSSA on a non-convex network; feature files: the classifier).
    - ``recommended``: what the measurements here support for a practitioner. A validation set held out of training
      (12 images per class for digits, 10 otherwise), beta = 0 (the control itself) among the candidates and the
      noise-aware rule (``select_rule="noise_aware"``: a beta replaces the control only when its validation gain clears
      the validation set's noise), so the choice is never worse than the control on validation, and influence scope = fine-tuned scope = the classifier (exact
      solve on the frozen features). The energy term is left unbounded (``energy_cap="none"``): with 0 among the betas,
      a beta whose energy term hurts loses on validation instead of being clipped to the control's behaviour.

    Any option given with a protocol replaces its preset value.
    """
    if name not in PROTOCOLS:
        raise SettingError("protocol", f"protocol must be one of {PROTOCOLS}, got {name!r}")
    features = dataset == "features"
    if name == "paper":
        out = dict(heldout_val=0, validation="train_subset", betas=(0.1, 0.5, 1.0, 10.0), energy_cap="per_sample",
                   select_rule="lowest", finetune_epochs=None, finetune_batch_size=None, finetune_lr=None, finetune_params="auto",
                   influence_params="finetuned")
        if not features:
            out.update(gauss_newton=True, solver="cg", solver_options=None)
        return out
    return dict(heldout_val=12 if dataset == "digits" else 10, validation="heldout", betas=(0.0, 0.1, 0.5, 1.0, 10.0),
                select_rule="noise_aware", energy_cap="none", finetune_params=("fc",), influence_params="finetuned",
                solver="exact", solver_options=None)


def describe_protocol(config: "PipelineConfig") -> str:
    """One line on what a run compares on: its protocol (or none) and the settings that decide the choices, read
    from ``config`` itself (options given with a protocol included)."""
    d, f = config.data, config.fine_tuning
    head = f"protocol {config.protocol}" if config.protocol else "no protocol (the settings as given)"
    val = (f"validation held out of training ({d.heldout_val} images per class)" if d.validation_set == "heldout"
           else "validation = a class-balanced subset of the training set")
    betas = " ".join(f"{b:g}" for b in f.betas)
    rule = (f"beta from {betas}, the CE control (beta 0) kept unless a beta's validation gain clears the validation "
            f"noise (paired bootstrap; the grid grows x10 while its largest beta wins)"
            if f.select_rule == "noise_aware" else f"beta from {betas} by the lowest validation {f.select_metric}")
    scope = config.finetune_config().train_params
    scope = "the whole network but batch norm" if scope is None else " ".join(scope)
    return f"{head}: {val}; {rule}; fine-tuning {scope}, App. B cap {f.energy_cap}"


def _settings_of(holder) -> list[dataclasses.Field]:
    """The setting fields of a group or of :class:`PipelineConfig` (whose groups are not settings themselves)."""
    return [f for f in dataclasses.fields(holder) if "name" in f.metadata]


def _given(cls, options: dict) -> dict:
    """The fields of ``cls`` among the flat ``options``, by field name."""
    return {f.name: options[f.metadata["name"]] for f in _settings_of(cls) if f.metadata["name"] in options}


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every flat setting name -> its dataclass field (metadata: check, option, name, help, cli, type, words,
    preset), in option order."""
    return {f.metadata["name"]: f for cls in list(_GROUPS.values()) + [PipelineConfig] for f in _settings_of(cls)}
