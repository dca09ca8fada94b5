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

Resume: a stage is skipped when its marker holds the same key and its outputs exist. A key hashes the stage's own
settings and its upstream keys, so changing e.g. the damping re-runs influence, fine-tuning and evaluation but not
training. Every file is written to a temporary file in the same folder and moved into place with ``os.replace``,
so an interrupted run never leaves a half-written output, and earlier outputs stay intact.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from iaerf import data as D
from iaerf._io import atomic_write, write_text
from iaerf.finetuning import (BETAS, FinetuneConfig, cifar_finetune_config, classifier_retrain_config, config_dict,
                            finetune, select_beta)
from iaerf.models import build_model
from iaerf.training import (ClassifierConfig, TrainConfig, cifar_config, digits_config, evaluate, resolve_device,
                            retrain_classifier, train_baseline)

__all__ = ["PipelineConfig", "Pipeline", "save_checkpoint", "load_checkpoint", "classifier_head"]

CHECKPOINT_FORMAT = "iaerf-checkpoint-1"
BASE_METHODS = ("erm", "ldam_drw")
DERIVED_METHODS = ("crt", "lws")  # classifier re-training on the frozen ERM backbone


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
        if self.dataset not in ("digits", "cifar10", "cifar100", "features"):
            raise ValueError(f"dataset must be digits, cifar10, cifar100 or features, got {self.dataset!r}")
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise ValueError(f"ratio must be >= 1, got {self.ratio!r}")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in BASE_METHODS + DERIVED_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {BASE_METHODS + DERIVED_METHODS}, got {self.methods}")
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("influence_params", "finetune_params"):
            value = getattr(self, name)
            if value is not None and value != "auto":
                setattr(self, name, tuple(value))
        for name, allowed in (("imbalance", ("exp", "step")), ("solver", ("exact", "cg", "lissa")),
                              ("select_metric", ("loss", "error"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.betas or any(not (b > 0 and math.isfinite(b)) for b in self.betas):
            raise ValueError(f"betas must be positive finite numbers, got {self.betas}")
        if self.heldout_val and self.dataset != "digits":
            raise ValueError("heldout_val (a validation set disjoint from the training set) is only built for digits")
        if self.heldout_val < 0:
            raise ValueError(f"heldout_val must be >= 0, got {self.heldout_val}")
        if self.dataset == "features" and not (self.train_features and self.test_features):
            raise ValueError("dataset='features' needs train_features and test_features file paths")
        if self.dataset.startswith("cifar") and not self.data_root:
            raise ValueError(f"dataset={self.dataset!r} needs data_root (the folder holding the CIFAR pickles)")
        FinetuneConfig(**self._finetune_kwargs())  # validate early, before any stage runs

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"settings.json has unknown keys {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# files


def write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    atomic_write(path, w)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def save_checkpoint(path: str, model: torch.nn.Module, arch: dict, meta: dict | None = None) -> None:
    """Save ``{"format", "arch": {"name", "num_classes", **kwargs}, "state_dict", "meta"}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, "arch": arch, "state_dict": state,
                                               "meta": meta or {}}, tmp))


def load_checkpoint(path: str, expect_arch: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved by :func:`save_checkpoint`. Raises a ValueError for a corrupt file, a file that is not
    an iaerf checkpoint, or one whose architecture / class count differs from ``expect_arch``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an iaerf checkpoint (format {CHECKPOINT_FORMAT})")
    arch = dict(obj["arch"])
    if expect_arch is not None and arch != expect_arch:
        raise ValueError(f"checkpoint {path} does not match this run: it holds {arch}, expected {expect_arch}")
    kwargs = {k: v for k, v in arch.items() if k not in ("name", "num_classes")}
    model = build_model(arch["name"], arch["num_classes"], **kwargs)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit model {arch['name']}: {exc}") from exc
    return model.eval(), obj.get("meta", {})


@torch.no_grad()
def classifier_head(model: torch.nn.Module, *datasets: D.TensorDataset, device=None):
    """``(head, *feature_datasets)``: the model's ``fc`` as a :class:`~iaerf.models.LinearClassifier` and every
    dataset mapped to its eval-mode features [n, D].

    Classifier-only influence (``params=["fc"]``) depends on the rest of the network only through these frozen
    features, so computing it on the head gives the same numbers while every Hessian-vector product skips the
    backbone -- which matters for a cosine (NormedLinear) fc, where no closed-form linear-head path applies.
    """
    from iaerf.models import LinearClassifier, NormedLinear

    fc = model.fc
    normed = isinstance(fc, NormedLinear)
    head = LinearClassifier(fc.in_features, fc.out_features, normed_fc=normed,
                            **({"scale": fc.scale} if normed else {}))
    head.fc.load_state_dict(fc.state_dict())
    head = head.to(device if device is not None else fc.weight.device).eval()
    was_training = model.training
    model.eval()
    out = []
    for ds in datasets:
        x = ds.tensors()[0]
        dev = fc.weight.device
        feats = torch.cat([model.features(x[s:s + 512].to(dev)).cpu() for s in range(0, len(ds), 512)])
        out.append(D.TensorDataset(feats, ds.labels, ds.num_classes))
    model.train(was_training)
    return (head, *out)


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


class Pipeline:
    """Stages of one run in ``out``. Each public method runs its stage (or skips it when already done)."""

    def __init__(self, out: str, config: PipelineConfig | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print):
        self.out = os.path.abspath(out)
        self.progress = progress
        self.log = log
        settings_path = os.path.join(self.out, "settings.json")
        if config is None:
            if not os.path.isfile(settings_path):
                raise FileNotFoundError(f"{settings_path} not found: start the run with `iaerf data` or `iaerf demo`")
            config = PipelineConfig.from_json(read_json(settings_path))
        self.config = config
        os.makedirs(self.out, exist_ok=True)
        write_json(settings_path, config.to_json())
        self.device = resolve_device(config.device)
        self._split = None
        self._reported: set[str] = set()  # stages already logged as skipped (they are checked many times)

    # -- helpers ---------------------------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _done(self, stage: str, key: str, outputs: list[str]) -> bool:
        marker = self.path("stages", f"{stage}.json")
        if not os.path.isfile(marker) or not all(os.path.isfile(p) for p in outputs):
            return False
        try:
            return read_json(marker).get("key") == key
        except (OSError, ValueError):
            return False

    def _mark(self, stage: str, key: str, seconds: float) -> None:
        write_json(self.path("stages", f"{stage}.json"), {"key": key, "seconds": seconds})

    def _run_stage(self, stage: str, key: str, outputs: list[str], fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless done; returns True when it ran."""
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

        self._run_stage("data", self.data_key(), [self.path("data.json")], run)
        return read_json(self.path("data.json"))

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

        self._run_stage(f"train-{method}", self.train_key(method), [self.checkpoint(method)], run)

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
            atomic_write(self.influence_path(method), lambda tmp: torch.save(values.detach().cpu().float(), tmp))

        self._run_stage(f"influence-{method}", self.influence_key(method), [self.influence_path(method)], run)
        return torch.load(self.influence_path(method), weights_only=True)

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
            atomic_write(self.path("finetune", f"{method}-{variant}-energy.pt"), lambda tmp: torch.save(energies, tmp))
            save_checkpoint(self.checkpoint(method, variant), result.model, self.arch(method),
                            {"method": method, "variant": variant, "beta": result.beta})
            write_json(info_path, {"beta": result.beta, "beta_effective": result.beta_effective,
                                   "beta_search": table, "history": result.history,
                                   "config": config_dict(cfg)})

        self._run_stage(f"finetune-{method}-{variant}", self.finetune_key(method, variant),
                        [self.checkpoint(method, variant), info_path], run)

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
                    row["beta"] = read_json(self.path("finetune", f"{m}-iaerf.json"))["beta"]
                results.append(row)
            metrics = {"dataset": split.describe(), "settings": self.config.to_json(), "results": results}
            write_json(self.path("metrics.json"), metrics)
            table = format_table(results)
            write_text(self.path("table.md"), table + "\n")

        self._run_stage("evaluate", _key("evaluate", keys), [self.path("metrics.json"), self.path("table.md")], run)
        return read_json(self.path("metrics.json"))

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
                energies = torch.load(self.path("finetune", f"{m}-iaerf-energy.pt"), weights_only=True)
                P.fig5_energy_distribution(energies, outputs[2])

            self._run_stage(f"plots-{m}", _key("plots", self.finetune_key(m, "iaerf")), outputs, run)
            made += outputs
            if fig1:
                out1 = self.path("plots", f"fig1_{m}.png")

                def run1(m=m, influence=influence, out1=out1):
                    P.fig1_predicted_vs_actual(self.model(m), split.train, self.val(), influence, out1,
                                               params=self.config.influence_params, points=self.config.fig1_points,
                                               seed=self.config.seed, progress=self.progress)

                self._run_stage(f"fig1-{m}", _key("fig1", self.influence_key(m), self.config.fig1_points), [out1], run1)
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
