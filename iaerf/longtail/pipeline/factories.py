"""The user's own data and networks in a run: ``--data package.module:function`` and ``--model
package.module:function`` (:class:`~iaerf.longtail.pipeline.settings.DataSettings` ``factory``,
:class:`~iaerf.longtail.pipeline.settings.BaselineSettings` ``model``).

The module is imported from ``sys.path`` and, after it, the current directory. A data factory is called with no
argument, or with ``seed=`` the run's seed when it has a parameter named ``seed``, and returns a mapping: "train" and
"test" (and optionally "val", the held-out validation set), each any data iaerf's data contract accepts
(:func:`iaerf.longtail.data.read_tensor_dataset`), and optionally "num_classes" and "name". A model factory is called
as ``function(num_classes)`` and returns an ``nn.Module`` mapping an input batch to logits ``[b, num_classes]``
through a final ``nn.Linear`` (any name).

What the cache keys hold: for data, the content digest of what the factory returned (not its name); for a network,
the factory's :func:`~iaerf.core.identity.callable_identity` (its code and what it reads), that of the methods of
every class of the network defined outside torch, and the :func:`~iaerf.core.identity.state_digest` of a freshly
built network under the run's seed. Editing either therefore re-runs the stages that depend on it.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from iaerf.core.identity import callable_identity, state_digest
from iaerf.longtail import data as D
from iaerf.longtail.pipeline.settings import SettingError, SettingTypeError

__all__ = ["import_factory", "data_from_factory", "model_from_factory", "model_identity", "DATA_KEYS"]

DATA_KEYS = ("train", "test", "val", "num_classes", "name")


def import_factory(spec: str, field: str) -> Callable:
    """The function ``spec`` (``"package.module:function"``) names, for setting ``field`` ("data" or "model", whose
    option the errors name). The module is looked up on ``sys.path`` and then in the current directory."""
    option = f"--{field}"
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after the installed packages: a local file never shadows one of them
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while it runs
        raise SettingError(field, f"{option} {spec}: module {module_name!r} does not import "
                                  f"({type(exc).__name__}: {exc}); it is looked up on sys.path and in the current "
                                  f"directory {cwd}") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SettingError(field, f"{option} {spec}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                      f"has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SettingTypeError(field, f"{option} {spec}: {attr!r} is a {type(target).__name__}, not a function")
    return target


def _call(fn: Callable, spec: str, field: str, *args, **kwargs):
    """``fn(*args, **kwargs)``; whatever the user's factory raises becomes a SettingError naming its option (the
    original chained, for its traceback)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise SettingError(field, f"--{field} {spec}: the factory raised {type(exc).__name__}: {exc}") from exc


def _takes_seed(fn: Callable) -> bool:
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def data_from_factory(spec: str, seed: int) -> tuple[D.ImbalancedSplit, str]:
    """``(split, digest)``: what the data factory ``spec`` returns, read once into TensorDatasets and made a split
    by :func:`iaerf.longtail.data.user_split` (used as given), and the SHA-256 of that content (inputs, labels and
    class count of every set). Errors name ``--data`` and what was expected, and are raised before any stage runs."""
    fn = import_factory(spec, "data")
    out = _call(fn, spec, "data", **({"seed": seed} if _takes_seed(fn) else {}))
    if not isinstance(out, Mapping):
        raise SettingTypeError("data", f"--data {spec} returned a {type(out).__name__}; expected a mapping with "
                                       f"'train' and 'test' (and optionally 'val', 'num_classes', 'name')")
    unknown = sorted(str(k) for k in out if k not in DATA_KEYS)
    missing = [k for k in ("train", "test") if k not in out]
    if unknown or missing:
        raise SettingError("data", f"--data {spec} returned keys {sorted(map(str, out))}: expected 'train' and "
                                   f"'test', and optionally 'val', 'num_classes', 'name'"
                                   + (f" (missing {missing})" if missing else "")
                                   + (f" (unknown {unknown})" if unknown else ""))
    num_classes, name = out.get("num_classes"), out.get("name", spec.partition(":")[2])
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)):
        raise SettingTypeError("data", f"--data {spec}: 'num_classes' must be an int, got {num_classes!r}")
    if not isinstance(name, str) or not name:
        raise SettingTypeError("data", f"--data {spec}: 'name' must be a non-empty string, got {name!r}")
    parts = {}
    for part in ("train", "test", "val"):
        if out.get(part) is None:
            continue
        try:
            parts[part] = D.read_tensor_dataset(out[part], f"{spec}()[{part!r}]")
        except TypeError as exc:
            raise SettingTypeError("data", f"--data {exc}") from None
        except ValueError as exc:
            raise SettingError("data", f"--data {exc}") from None
    try:
        split = D.user_split(name, parts["train"], parts["test"], parts.get("val"), num_classes, seed,
                             source=f"--data {spec}")
    except ValueError as exc:
        raise SettingError("data", str(exc)) from None
    content = {part: (ds.inputs, ds.labels) for part, ds in parts.items()}
    return split, state_digest({**content, "num_classes": split.num_classes})


def model_from_factory(spec: str, num_classes: int) -> nn.Module:
    """``function(num_classes)`` of the model factory ``spec``, checked to be an ``nn.Module``."""
    model = _call(import_factory(spec, "model"), spec, "model", num_classes)
    if not isinstance(model, nn.Module):
        raise SettingTypeError("model", f"--model {spec} returned a {type(model).__name__}; expected an nn.Module "
                                        f"mapping inputs to logits [b, {num_classes}] through a final nn.Linear")
    return model


def model_identity(spec: str, model: nn.Module) -> str:
    """The cache identity of the network factory ``spec`` and ``model``, one network it built fresh (under the
    run's seed): the factory's callable identity, that of every method of each class of ``model`` defined outside
    torch (editing a layer's forward changes it) and the digest of the fresh parameters and buffers."""
    fn = import_factory(spec, "model")
    classes = sorted({type(m) for m in model.modules() if not type(m).__module__.startswith("torch.")},
                     key=lambda t: f"{t.__module__}.{t.__qualname__}")
    methods = {f"{t.__module__}.{t.__qualname__}.{n}": v for t in classes for n, v in sorted(vars(t).items())
               if isinstance(v, types.FunctionType)}
    try:
        code = [callable_identity(fn, f"--model {spec}")] + [callable_identity(v, k) for k, v in methods.items()]
    except TypeError as exc:  # UnidentifiableCallableError: content no cache key can tell apart
        raise SettingTypeError("model", f"--model {spec}: {exc}") from None
    return state_digest({"code": code, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
