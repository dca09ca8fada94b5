"""One content identity for everything iaerf keys its caches by: callables (losses, trainers) and stored states.

:func:`callable_identity` is the identity of a function in every cache key, operator fingerprint and results
folder (influence caches, K-FAC caches, LiSSA checkpoints, the exact solver's kept eigendecomposition, evaluation
folders); :func:`state_digest` is the checksum each file iaerf writes and later trusts carries. Both are one
SHA-256 over the same walk of the object graph, so two objects of equal content get equal identities whatever
process built them (no memory address enters), and a change of any value a callable can read changes it:

- plain values (``None``, bool, int, float, complex, str, bytes) by type and value; tensors and numpy arrays by
  dtype, shape and exact bytes; dtypes, devices and enum members by their name;
- lists, tuples, dicts and sets by their items (sets in a fixed order);
- a function by its qualified name, its code (bytecode, constants and nested code, the names it reads), its
  default arguments, the values its closure captured, and the values it reads from its module globals (classes,
  modules and functions found there by qualified name only, so that library internals are not walked);
- ``functools.partial`` by its function, arguments and keywords; a bound method by ``__self__`` and ``__func__``;
  a builtin function by name (and its ``__self__`` when bound to an object);
- classes and modules by qualified name (a class redefined under the same name with other code is not told apart);
- any other object -- an ``nn.Module`` included: its parameters, buffers, submodules, plain settings and hooks
  all live in its attributes -- by its class's qualified name and every attribute (``__dict__`` and
  ``__slots__``), recursively.

An object that is none of these and has no attributes to read (a ``torch.Generator``, a lock, an open socket) has
content iaerf cannot see, so an identity computed without it would stay the same when it changes and a cached
result would be reused for a different function: :func:`callable_identity` raises
:class:`UnidentifiableCallableError` naming where in the callable the object sits. Only the layers that store
results call it (a given ``cache_dir``, ``checkpoint_path`` or ``out_dir``); the exact solver's in-memory reuse
skips reuse for such an operator instead.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import os
import sys
import types

import torch


__all__ = ["UnidentifiableCallableError", "callable_identity", "state_digest", "hash_tensor", "file_digest",
           "model_fingerprint"]


class UnidentifiableCallableError(TypeError):
    """A callable holds an object whose content cannot be read, so no cache key can tell its versions apart."""


_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                      types.MethodWrapperType, types.MethodDescriptorType, types.ClassMethodDescriptorType)
# named, not walked, where a function reads them from its globals (see the module docstring)
_NAMED_GLOBALS = (type, types.ModuleType, types.FunctionType) + _BUILTIN_CALLABLES


class _Walk:
    """One SHA-256 per object visited (a Merkle tree over the object graph): equal content gives equal digests
    however the objects are shared; an object met again while it is being walked (a cycle) is fed as the distance
    to its first visit, which depends only on the graph's shape."""

    def __init__(self, root_name: str):
        self.root_name = root_name
        self.memo: dict[int, bytes] = {}
        self.keep: list = []        # keeps every memoised object alive, so that its id is never reused meanwhile
        self.active: list[int] = []

    def digest(self, obj, path: str) -> bytes:
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            return b"cycle:%d" % (len(self.active) - self.active.index(key))
        self.active.append(key)
        try:
            h = hashlib.sha256()
            self._feed(h, obj, path)
            out = h.digest()
        finally:
            self.active.pop()
        self.memo[key] = out
        self.keep.append(obj)
        return out

    def _child(self, h, obj, path: str) -> None:
        h.update(self.digest(obj, path))

    def _feed(self, h, obj, path: str) -> None:
        t = type(obj)
        if isinstance(obj, _PLAIN):
            h.update(f"{t.__name__}:{obj!r}".encode())
        elif isinstance(obj, torch.Tensor):
            h.update(b"tensor")
            try:
                hash_tensor(h, obj)
            except Exception as exc:  # sparse, meta or subclassed tensors without plain bytes
                raise self._refuse(obj, path, f"a tensor whose bytes cannot be read ({type(exc).__name__})")
        elif _numpy_instance(obj, "ndarray"):
            if obj.dtype.hasobject:
                raise self._refuse(obj, path, "a numpy array of Python objects")
            h.update(f"ndarray:{_qualified(t)}:{obj.dtype.str}{obj.shape}".encode())
            h.update(obj.tobytes())
        elif _numpy_instance(obj, "generic"):
            h.update(f"{t.__module__}.{t.__qualname__}:".encode() + obj.tobytes())
        elif isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            h.update(f"torch:{obj}".encode())
        elif isinstance(obj, enum.Enum):
            h.update(f"enum:{_qualified(t)}.{obj.name}".encode())
        elif isinstance(obj, (list, tuple)):
            h.update(f"seq:{_qualified(t)}:{len(obj)}".encode())
            for i, item in enumerate(obj):
                self._child(h, item, f"{path}[{i}]")
        elif isinstance(obj, dict):
            h.update(f"map:{_qualified(t)}:{len(obj)}".encode())
            for k, v in obj.items():
                self._child(h, k, f"{path} (a key)")
                self._child(h, v, f"{path}[{k!r}]")
        elif isinstance(obj, (set, frozenset)):
            h.update(f"set:{_qualified(t)}:{len(obj)}".encode())
            for d in sorted(self.digest(item, f"{path} (an element)") for item in obj):
                h.update(d)
        elif isinstance(obj, type):
            h.update(f"class:{_qualified(obj)}".encode())
        elif isinstance(obj, types.ModuleType):
            h.update(f"module:{obj.__name__}".encode())
        elif isinstance(obj, types.CodeType):
            self._code(h, obj, path)
        elif isinstance(obj, types.FunctionType):
            self._function(h, obj, path)
        elif isinstance(obj, types.MethodType):
            h.update(b"method")
            self._child(h, obj.__func__, f"{path}.__func__")
            self._child(h, obj.__self__, f"{path}.__self__")
        elif isinstance(obj, _BUILTIN_CALLABLES):
            owner = getattr(obj, "__objclass__", None) or getattr(obj, "__module__", None)
            h.update(f"builtin:{_qualified(owner) if isinstance(owner, type) else owner}."
                     f"{getattr(obj, '__qualname__', obj.__name__)}".encode())
            bound = getattr(obj, "__self__", None)
            if bound is not None and not isinstance(bound, (types.ModuleType, type)):
                self._child(h, bound, f"{path}.__self__")
        elif isinstance(obj, functools.partial):
            h.update(b"partial")
            self._child(h, obj.func, f"{path}.func")
            self._child(h, obj.args, f"{path}.args")
            self._child(h, obj.keywords, f"{path}.keywords")
            self._child(h, getattr(obj, "__dict__", {}), f"{path}.__dict__")
        else:
            self._object(h, obj, path)

    def _code(self, h, code: types.CodeType, path: str) -> None:
        # the filename and line numbers are left out: moving a function does not change what it computes
        h.update(f"code:{code.co_name}:{code.co_argcount}:{code.co_posonlyargcount}:{code.co_kwonlyargcount}:"
                 f"{code.co_flags}:{code.co_names}:{code.co_varnames}:{code.co_freevars}:{code.co_cellvars}"
                 .encode())
        h.update(code.co_code)
        for i, const in enumerate(code.co_consts):
            self._child(h, const, f"{path}.co_consts[{i}]")

    def _function(self, h, fn: types.FunctionType, path: str) -> None:
        h.update(f"function:{fn.__module__}.{fn.__qualname__}".encode())
        self._child(h, fn.__code__, f"{path}.__code__")
        self._child(h, fn.__defaults__, f"{path}.__defaults__")
        self._child(h, fn.__kwdefaults__, f"{path}.__kwdefaults__")
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:       # a cell not yet assigned (a recursive inner function being defined)
                h.update(f"empty cell {name}".encode())
                continue
            h.update(f"cell {name}".encode())
            self._child(h, value, f"{path} (captured {name!r})")
        # values read from the module globals are inputs too (a notebook's class weights); what is named there
        # (imported functions, classes, modules) is identified by name, not walked into the library's internals
        module_globals = fn.__globals__
        for name in sorted(_global_names(fn.__code__)):
            if name not in module_globals:
                continue         # a builtin, or an attribute name (``F.cross_entropy`` reads ``cross_entropy``)
            value = module_globals[name]
            h.update(f"global {name}".encode())
            if isinstance(value, _NAMED_GLOBALS):
                h.update(f"{_qualified(value)}".encode())
            else:
                self._child(h, value, f"{path} (global {name!r})")

    def _object(self, h, obj, path: str) -> None:
        t = type(obj)
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        for klass in t.__mro__:
            for slot in _slots(klass):
                if slot in ("__dict__", "__weakref__"):
                    continue
                if slot.startswith("__") and not slot.endswith("__"):   # a private slot is stored mangled
                    slot = f"_{klass.__name__.lstrip('_')}{slot}"
                if hasattr(obj, slot):
                    attrs.setdefault(slot, getattr(obj, slot))
        if not attrs and not hasattr(obj, "__dict__") and t is not object:
            raise self._refuse(obj, path, f"a {_qualified(t)}, whose content iaerf cannot read")
        h.update(f"object:{_qualified(t)}:{len(attrs)}".encode())
        for name in sorted(attrs):
            h.update(name.encode())
            self._child(h, attrs[name], f"{path}.{name}")

    def _refuse(self, obj, path: str, what: str) -> UnidentifiableCallableError:
        return UnidentifiableCallableError(
            f"cannot identify {self.root_name}: {path} is {what}; a cache key without it would stay the same "
            f"when it changes, so a stored result could be returned for a different function. Hold tensors, "
            f"arrays, plain values, modules or objects with attributes instead, or do not store results for "
            f"this call (leave cache_dir / checkpoint_path / out_dir unset)")


def _qualified(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', None) or '?'}.{name}"


def _slots(klass) -> tuple[str, ...]:
    slots = klass.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it (lambdas, comprehensions) look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _numpy_instance(obj, name: str) -> bool:
    """``isinstance(obj, numpy.<name>)``, without importing numpy when nothing has (then no object is one)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, getattr(np, name))


def callable_identity(fn, name: str = "the callable") -> str:
    """``"<module>.<qualname>[<32 hex digits>]"``: the identity of ``fn`` for cache keys (see the module docstring
    for what it covers). Equal for two callables of equal content, whichever process built them.

    ``name`` is the argument ``fn`` came in (``loss_fn``, ``task.train_loss``), for the error message. Raises
    :class:`UnidentifiableCallableError` when ``fn`` holds an object whose content cannot be read.
    """
    target = fn.__func__ if isinstance(fn, types.MethodType) else fn
    label = _qualified(target) if isinstance(target, (types.FunctionType, type) + _BUILTIN_CALLABLES) \
        else _qualified(type(target))
    return f"{label}[{_Walk(name).digest(fn, name).hex()[:32]}]"


def state_digest(state) -> str:
    """Hex SHA-256 of a stored state: nested dicts / lists / tuples of tensors and plain values (names, dtypes,
    shapes, exact bytes, values). What a file iaerf writes records of its own content, checked on every read."""
    return _Walk("the stored state").digest(state, "state").hex()


def hash_tensor(h, t) -> None:
    """Feed a tensor's dtype, shape and exact bytes into the hashlib object ``h`` (cache keys, fingerprints)."""
    import torch

    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # view as bytes: works for every dtype (bfloat16 has no numpy equivalent)
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


_DIGESTS: dict[str, tuple[tuple[int, int, int, int], str]] = {}  # path -> (stat stamp, sha256) of this process


_DIGEST_BLOCK = 1 << 20


def file_digest(path: str, *, fresh: bool = False) -> str:
    """The hex SHA-256 of the bytes of file ``path``, streamed in 1 MiB blocks.

    A digest is kept for the rest of the process and reused while the file's (device, inode, size, mtime_ns) stay the
    same, so a run directory checked many times is read once. ``fresh=True`` reads the file again: a file replaced
    within one tick of the file system's clock can keep all four (the new inode may be the old one's, freed by the
    replacement), so whoever has just written a file asks for a fresh digest.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _DIGESTS.get(path)
    if not fresh and known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_DIGEST_BLOCK):
            h.update(block)
    _DIGESTS[path] = (stamp, h.hexdigest())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's architecture (its repr) and every parameter and buffer (names and exact values)."""
    h = hashlib.sha256()
    h.update(repr(model).encode())
    for name, t in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        hash_tensor(h, t)
    return h.hexdigest()
