"""docs/examples/own_model_and_data.py, the script a new user copies, runs end to end (``--quick``) and gives sane
outputs: influences of the training set's shape, finite; pairwise rows per probe image; the chosen beta from the
grid; the fine-tuned model differs from the trained one; the repeated finetune equals select_beta's chosen run."""
import math
import runpy

import pytest
import torch

from _docs import doc_path

pytestmark = pytest.mark.usefixtures("one_thread")


def test_user_script_runs_and_gives_sane_outputs(capsys):
    script = runpy.run_path(doc_path("docs/examples/own_model_and_data.py"), run_name="user_script")
    out = script["main"](["--quick"])
    printed = capsys.readouterr().out
    n = out["n_train"]
    assert out["influence"].shape == (n,) and bool(torch.isfinite(out["influence"]).all())
    assert float(out["influence"].abs().max()) > 0
    assert out["pairwise"].shape == (out["n_probe"], n) and bool(torch.isfinite(out["pairwise"]).all())
    assert out["top"].helpful.shape == out["top"].harmful.shape == (out["n_probe"], 3)
    assert int(out["top"].helpful.max()) < n and int(out["top"].harmful.min()) >= 0
    # the paper's rule ("lowest") picks from the grid, so beta > 0 and the energy term acted
    assert out["beta"] in out["betas"] and out["beta"] > 0
    assert [row["beta"] for row in out["table"]] == list(out["betas"])
    result = out["result"]
    assert result.loss["name"] == "task" and result.loss["train_loss"].startswith("functools.partial[")
    base = out["model"].state_dict()
    tuned = result.model.state_dict()
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert all(bool(torch.isfinite(v).all()) for v in tuned.values())
    # finetune with the chosen beta is the very run select_beta kept
    for k, v in out["chosen"].model.state_dict().items():
        assert torch.equal(v, tuned[k]), k
    for key in ("error", "many_error", "medium_error", "few_error", "loss"):
        assert math.isfinite(out["before"][key]) and math.isfinite(out["after"][key]), key
    assert "IAERF (beta" in printed and "most helpful training images" in printed
