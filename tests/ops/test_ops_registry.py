"""The op registry (iaerf.ops.registry): each schema is written once, the registry and the dispatcher agree, and
iaerf._C's kernels attach to the Python definitions whichever comes first."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from iaerf.core import extension as _extension
from iaerf.ops import registry

REPO = pathlib.Path(__file__).resolve().parents[2]
# where a schema could be written: the package, the native sources, the tests, the docs, the scripts
SEARCHED = ("iaerf", "csrc", "tests", "docs", "benchmarks", "scripts")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".inc", ".md", ".sh", ".txt"}


def _text_files():
    for top in SEARCHED:
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "build" not in path.relative_to(REPO).parts:
                yield path, path.read_text(errors="replace")


def test_each_schema_is_written_once():
    # A schema is "name(" followed by an argument type (or "()"); an op's name followed by anything else is a call
    # or a mention. Each must appear in one file only: its op file.
    assert registry.OPS, "no op registered"
    found = {name: [] for name in registry.OPS}
    for path, text in _text_files():
        for name in registry.OPS:
            if re.search(rf"\b{re.escape(name)}\((Tensor|int|bool|float|str|Scalar|SymInt|\))", text):
                found[name].append(str(path.relative_to(REPO)))
    twice = {name: files for name, files in found.items() if len(files) != 1}
    assert not twice, f"schemas written in more than one file (or none): {twice}"
    for name, (where,) in found.items():
        assert where.startswith("iaerf/ops/"), f"the schema of {name} lives in {where}, not in its op file"


def test_native_sources_register_kernels_only():
    # iaerf._C defines only its internal ops; every kernel it registers is for an op of the registry or of its own.
    defined, implemented = set(), set()
    for path, text in _text_files():
        if path.suffix in (".cpp", ".cu", ".inc") and path.parts[len(REPO.parts)] == "csrc":
            defined |= set(re.findall(r'm\.def\(\s*"([A-Za-z_0-9]+)\(', text))
            implemented |= set(re.findall(r'm\.impl\(\s*"([A-Za-z_0-9]+)"', text))
    assert defined == {"cpu_capability", "built_with_cuda"}, defined
    assert implemented <= set(registry.OPS), implemented - set(registry.OPS)


def test_registry_and_dispatcher_agree():
    for name, op in registry.OPS.items():
        assert op.name == name
        assert str(getattr(torch.ops.iaerf, name).default._schema) == f"iaerf::{op.schema}"
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"iaerf::{name}", "CPU")
        assert ("cpu" in op.compiled) == has_cpu == _extension.extension_loaded(), name
        if op.triton:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"iaerf::{name}", "CUDA"), name
    assert set(registry.PUBLIC_FUNCTIONS.values()) <= set(registry.OPS)


def test_register_op_refuses_a_second_registration():
    op = registry.OPS["logsumexp"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register_op(op.schema, fake=lambda logits: logits)
    with pytest.raises(ValueError, match="not registered"):
        registry.register_public_function("new_function", "no_such_op")


def test_register_op_refuses_an_op_defined_otherwise():
    # as by an iaerf._C built from sources that still defined the ops in C++, with another schema
    lib = torch.library.Library("iaerf", "FRAGMENT")
    lib.define("stale_test_op(Tensor x) -> Tensor")
    try:
        with pytest.raises(RuntimeError, match="rebuild iaerf._C"):
            registry.register_op("stale_test_op(Tensor x, int k) -> Tensor", fake=lambda x, k: x)
        assert "stale_test_op" not in registry.OPS
    finally:
        lib._destroy()


_EXTENSION_AFTER_DEFINITIONS = textwrap.dedent(
    """
    import importlib, sys
    sys.modules["iaerf._C"] = None  # the op files define the schemas before iaerf._C is loaded
    import torch
    import iaerf.ops
    from iaerf.ops.reference import reference_logsumexp

    assert not torch._C._dispatch_has_kernel_for_dispatch_key("iaerf::logsumexp", "CPU")
    del sys.modules["iaerf._C"]
    importlib.import_module("iaerf._C")  # its kernels attach to the ops defined above
    z = torch.randn(5, 4)
    for name in iaerf.ops.registry.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"iaerf::{name}", "CPU"), name
    torch.testing.assert_close(torch.ops.iaerf.logsumexp(z), reference_logsumexp(z))
    assert torch.ops.iaerf.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")
    print("ok")
    """
)


@pytest.mark.skipif(not _extension.extension_loaded(), reason="iaerf._C not built")
def test_extension_loads_after_the_python_definitions_too():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _EXTENSION_AFTER_DEFINITIONS], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
