"""One run directory: :class:`Pipeline`, the run's context (:class:`~iaerf.longtail.pipeline.context.RunContext`: settings,
split, device, files) that also holds the directory's lock and runs the stages with resume.

A stage (:mod:`iaerf.longtail.pipeline.stages`) is done when its marker ``stages/<name>.json`` holds the stage's key (its
settings) and the SHA-256 of every output it wrote and of every input it read -- the outputs of every stage upstream
of it and the user's data files -- and every one of those digests still matches the file on disk, and the outputs
pass their readers' checks. Anything else runs the stage again: a changed setting; a changed input (the log line
names it); an output changed or damaged since its stage wrote it (a :class:`DamagedOutputWarning` names it). The
marker is removed before a stage writes anything and written last, so a stage stopped at any point is not done.

Every file is written to a temporary file in the same folder and moved into place, so an interrupted run never
leaves a half-written output. One Pipeline at a time writes a run directory (an OS lock on ``<run>/.lock``, else
:class:`RunLockedError`), and every stage computes with the run's own thread count (``PipelineConfig.threads``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import gc
import os
import shutil
import time
import warnings
import weakref
from typing import Callable

import torch

from iaerf.core.identity import file_digest
from iaerf.core.io import ensure_writable_dir, read_json, write_json
from iaerf.longtail.pipeline import stages as S
from iaerf.longtail.pipeline.context import RunContext
from iaerf.longtail.pipeline.files import build_from_arch, read_settings
from iaerf.longtail.pipeline.settings import PipelineConfig, SettingError, setting_fields

__all__ = ["Pipeline", "DamagedOutputWarning", "RunLockedError", "fork_run"]

LOCK_FILE = ".lock"


class DamagedOutputWarning(UserWarning):
    """A stage's output file was unreadable, held the wrong content, or differs from what its stage wrote; the
    stage runs again."""


class RunLockedError(RuntimeError):
    """Another Pipeline (in another process, or still open in this one) is writing the run directory."""


class Pipeline(RunContext):
    """The run in ``out``: each public method runs its stage and the stages it needs (or skips those already done)
    and returns what the stage wrote; as the stages' :class:`RunContext`, it gives its split, validation set,
    models and file paths too.

    ``methods``: methods the caller will run besides ``config.baselines.methods`` (their settings are checked too).
    Every setting is checked here, before any stage runs and before ``settings.json`` is written, so a bad setting
    neither costs a stage nor ends up stored for the next command. ``config.threads`` None is resolved here (the
    stored count, else torch's) and stored.

    The Pipeline holds the run directory's lock from construction until :meth:`close` (or the end of a ``with``
    block, or its collection): a second Pipeline on the same directory meanwhile raises :class:`RunLockedError`
    naming the holder's process id.
    """

    def __init__(self, out: str, config: PipelineConfig | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = print, methods: tuple[str, ...] = ()):
        settings_path = os.path.join(os.path.abspath(out), "settings.json")
        if config is None:
            if not os.path.isfile(settings_path):
                raise FileNotFoundError(f"{settings_path} not found: start the run with `iaerf data` or `iaerf demo`")
            try:
                config = PipelineConfig.from_json(read_settings(settings_path))
            except SettingError as exc:
                raise SettingError(exc.field, f"{settings_path}: {exc}") from None
        self._lock = None
        super().__init__(out, _resolve_threads(config, settings_path), progress=progress, log=log)
        self._reported: set[str] = set()  # stages already logged as skipped (they are checked many times)
        self._checked: dict[str, tuple[int, int]] = {}  # output path -> (mtime_ns, size) when it last passed its check
        self._validate(tuple(methods))
        # closing the lock file releases the lock: at close(), or when this Pipeline is collected
        self._lock = weakref.finalize(self, _lock_run(self.out).close)
        try:
            _remove_leftovers(self.out)
            write_json(settings_path, self.config.to_json())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock; this Pipeline runs no stage after it (reading outputs still works)."""
        if self._lock is not None:
            self._lock()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self, methods: tuple[str, ...]) -> None:
        """Check what PipelineConfig cannot check alone (folders, data, parameter names; the device is checked by
        :class:`RunContext`).

        The data split is loaded here (the first stage needs it anyway) because whether every class keeps an image,
        and which parameter names exist, depend on it.
        """
        from iaerf.longtail.finetuning import trainable_parameters
        from iaerf.hessian.params import select_parameters

        c = self.config
        split = self.split()
        if c.data.dataset in ("digits", "cifar10", "cifar100"):  # the other sources' data is used as given
            counts = split.counts()
            empty = [k for k, n in enumerate(counts) if n < 1]
            if empty:
                raise SettingError("ratio", f"ratio {c.data.ratio:g} leaves classes {empty} with no training image; "
                                            f"every class must keep at least one, so the ratio must not exceed the "
                                            f"largest class's count n_max = {max(counts)}")
        train_params = self.finetune_config().train_params
        influence_params = self.param_names(c.influence.params)
        for method in dict.fromkeys(tuple(c.baselines.methods) + methods):
            with torch.random.fork_rng(devices=[]):  # building the skeleton must not move the seeded global RNG
                skeleton = build_from_arch(self.arch(method))
            try:
                if influence_params != "finetuned":  # else the fine-tuned selection, checked below
                    select_parameters(skeleton, list(influence_params) if influence_params is not None else None)
            except ValueError as exc:
                raise SettingError("influence_params", f"influence_params for the {method} model: {exc}") from None
            try:
                trainable_parameters(skeleton, train_params)
            except ValueError as exc:
                raise SettingError("finetune_params", f"finetune_params for the {method} model: {exc}") from None
            if S.exact_falls_back(self, skeleton, S.influence_selection(self, skeleton)) and not c.influence.gauss_newton:
                raise SettingError("gauss_newton", f"gauss_newton=False (--no-gauss-newton): the {method} model's "
                                                   f"influence parameters exceed the exact solve's max_exact_params, "
                                                   f"and its fallback, EK-FAC, approximates the Gauss-Newton matrix, "
                                                   f"not the Hessian; give --gauss-newton, or --solver cg / lissa for "
                                                   f"the Hessian itself")
        # last, because it creates the folders: a run that fails an earlier check leaves nothing behind
        ensure_writable_dir(self.out, "run directory")
        for sub in ("stages", "models", "influence", "finetune", "posthoc", "plots", "evaluation"):
            ensure_writable_dir(self.path(sub), f"run directory's {sub}/ folder")
        checkpoint = (c.influence.solver_options or {}).get("checkpoint_path")
        if checkpoint is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(checkpoint)), "folder of solver option checkpoint_path")

    # -- running stages --------------------------------------------------------------------------------------
    def ensure(self, stage: S.Stage) -> bool:
        """Run ``stage`` (after the stages it needs) unless it is done; returns True when it ran.

        Running, the stage's marker is removed first, the stage computes with the run's thread count, and the new
        marker -- key, run time, the SHA-256 of each output written and of each input read -- is written last."""
        for need in stage.needs:
            self.ensure(need)
        why = self._why_run(stage)
        if why is None:
            if stage.name not in self._reported:
                self.log(f"[iaerf] {stage.name}: done already, skipped")
                self._reported.add(stage.name)
            return False
        if not self._lock.alive:
            raise RuntimeError(f"this Pipeline on {self.out} is closed (it no longer holds the run directory's lock); "
                               f"open a new one to run the {stage.name} stage")
        if why:
            self.log(f"[iaerf] {stage.name}: running again: {why}")
        inputs = self._inputs(stage)
        marker = self._marker(stage)
        if os.path.lexists(marker):
            os.remove(marker)  # from here on the stage is not done, whatever it has written when it stops
        t0 = time.perf_counter()
        with _torch_threads(self.config.threads):
            stage.run()
        seconds = time.perf_counter() - t0
        # fresh: an output rewritten within one clock tick may show the stat stamp its previous version had
        outputs = {self._name(p): file_digest(p, fresh=True) for p in stage.outputs}
        write_json(marker, {"key": stage.key, "seconds": seconds, "outputs": outputs, "inputs": inputs})
        self._reported.add(stage.name)
        self.log(f"[iaerf] {stage.name}: {seconds:.1f}s")
        return True

    def _marker(self, stage: S.Stage) -> str:
        return self.path("stages", f"{stage.name}.json")

    def _name(self, path: str) -> str:
        """A run directory file's name in a marker: relative to the run, so the markers of a fork stay valid."""
        return os.path.relpath(path, self.out)

    def _why_run(self, stage: S.Stage) -> str | None:
        """None when ``stage`` is done (see the module docstring); else why it runs: the inputs that changed, or ""
        when there is nothing to log (no marker, other settings, a missing output, or damage, warned about)."""
        marker = self._marker(stage)
        if not os.path.isfile(marker):
            return ""
        try:
            record = _read_marker(marker)
        except ValueError as exc:
            self._damaged(stage.name, str(exc))
            return ""
        if record["key"] != stage.key:
            return ""
        expected = sorted(self._name(p) for p in stage.outputs)
        if sorted(record["outputs"]) != expected:
            self._damaged(stage.name, f"{marker} is damaged: it records the outputs {sorted(record['outputs'])}, "
                                      f"expected {expected}")
            return ""
        for path, check in stage.outputs.items():
            if not os.path.isfile(path):
                return ""
            wrote, now = record["outputs"][self._name(path)], file_digest(path)
            if now != wrote:
                self._damaged(stage.name, f"{path} is not the file the {stage.name} stage wrote (SHA-256 "
                                          f"{now[:12]}..., written {wrote[:12]}...): damaged or changed since")
                return ""
            if not self._intact(stage.name, path, check):
                return ""
        inputs, recorded = self._inputs(stage), record["inputs"]
        changed = sorted(name for name in set(inputs) | set(recorded) if inputs.get(name) != recorded.get(name))
        if changed:
            return f"{', '.join(changed)} changed since it last ran"
        return None

    def _inputs(self, stage: S.Stage) -> dict[str, str]:
        """The SHA-256 of everything ``stage`` depends on: the outputs of every stage it needs, directly or through
        them (by :meth:`_name`), and the user files any of these stages or ``stage`` reads (by absolute path)."""
        digests, seen, user_files = {}, set(), self.user_files()

        def visit(s: S.Stage, own: bool) -> None:
            if s.name in seen:
                return
            seen.add(s.name)
            digests.update((f, user_files[f]) for f in s.files)
            if not own:
                digests.update((self._name(p), file_digest(p)) for p in s.outputs)
            for need in s.needs:
                visit(need, False)

        visit(stage, True)
        return dict(sorted(digests.items()))

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
            self._damaged(stage, str(exc))
            return False
        self._checked[path] = stamp
        return True

    @staticmethod
    def _damaged(stage: str, message: str) -> None:
        warnings.warn(f"{message}; running the {stage} stage again", DamagedOutputWarning, stacklevel=4)

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
        return S.read_influence(self, self.influence_path(method))

    def finetune(self, method: str, variant: str) -> None:
        self.ensure(S.finetune_stage(self, method, variant))

    def finetune_info(self, method: str, variant: str = "iaerf") -> dict:
        """``finetune/<method>-<variant>.json`` (run :meth:`finetune` first): beta, beta search table (every
        candidate's validation gain interval), the selection, history."""
        return S.read_finetune_info(self.finetune_info_path(method, variant))

    def posthoc(self, method: str, variant: str | None = None) -> dict:
        """``posthoc/<method>[-<variant>].json``: the post-hoc taus of that model, chosen on validation."""
        self.ensure(S.posthoc_stage(self, method, variant))
        return S.read_posthoc(self.posthoc_path(method, variant))

    def evaluate(self) -> dict:
        """``metrics.json``: validation score and test error of every model of the table (each baseline, its CE
        control, IAERF and the rows of ``config.baselines.rows``), and the one that did best on validation."""
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
        return read_json(self.pbrf_path(method))

    def run_all(self) -> dict:
        self.data()
        metrics = self.evaluate()
        self.plots()
        return metrics


def fork_run(source: str, target: str) -> None:
    """Start run directory ``target`` from the finished stages of ``source``: every file but ``settings.json``, the
    lock file and temporary leftovers is hard-linked (copied where links are impossible). A :class:`Pipeline` on
    ``target`` with other settings then re-runs only the stages whose keys changed (markers name run files by their
    path in the run, so they hold in the fork). Sharing inodes is safe because stages never write a file in place
    (each write replaces the file with a new one)."""
    source, target = os.path.abspath(source), os.path.abspath(target)
    if not os.path.isfile(os.path.join(source, "settings.json")):
        raise FileNotFoundError(f"{source} is not a run directory (no settings.json)")
    # real paths: a target reached through a symlink into the source would copy the run into itself without end
    real_source, real_target = os.path.realpath(source), os.path.realpath(target)
    if os.path.commonpath([real_source, real_target]) == real_source:
        via = f" (through a link: it resolves to {real_target})" if real_target != target else ""
        raise ValueError(f"fork target {target} is inside the run directory {source} it would copy{via}")
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"fork target {target} exists and is not empty")

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def ignore(folder, names):
        top = ["settings.json", LOCK_FILE] if os.path.samefile(folder, source) else []
        return [n for n in names if n in top or n.startswith(_LEFTOVER)]

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True, ignore=ignore)


_LEFTOVER = ".tmp-"  # the prefix of iaerf.core.io's temporary files: one left behind is a write that was killed
_PROBE = ".tmp-write-check-"


def _resolve_threads(config: PipelineConfig, settings_path: str) -> PipelineConfig:
    """``config`` with a thread count: its own, else the one the run's ``settings.json`` stores, else (a new run)
    torch's count now."""
    if config.threads is not None:
        return config
    threads = None
    if os.path.isfile(settings_path):
        try:
            threads = setting_fields()["threads"].metadata["check"]("threads",
                                                                     read_settings(settings_path).get("threads"))
        except ValueError:
            pass  # a damaged settings file: the given config replaces it
    return dataclasses.replace(config, threads=threads or torch.get_num_threads())


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch computes with ``n`` CPU threads inside, with the caller's count again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flock(f) -> bool:
    """Take the exclusive lock of the open file ``f`` without waiting; False when another open file holds it."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_run(out: str):
    """Take the run directory's lock (``fcntl.flock`` on ``<out>/.lock``, which then holds this process id); returns
    the open lock file, whose closing (or the process's end, a kill included) releases it."""
    path = os.path.join(out, LOCK_FILE)
    f = open(path, "a+")
    try:
        locked = _flock(f)
        f.seek(0)
        if not locked and f.read().strip() == str(os.getpid()):
            # held in this process: perhaps by a Pipeline no longer referenced that only the cycle collector frees
            # (its stages' closures and tracebacks refer back to it); collecting it releases its lock
            gc.collect()
            locked = _flock(f)
        if not locked:
            f.seek(0)
            raise RunLockedError(f"run directory {out} is being written by process {f.read().strip() or '(starting)'}"
                                 f" (it holds {path}); wait for it to finish, or give another run directory")
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _remove_leftovers(out: str) -> None:
    """Delete the temporary files of writes that were killed (with the lock held, no write is under way). The
    writability probes of ``ensure_writable_dir`` are left alone: a second Pipeline makes them before it tries
    the lock, and removes them itself."""
    for folder, _, names in os.walk(out):
        for name in names:
            if name.startswith(_LEFTOVER) and not name.startswith(_PROBE):
                os.remove(os.path.join(folder, name))


def _read_marker(path: str) -> dict:
    """A stage marker: {"key", "seconds", "outputs": {name: sha256}, "inputs": {name: sha256}}; ValueError when
    damaged (or written by an iaerf that recorded no digests)."""
    record = read_json(path, ("key", "seconds", "outputs", "inputs"))
    if not (isinstance(record["key"], str) and all(
            isinstance(record[part], dict) and all(isinstance(v, str) for v in record[part].values())
            for part in ("outputs", "inputs"))):
        raise ValueError(f"{path} is damaged: expected a key and the digests of outputs and inputs")
    return record
