"""Issue 29 in the pipeline: the baseline, post-hoc and composition rows, one table led by validation, and choices
(beta, tau) that never look at the test set. Feature files and a linear model keep every run to seconds."""
import dataclasses
import functools
import json
import os

import pytest
import torch

from iaerf.longtail.data import TensorDataset
from iaerf.longtail.pipeline import Pipeline, PipelineConfig
from iaerf.longtail.pipeline.report import table_rows
from iaerf.longtail.pipeline.settings import ROWS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(files, **settings)``: both baselines, five training and two fine-tuning epochs, 3 images per class
    held out, betas 0.5 and 5."""
    return functools.partial(tiny_config, methods=("erm", "ldam_drw"), train_epochs=5, finetune_epochs=2,
                             heldout_val=3, betas=(0.5, 5.0))


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_features):
    return write_features(tmp_path_factory.mktemp("features"), spread=1.5)


@pytest.fixture(scope="module")
def finished(config, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with Pipeline(str(out), config(files), progress=False, log=lambda s: None) as pipe:
        return str(out), pipe.evaluate()


def test_every_row_is_in_metrics_and_table(finished):
    out, metrics = finished
    expected = table_rows(("erm", "ldam_drw"), ROWS)
    assert len(expected) == 22
    assert [(r["model"], r["method"], r["variant"]) for r in metrics["results"]] == \
        [(row.label, row.method, row.key) for row in expected]
    table = open(os.path.join(out, "table.md")).read()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0].startswith("| model | val loss | error | many | medium | few | vs ERM | vs control |")
    assert sorted(line.split("|")[1].strip() for line in lines[1:]) == sorted(row.label for row in expected)
    for name in ("post-hoc logit adjustment", "tau-normalisation", "logit-adjusted loss fine-tuning",
                 "class-balanced fine-tuning", "IAERF, class-level", "IAERF on the logit-adjusted loss",
                 "IAERF + post-hoc logit adjustment"):
        assert f"ERM + {name}" in table and f"LDAM-DRW + {name}" in table
    assert "One seed: no interval over seeds" in table and "One seed" in metrics["note"]
    rows = {(r["method"], r["variant"]): r for r in metrics["results"]}
    for (method, variant), r in rows.items():
        erm, control = rows["erm", "baseline"], rows[method, "ce"]
        assert r["vs_erm"] == pytest.approx(r["error"] - erm["error"])
        assert r["vs_control"] == pytest.approx(r["error"] - control["error"])
        assert r["val_metric_name"] == "loss" and r["val_metric"] == pytest.approx(r["val_loss"])
    # choices are recorded beside the rows that made one
    assert rows["erm", "posthoc-la1"]["choice"] == {"param": "tau", "value": 1.0, "fixed": True}
    for key in ("posthoc-la", "posthoc-tn", "iaerf+posthoc-la", "iaerf", "iaerf-class", "iaerf-la"):
        choice = rows["erm", key]["choice"]
        assert choice["param"] == ("beta" if key.startswith("iaerf") and "posthoc" not in key else "tau")
        assert set(choice["interval"]) == {"value", "gain", "low", "high"}
    assert rows["erm", "iaerf"]["beta"] == rows["erm", "iaerf"]["choice"]["value"]
    for key in ("baseline", "ce", "la", "cb"):
        assert rows["erm", key]["choice"] is None


def test_the_table_leads_with_the_best_on_validation(finished):
    out, metrics = finished
    lead = metrics["lead"]
    best = min(metrics["results"], key=lambda r: r["val_metric"])
    assert lead["model"] == best["model"] and lead["val"] == best["val_metric"]
    assert lead["reference"] == "ERM" and lead["low"] <= lead["gain"] <= lead["high"]
    first = [line for line in open(os.path.join(out, "table.md")).read().splitlines() if line.startswith("| ")][1]
    assert first.split("|")[1].strip() == lead["model"]
    vals = [float(line.split("|")[2]) for line in open(os.path.join(out, "table.md")).read().splitlines()
            if line.startswith("| ") and "---" not in line and "model" not in line]
    assert vals == sorted(vals)


def test_finetune_variants_on_the_control_schedule(finished):
    out, _ = finished
    info = {v: json.load(open(os.path.join(out, "finetune", f"erm-{v}.json")))
            for v in ("ce", "la", "cb", "iaerf", "iaerf-class", "iaerf-la")}
    assert info["la"]["loss"] == {"name": "logit_adjusted", "tau": 1.0}
    assert info["cb"]["loss"] == {"name": "class_balanced", "cb_beta": 0.9999}  # feature files: CIFAR's DRW beta
    assert info["iaerf-la"]["loss"] == info["la"]["loss"] and info["iaerf"]["loss"] == {"name": "ce"}
    configs = {v: i["config"] for v, i in info.items()}
    assert all(cfg == configs["iaerf"] for cfg in configs.values())  # one schedule: seed, epochs, lr, scope
    for v in ("iaerf", "iaerf-class", "iaerf-la"):
        sel = info[v]["selection"]
        assert sel["rule"] == "noise_aware" and sel["reference_value"] == 0.0
        assert info[v]["beta"] == sel["chosen"] and set(sel["interval"]) == {"value", "gain", "low", "high"}
        assert [row["beta"] for row in info[v]["beta_search"]][:2] == [0.5, 5.0]
        if sel["chosen"] == 0.0:  # the control kept: its own run, not a re-run
            assert info[v]["history"] == info["la" if v == "iaerf-la" else "ce"]["history"]
        else:
            assert next(r for r in sel["candidates"] if r["value"] == sel["chosen"])["significant"]
    posthoc = json.load(open(os.path.join(out, "posthoc", "erm.json")))
    assert set(posthoc) == {"rule", "logit_adjustment", "tau_normalization"}
    assert set(json.load(open(os.path.join(out, "posthoc", "erm-iaerf.json")))) == {"rule", "logit_adjustment"}


def _shuffled_test_labels(monkeypatch):
    """Every Pipeline's split gets its test labels permuted (the inputs and the counts stay)."""
    real = Pipeline.split

    def split(self):
        out = real(self)
        if not getattr(self, "_test_shuffled", False):
            perm = torch.randperm(len(out.test), generator=torch.Generator().manual_seed(7))
            test = TensorDataset(out.test.inputs, out.test.labels[perm], out.test.num_classes)
            self._split, self._test_shuffled = dataclasses.replace(out, test=test), True
        return self._split

    monkeypatch.setattr(Pipeline, "split", split)


def _choices(out):
    """Everything chosen on validation in a run: each beta search's JSON (selection, table, beta) and each post-hoc
    JSON, as files (bytes)."""
    got = {}
    for folder in ("finetune", "posthoc"):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            if name.endswith(".json"):
                with open(os.path.join(out, folder, name), "rb") as f:
                    got[f"{folder}/{name}"] = f.read()
    return got


@pytest.mark.parametrize("rule", ["noise_aware", "lowest"])
def test_choices_never_look_at_the_test_set(config, files, tmp_path, monkeypatch, rule):
    """The test labels shuffled: every beta and tau choice, every validation score and the lead stay the same (the
    files that record them are byte-identical), while the test errors move."""
    run_config = config(files, methods=("erm",), select_rule=rule)
    with Pipeline(str(tmp_path / "a"), run_config, progress=False, log=lambda s: None) as pipe:
        plain = pipe.evaluate()
    with monkeypatch.context() as mp:
        _shuffled_test_labels(mp)
        with Pipeline(str(tmp_path / "b"), run_config, progress=False, log=lambda s: None) as pipe:
            shuffled = pipe.evaluate()
            assert pipe._test_shuffled
    a, b = _choices(str(tmp_path / "a")), _choices(str(tmp_path / "b"))
    assert len(a) == 8 and a == b  # 6 fine-tuning JSONs, 2 post-hoc JSONs
    keep = ("model", "variant", "val_metric", "val_loss", "val_error", "choice")
    assert [{k: r[k] for k in keep} for r in plain["results"]] == [{k: r[k] for k in keep} for r in shuffled["results"]]
    assert plain["lead"]["model"] == shuffled["lead"]["model"] and plain["lead"]["gain"] == shuffled["lead"]["gain"]
    assert [r["error"] for r in plain["results"]] != [r["error"] for r in shuffled["results"]]  # test did change
    if rule == "lowest":
        assert json.loads(a["finetune/erm-iaerf.json"])["selection"]["rule"] == "lowest"


def test_rows_setting(config, files, tmp_path):
    """``rows`` picks the rows beyond baseline / control / IAERF; none runs none of their stages."""
    logs = []
    with Pipeline(str(tmp_path / "r"), config(files, methods=("erm",), rows=()), progress=False,
                  log=logs.append) as pipe:
        metrics = pipe.evaluate()
    assert [r["variant"] for r in metrics["results"]] == ["baseline", "ce", "iaerf"]
    assert not any("posthoc" in line or "-la" in line or "-cb" in line for line in logs), logs
    cfg = config(files, rows=["cb", "posthoc"])
    assert cfg.baselines.rows == ("posthoc", "cb") and PipelineConfig.from_json(cfg.to_json()) == cfg
    from iaerf.longtail.pipeline import SettingError

    with pytest.raises(SettingError, match="rows must be") as err:
        config(files, rows=("lda",))
    assert err.value.field == "rows"
