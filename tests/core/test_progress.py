"""The shared progress bar: readable in a log (few redraws off a terminal), hidden when disabled."""
import io
import time

import torch

from iaerf.core import progress as _progress


def _run(monkeypatch, tty: bool) -> str:
    stream = io.StringIO()
    stream.isatty = lambda: tty
    monkeypatch.setattr(_progress.sys, "stderr", stream)
    monkeypatch.setattr(_progress, "_LOG_INTERVAL_S", 30.0)
    with _progress.progress_bar(total=200, desc="work", enabled=True) as bar:
        bar.file = stream
        for _ in range(200):
            time.sleep(0.004)
            bar.update(1)
    return stream.getvalue()


def test_off_a_terminal_the_bar_redraws_rarely(monkeypatch):
    # 200 updates over ~0.8 s at a 30 s minimum interval: the opening and closing draws only (3 \r today)
    assert _run(monkeypatch, tty=False).count("\r") <= 3


def test_on_a_terminal_the_bar_redraws_often(monkeypatch):
    assert _run(monkeypatch, tty=True).count("\r") >= 6  # a 0.1 s interval: about 8 redraws


def test_disabled_bar_writes_nothing(monkeypatch, capsys):
    with _progress.progress_bar(range(5), desc="x", enabled=False) as bar:
        assert list(bar) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_solver_bars_stay_quiet_in_a_log(capsys):
    # the solvers update their postfix every step; off a terminal that must not force a redraw per step
    import iaerf
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    H = iaerf.ModuleHessian(model, (torch.randn(50, 5), torch.randint(0, 3, (50,))), gauss_newton=True)
    V = torch.randn(2, H.num_params)
    iaerf.inverse_hvp(H, V, method="cg", damping=1e-2, progress=True)
    iaerf.inverse_hvp(H, V, method="lissa", damping=1e-2, depth=50, tol=0.0, progress=True)
    assert capsys.readouterr().err.count("\r") <= 8  # open and close of each bar; was one redraw per step
