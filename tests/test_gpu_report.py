"""benchmarks/gpu_report.py's code path, run on the CPU with tiny sizes (--dry-run), so the one-shot GPU script
cannot rot between the sessions that have a GPU."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_report  # noqa: E402


def test_gpu_report_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu.md"
    gpu_report.main(["--out", str(out), "--dry-run"])
    text = out.read_text()
    for heading in ("fused energy loss fwd+bwd", "head HVP", "energy influence JVP pass"):
        assert heading in text
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["copy_GBps"] > 0
    errors = [r["max_rel_err_vs_fp64"] for r in results["fused_loss"]]
    errors += [results["head_hvp"]["max_rel_err_vs_fp64"], results["influence"]["max_rel_err_vs_fp64"]]
    assert all(0 <= e < 1e-2 for e in errors), errors
