"""benchmarks/gpu_report.py and benchmarks/gpu_check on the CPU: the one-shot GPU validation must run the first time
it meets a GPU and fail loudly on anything wrong, so its code path and its failure detection are checked here."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_report  # noqa: E402


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_dry_run_passes_and_records_every_section(tmp_path):
    assert gpu_report.main(["--out-dir", str(tmp_path), "--dry-run"]) == 0
    secs = _report(tmp_path)["sections"]
    assert list(secs) == ["machine", "fused_loss", "head_hvp", "influence", "liger_ce"]
    assert all(s["status"] == "PASS" for name, s in secs.items() if name != "liger_ce"), secs
    assert secs["machine"]["copy_GBps"] > 0 and secs["machine"]["tf32"] == {"matmul": False, "cudnn": False}
    rows = secs["fused_loss"]["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16", "float16"}
    assert all(r["impl"] == secs["fused_loss"]["promised_impl"] for r in rows)
    assert all(r[f"{key}_GBps"] > 0 for r in rows for key in ("e2e", "forward", "backward"))
    assert secs["head_hvp"]["impl"] == "cpp" and secs["head_hvp"]["max_rel_err_vs_fp64"] <= gpu_report.FP32_RTOL
    checks = [c for s in secs.values() for c in s["checks"]]
    assert checks and all(c["ok"] for c in checks)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["report"]["sections"].keys() == secs.keys() and results["steps"] == []
    text = (tmp_path / "results.md").read_text()
    for heading in ("fused energy loss", "head HVP", "energy influence JVP pass"):
        assert heading in text


def test_timing_closures_leave_grad_untouched():
    # .backward() in a timed closure accumulates into z.grad: one more read and write of [N, K] per repetition.
    z = torch.randn(16, 7, requires_grad=True)
    y = torch.randint(0, 7, (16,))
    c = torch.rand(16)
    closures = gpu_report.loss_closures(z, y, c)
    assert set(closures) == {"e2e", "forward", "backward", "torch"}
    first = closures["e2e"]()[0]
    for fn in closures.values():
        fn()
        fn()
    assert z.grad is None
    torch.testing.assert_close(closures["e2e"]()[0], first)
    torch.testing.assert_close(closures["backward"]()[0], first)


def _perturbed_ece(monkeypatch, change):
    import iaerf.ops

    real = iaerf.ops.energy_regularized_cross_entropy

    def fake(logits, target, coef, **kw):
        return change(real(logits, target, coef, **kw))

    monkeypatch.setattr(iaerf.ops, "energy_regularized_cross_entropy", fake)


def test_tolerance_miss_fails_the_section(monkeypatch):
    _perturbed_ece(monkeypatch, lambda loss: loss * (1 + 1e-3))   # 1e-3 relative: 100x the fp32 tolerance
    sec = gpu_report.fused_loss("cpu", True, 1.0)
    assert sec["status"] == "FAIL"
    assert any("float32" in p and "loss vs float64" in p for p in sec["problems"]), sec["problems"]


def test_non_finite_output_fails_the_section(monkeypatch):
    _perturbed_ece(monkeypatch, lambda loss: loss + float("nan"))
    sec = gpu_report.fused_loss("cpu", True, 1.0)
    assert sec["status"] == "FAIL" and any("non-finite" in p for p in sec["problems"]), sec["problems"]


def test_head_hvp_reference_fallback_fails(monkeypatch):
    # The kernel missing: the section would time the pure-torch reference, so it must not pass.
    from iaerf.hessian import HeadHessian

    monkeypatch.setattr(HeadHessian, "backend", property(lambda self: ("reference", "no kernel (test)")))
    sec = gpu_report.head_hvp("cpu", True)
    assert sec["status"] == "FAIL" and sec["impl"] == "reference"
    assert any("ran 'reference', expected 'cpp'" in p for p in sec["problems"]), sec["problems"]


def _pass(device, dry, *args):
    return {"status": "PASS", "checks": [], "problems": []}


def test_failing_section_makes_main_exit_nonzero_and_later_sections_still_run(tmp_path, monkeypatch):
    def broken(device, dry):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_report, "fused_loss", _pass)
    monkeypatch.setattr(gpu_report, "head_hvp", broken)
    monkeypatch.setattr(gpu_report, "influence", _pass)
    assert gpu_report.main(["--out-dir", str(tmp_path), "--dry-run"]) == 1
    secs = _report(tmp_path)["sections"]
    assert secs["head_hvp"]["status"] == "FAIL" and "kernel exploded" in secs["head_hvp"]["problems"][0]
    assert secs["influence"]["status"] == "PASS"


def test_results_are_written_after_every_section(tmp_path, monkeypatch):
    # A kill in the middle of the report (here: KeyboardInterrupt in the third section) keeps what finished.
    def killed(device, dry):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_report, "fused_loss", _pass)
    monkeypatch.setattr(gpu_report, "head_hvp", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_report.main(["--out-dir", str(tmp_path), "--dry-run"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["report"]["sections"]) == ["machine", "fused_loss"]
    assert "fused_loss | PASS" in (tmp_path / "results.md").read_text()


def test_summarize_merges_gpu_check_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("build\tFAIL\t12\t140\t/x/step-build.log\texit status 1\n"
                                        "tests:logsumexp\tPASS\t3\t30\t/x/l.log\t9 passed in 2s\n")
    assert gpu_report.main(["--summarize", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in results["steps"]] == ["FAIL", "PASS"] and results["report"] is None
    assert results["steps"][0]["budget_s"] == 140
    assert "| build | FAIL | 12 / 140 | exit status 1 |" in (tmp_path / "results.md").read_text()


def _tree_copy(tmp_path):
    """The files gpu_check needs, without build outputs (the copy's iaerf runs on its pure-torch paths)."""
    dst = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info")
    for name in ("benchmarks", "tests", "iaerf", "csrc", "scripts"):
        shutil.copytree(os.path.join(ROOT, name), dst / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst / name)
    return dst


def _gpu_check(tree, out, *args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check"), str(out), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _steps(out):
    return {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}


def test_gpu_check_dry_run_fails_on_a_collection_error(tmp_path):
    tree = _tree_copy(tmp_path)
    with open(tree / "tests" / "ops" / "test_logsumexp.py", "a") as fh:
        fh.write("\ndef broken(:\n")
    run = _gpu_check(tree, tmp_path / "out", "--only", "tests")
    assert run.returncode == 1, run.stdout[-3000:]
    steps = _steps(tmp_path / "out")
    assert steps["tests:logsumexp"]["status"] == "FAIL", steps
    assert steps["tests:hessian_head"]["status"] == "PASS"   # no -x: the other files still ran
    assert "gpu_check: FAILED" in run.stdout


def test_gpu_check_fails_when_the_build_fails(tmp_path):
    tree = _tree_copy(tmp_path)
    (tree / "setup.py").write_text("raise SystemExit('deliberately broken build')\n")
    run = _gpu_check(tree, tmp_path / "out", "--only", "build")
    assert run.returncode == 1, run.stdout[-3000:]
    assert "setup.py build_ext exited with 1" in _steps(tmp_path / "out")["build"]["detail"]
    assert "deliberately broken build" in (tmp_path / "out" / "build.log").read_text()
