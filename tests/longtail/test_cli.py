"""The ``iaerf`` command: demo end to end (small settings), the step-by-step subcommands, resume and bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from iaerf.longtail.cli import main


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # the demo sets one thread for its tiny model
    yield
    torch.set_num_threads(before)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--quiet", "--out", out, "--seed", "3"]) == 0
    text = capsys.readouterr().out
    # the first line names the protocol the demo runs by default, before any stage
    assert text.splitlines()[0].startswith("iaerf demo: protocol recommended: validation held out of training")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    from iaerf.longtail.pipeline.report import table_rows
    from iaerf.longtail.pipeline.settings import ROWS

    assert sorted(r.split("|")[1].strip() for r in rows[1:]) == sorted(
        row.label for row in table_rows(("erm", "ldam_drw"), ROWS))
    assert "many" in rows[0] and "few" in rows[0] and "val loss" in rows[0] and "vs control" in rows[0]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    lead = metrics["lead"]["model"]  # the table leads with the model that did best on validation
    assert rows[1].split("|")[1].strip() == lead and f"best on validation: {lead} (" in text
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["seed"] == 3 and settings["train_epochs"] == 4 and settings["threads"] == 1
    assert settings["protocol"] == "recommended" and settings["heldout_val"] == 12 and 0.0 in settings["betas"]
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
    assert re.search(r"chosen on validation: beta [0-9.e+]+ \(effective", capsys.readouterr().out)
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
    cg = torch.load(os.path.join(out, "influence", "erm.pt"))["values"]
    # the exact solve of the same (damped, convex) classifier-only problem agrees with converged CG
    assert main(["influence", *common, "--method", "erm", "--solver", "exact"]) == 0
    exact = torch.load(os.path.join(out, "influence", "erm.pt"))["values"]
    torch.testing.assert_close(cg, exact, rtol=1e-3, atol=1e-3 * float(exact.abs().max()))
    capsys.readouterr()
    assert main(["influence", *common, "--method", "erm", "--solver-option", "depth"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["data", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "cifar-10-batches-py"),
    (["data", "--ratio", "0.5"], "--ratio"),
    (["data", "--energy-cap", "clip"], "--energy-cap"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--threads", "1e11"], "--threads"),
    (["demo", "--threads", "100000000000"], "--threads"),  # torch overflows (or segfaults) on it
    (["demo", "--damping", "-1"], "--damping"),
    (["demo", "--solver", "lissa", "--solver-option", "depth=abc"], "depth must be a positive int"),
    (["demo", "--solver-option", "depth=10"], "unknown option"),  # the default solver is exact
    (["demo", "--influence-params", "nosuch"], "--influence-params"),
    (["demo", "--finetune-params", "nosuch"], "--finetune-params"),
    (["demo", "--device", "banana"], "--device"),
    (["demo", "--ratio", "1e308"], "--ratio"),  # 9 of 10 classes would be empty
    (["demo", "--seed", "-1"], "--seed"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, match):
    out = tmp_path / "r"
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and match in err, err  # one line
    assert "[iaerf]" not in err  # no stage ran
    assert not (out / "settings.json").exists()  # the bad settings are not stored


def test_bad_option_on_a_stored_run_keeps_its_settings(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["data", "--out", out, "--quiet", "--damping", "0.01"]) == 0
    stored = open(os.path.join(out, "settings.json")).read()
    assert main(["influence", "--out", out, "--quiet", "--method", "erm", "--damping", "-1"]) == 2
    assert open(os.path.join(out, "settings.json")).read() == stored
    assert "--damping" in capsys.readouterr().err


def test_out_pointing_at_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["data", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run directory" in err and "not a folder" in err


def test_threads_above_core_count_warn(tmp_path, capsys):
    from iaerf.longtail.cli import _cores

    assert main(["data", "--out", str(tmp_path / "r"), "--quiet", "--threads", str(_cores() + 1)]) == 0
    assert "warning: --threads" in capsys.readouterr().err


def test_damaged_settings_json(tmp_path, capsys):
    (tmp_path / "settings.json").write_text("{not json")
    assert main(["evaluate", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "settings.json") in err and "delete it" in err


def test_interrupted_demo_resumes_to_identical_outputs(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a stage: one line, exit 130; the same command then finishes, and every output file
    has the bytes of an uninterrupted run (stage markers aside: they hold run times)."""
    import iaerf.longtail.pipeline.stages

    ref, out = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert main(["demo", "--quick", "--quiet", "--out", ref]) == 0
    real = iaerf.longtail.pipeline.stages.select_beta
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # ERM's second beta search (class-level IAERF): its IAERF is finished by then
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(iaerf.longtail.pipeline.stages, "select_beta", interrupted)
    capsys.readouterr()
    assert main(["demo", "--quick", "--quiet", "--out", out]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    monkeypatch.setattr(iaerf.longtail.pipeline.stages, "select_beta", real)
    assert main(["demo", "--quick", "--quiet", "--out", out]) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), ref) for d, _, fs in os.walk(ref) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    for rel in files:
        if not rel.startswith("stages"):
            assert open(os.path.join(ref, rel), "rb").read() == open(os.path.join(out, rel), "rb").read(), rel


def _run_cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "iaerf", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "iaerf", "demo", "--quick", "--out", str(tmp_path / "r")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # the data stage's log line: training has started
        lines.append(line)
        if line.startswith("[iaerf] data") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    err = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "run the same command again to resume" in err.strip().splitlines()[-1]


def test_damaged_run_outputs_in_a_subprocess(tmp_path):
    """Garbage influence and energy files: a one-line warning each, the stage re-runs, exit 0; garbage
    metrics.json likewise. No traceback, and nothing suggests weights_only=False."""
    out = str(tmp_path / "r")
    common = ["--out", out, "--quiet", "--threads", "1", "--methods", "erm", "--train-epochs", "2",
              "--finetune-epochs", "1", "--betas", "1"]
    assert main(["evaluate", *common]) == 0
    for rel in ("influence/erm.pt", "finetune/erm-iaerf-energy.pt", "metrics.json"):
        with open(os.path.join(out, rel), "wb") as f:
            f.write(b"\x80\x02garbage")
    res = _run_cli("plot", *common)
    assert res.returncode == 0, res.stderr
    # the damage warnings (an IAERFWarning on the re-run's energy term may come too: IAERF's own diagnostics)
    warned = [line for line in res.stderr.splitlines() if "warning" in line and "stage again" in line]
    assert len(warned) == 2 and "influence/erm.pt" in warned[0] and "erm-iaerf-energy.pt" in warned[1], res.stderr
    assert "Traceback" not in res.stderr and "weights_only=False" not in res.stderr
    res = _run_cli("evaluate", *common)
    assert res.returncode == 0 and "metrics.json" in res.stderr and "Traceback" not in res.stderr


def test_subcommand_without_run_dir(capsys):
    assert main(["evaluate", "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "iaerf", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0
    for sub in ("data", "train", "influence", "finetune", "evaluate", "plot", "demo"):
        assert sub in res.stdout


def test_evaluate_influence_against_pbrf(tmp_path, capsys):
    """`iaerf evaluate-influence`: the classifier-only influence of a run against its PBRF ground truth (the head
    is convex, Gauss-Newton = Hessian there, so they must agree closely)."""
    out = str(tmp_path / "ev")
    assert main(["evaluate-influence", "--out", out, "--quiet", "--threads", "1", "--method", "erm", "--methods", "erm",
                 "--train-epochs", "3", "--damping", "1e-2", "--pbrf-points", "6"]) == 0
    text = capsys.readouterr().out
    assert "converged" in text and "NOT" not in text
    res = json.load(open(os.path.join(out, "evaluation", "pbrf_erm.json")))
    assert len(res["indices"]) == 6 and res["pearson"] > 0.99 and res["converged"]
    assert os.path.isfile(os.path.join(out, "plots", "pbrf_erm.png"))


@pytest.mark.parametrize("protocol", ["paper", "recommended"])
def test_both_protocols_run_end_to_end(tmp_path, capsys, protocol):
    out = str(tmp_path / protocol)
    fast = ["--solver-option", "max_iter=30"] if protocol == "paper" else []  # its full-model CG, kept short here
    assert main(["demo", "--quick", "--quiet", "--out", out, "--protocol", protocol, "--methods", "erm", *fast]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"iaerf demo: protocol {protocol}: ") and "ERM + IAERF" in text
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["protocol"] == protocol
    assert (0.0 in settings["betas"]) == (protocol == "recommended")
    assert settings["validation"] == ("heldout" if protocol == "recommended" else "train_subset")


def test_demo_without_a_protocol_says_so(tmp_path, capsys):
    """`--protocol none`: the demo runs the settings as given, and its first line says so."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate((30, 12, 5))])
    yt = torch.arange(30) % 3
    torch.save({"features": torch.randn(len(y), 4, generator=g) + y[:, None], "labels": y}, tmp_path / "train.pt")
    torch.save({"features": torch.randn(30, 4, generator=g) + yt[:, None], "labels": yt}, tmp_path / "test.pt")
    assert main(["demo", "--quiet", "--out", str(tmp_path / "r"), "--protocol", "none", "--dataset", "features",
                 "--train-features", str(tmp_path / "train.pt"), "--test-features", str(tmp_path / "test.pt"),
                 "--methods", "erm", "--train-epochs", "2", "--finetune-epochs", "1", "--rows", "none"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("iaerf demo: no protocol (the settings as given): validation = a "
                                           "class-balanced subset of the training set")
    settings = json.load(open(tmp_path / "r" / "settings.json"))
    assert settings["protocol"] is None and settings["heldout_val"] == 0 and settings["rows"] == []


def test_fig1_has_the_full_model_pbrf_panel(tmp_path):
    """`iaerf plot --fig1`: a second panel holds the full-model Gauss-Newton influence against its PBRF; at the
    stages' derivative-sized eps the two must agree (the PBRF's Hessian at the trained weights is G + lambda I)."""
    import matplotlib.image

    from iaerf.core.plotting import pearson_r

    out = str(tmp_path / "f1")
    assert main(["plot", "--out", out, "--quiet", "--threads", "1", "--methods", "erm", "--train-epochs", "3",
                 "--damping", "1e-1", "--fig1", "--fig1-points", "3"]) == 0
    png = matplotlib.image.imread(os.path.join(out, "plots", "fig1_erm.png"))
    assert png.shape[1] > 1.8 * png.shape[0]  # two panels side by side (one panel is 4.6 x 3.6 inches)
    panel = json.load(open(os.path.join(out, "evaluation", "fig1_erm.json")))["full_model_pbrf"]
    assert len(panel["predicted"]) == len(panel["actual"]) == 3 and "unfinished" not in panel["title"]
    assert pearson_r(panel["predicted"], panel["actual"]) > 0.99


def test_flags_turn_off_as_well_as_on(tmp_path, capsys):
    """A stored True is reversible: --no-gauss-newton (the pipeline's default is the Gauss-Newton matrix)."""
    out = str(tmp_path / "r")
    assert main(["data", "--out", out, "--quiet", "--no-gauss-newton", "--fig1"]) == 0
    stored = json.load(open(os.path.join(out, "settings.json")))
    assert stored["gauss_newton"] is False and stored["fig1"] is True
    assert main(["data", "--out", out, "--quiet", "--gauss-newton", "--no-fig1"]) == 0
    stored = json.load(open(os.path.join(out, "settings.json")))
    assert stored["gauss_newton"] is True and stored["fig1"] is False
