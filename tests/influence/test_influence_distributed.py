"""Two gloo processes (torchrun) give the same influences as one process, and every rank gets all of them."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import _dist_influence_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", os.path.join(ROOT, "tests", "_dist_influence_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        # One relaunch on a fresh port: a loaded 2-core CI box has seen gloo abort a worker once at teardown
        # ("terminate called without an active exception"); a real failure fails twice and is reported.
        first = proc.stdout[-1500:] + proc.stderr[-1500:]
        cmd = [f"--master_port={_free_port()}" if a.startswith("--master_port=") else a for a in cmd]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, first + "\n--- relaunch ---\n" + proc.stdout[-3000:] + proc.stderr[-3000:]

    single = worker.compute(None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, want in single.items():
        for r, got in enumerate(ranks):
            assert got[name].shape == want.shape, (name, r)
            rel = float((got[name] - want).abs().max() / want.abs().max())
            assert rel <= 1e-6, (name, r, rel)
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: ranks disagree"


def test_shards_cover_range_in_order_and_auto_without_init():
    from iaerf.core import distributed as D

    for n in (0, 1, 7, 31, 64):
        for world in (1, 2, 3, 5):
            shards = [D.shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert D.resolve_group(None) is None
    assert D.resolve_group("auto") is None  # torch.distributed not initialised here: single process
    with pytest.raises(ValueError, match="process_group"):
        D.resolve_group("everything")
    with pytest.raises(ValueError, match="not initialised"):
        D.resolve_group(object())


@pytest.mark.parametrize("backend, device, want", [
    ("nccl", "cuda:1", "cuda:1"),   # the operator's / data's GPU
    ("nccl", "cuda", "cuda:3"),     # a bare "cuda" is the current device
    ("nccl", "cpu", "cuda:3"),      # nccl cannot move CPU tensors: the current GPU
    ("nccl", None, "cuda:3"),
    ("gloo", "cuda:1", "cpu"),      # gloo reduces CPU tensors
    ("gloo", None, "cpu"),
])
def test_one_collective_device_rule_for_hessian_and_influence(monkeypatch, backend, device, want):
    import torch.distributed as dist

    import iaerf.core.distributed as shared
    from iaerf.hessian import operators
    from iaerf.core import distributed as D

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert shared.collective_device(object(), device) == torch.device(want)
    # the Hessian operators and the influence passes use this very rule, not copies of it
    assert operators._collective_device is shared.collective_device
    assert D.collective_device is shared.collective_device and D.all_reduce_sum is shared.all_reduce_sum


def test_agree_reduces_on_the_device_the_work_runs_on(monkeypatch):
    import torch.distributed as dist

    from iaerf.core import distributed as D

    seen = []
    monkeypatch.setattr(D, "collective_device", lambda group, device=None: seen.append(device) or torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: None)
    assert D.agree(True, object(), torch.device("cuda", 1)) and not D.agree(False, object())
    assert seen == [torch.device("cuda", 1), None]
    assert D.agree(False, None) is False  # single process: no collective
