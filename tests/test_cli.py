"""The ``iaerf`` command: demo end to end (small settings), the step-by-step subcommands, resume and bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from iaerf.cli import main


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # the demo sets one thread for its tiny model
    yield
    torch.set_num_threads(before)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--quiet", "--out", out, "--seed", "3"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "ERM", "ERM + CE fine-tuning", "ERM + IAERF", "LDAM-DRW", "LDAM-DRW + CE fine-tuning", "LDAM-DRW + IAERF"]
    assert "many" in rows[0] and "few" in rows[0]
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["seed"] == 3 and settings["train_epochs"] == 4
    for fig in ("fig2_erm.png", "fig3_erm.png", "fig5_erm.png", "fig2_ldam_drw.png"):
        assert os.path.isfile(os.path.join(out, "plots", fig))
    # a second invocation resumes: every stage is skipped and the same table is printed
    assert main(["demo", "--quiet", "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.out.split("run directory")[0] == text.split("run directory")[0]
    assert "skipped" in captured.err and not re.search(r"\[iaerf\] [\w-]+: [0-9.]+s$", captured.err, re.M)


def test_step_by_step_subcommands(tmp_path, capsys):
    out = str(tmp_path / "steps")
    common = ["--out", out, "--quiet", "--threads", "1"]
    assert main(["data", *common, "--ratio", "10", "--train-epochs", "3", "--finetune-epochs", "1",
                 "--betas", "0.5", "--methods", "erm"]) == 0
    assert "[124, 96, 74, 57, 44, 34, 26, 20, 16, 12]" in capsys.readouterr().out
    assert main(["train", *common, "--method", "erm"]) == 0
    assert main(["influence", *common, "--method", "erm"]) == 0
    assert "I_max" in capsys.readouterr().out
    assert main(["finetune", *common, "--method", "erm", "--variant", "ce"]) == 0
    assert main(["finetune", *common, "--method", "erm"]) == 0
    assert "chosen on validation: beta 0.5" in capsys.readouterr().out
    assert main(["evaluate", *common]) == 0
    table = capsys.readouterr().out
    assert "ERM + IAERF" in table and "LDAM" not in table
    assert main(["plot", *common]) == 0
    assert "fig5_erm.png" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "metrics.json"))


def test_solver_options_reach_the_influence(tmp_path, capsys):
    out = str(tmp_path / "cg")
    common = ["--out", out, "--quiet", "--threads", "1", "--train-epochs", "3", "--methods", "erm"]
    assert main(["influence", *common, "--method", "erm", "--solver", "cg", "--solver-option", "tol=1e-10",
                 "--solver-option", "max_iter=200"]) == 0
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["solver"] == "cg" and settings["solver_options"] == {"tol": 1e-10, "max_iter": 200}
    cg = torch.load(os.path.join(out, "influence", "erm.pt"))
    # the exact solve of the same (damped, convex) classifier-only problem agrees with converged CG
    assert main(["influence", *common, "--method", "erm", "--solver", "exact"]) == 0
    exact = torch.load(os.path.join(out, "influence", "erm.pt"))
    torch.testing.assert_close(cg, exact, rtol=1e-3, atol=1e-3 * float(exact.abs().max()))
    capsys.readouterr()
    assert main(["influence", *common, "--method", "erm", "--solver-option", "depth"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["data", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "cifar-10-batches-py"),
    (["data", "--ratio", "0.5"], "ratio"),
    (["data", "--energy-cap", "clip"], "energy_cap"),
    (["demo", "--threads", "0"], "threads"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and match in err


def test_subcommand_without_run_dir(capsys):
    assert main(["evaluate", "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "iaerf", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0
    for sub in ("data", "train", "influence", "finetune", "evaluate", "plot", "demo"):
        assert sub in res.stdout
