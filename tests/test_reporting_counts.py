"""The number of positives next to every AUROC (issue 16 part 8): "AUC 1.00 [1.00, 1.00]" from
one pelvis positive misleads, "AUC 1.00 [1.00, 1.00], n+=1" does not. ROC legend, console table,
model card."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from regionnet import reporting
from regionnet.model.metrics import RegionMetrics
from regionnet.model_card import _limits
from regionnet.reporting import RocCurve, auroc_summary, auroc_text, plot_roc, roc_points
from regionnet.run import print_summary

REGIONS = ["knee", "pelvis"]
METRICS = {
    "test/auroc/knee": 0.9512,
    "test/auroc_ci/knee": [0.91, 0.98],
    "test/positives/knee": 40.0,
    "test/auroc/pelvis": 1.0,
    "test/auroc_ci/pelvis": [1.0, 1.0],
    "test/positives/pelvis": 1.0,
    "test/auroc_mean": 0.9756,
    "test/images": 60.0,
}


def test_auroc_text():
    assert auroc_text(1.0, (1.0, 1.0), 1) == "AUC 1.00 [1.00, 1.00], n+=1"
    assert auroc_text(0.95123, None, 12.0) == "AUC 0.95, n+=12"
    assert auroc_text(0.95123, [0.9, 0.99], None, digits=3) == "AUC 0.951 [0.900, 0.990]"


def test_stage_metrics_name_positives_per_head():
    """`stage/positives/<region>` from both metric paths (training's torchmetrics, eval's
    arrays); metric names are interfaces."""
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.1], [0.7, 0.4], [0.1, 0.2]])
    thresholds = [0.5, 0.5]
    values = reporting.stage_metrics(
        "test", probs, labels, ["knee", "knee", "other", "pelvis", "other"], REGIONS,
        thresholds, resamples=50,
    )  # fmt: skip
    assert values["test/positives/knee"] == 2 and values["test/positives/pelvis"] == 1
    m = RegionMetrics(REGIONS)
    m.update(
        torch.tensor(probs),
        torch.tensor(labels, dtype=torch.float),
        torch.tensor(thresholds),
        torch.tensor(0.1),
    )
    trained = m.compute("test")
    assert trained["test/positives/knee"] == 2 and trained["test/positives/pelvis"] == 1


def test_roc_legend_shows_positives(tmp_path, monkeypatch):
    saved = {}

    def keep(fig, path):
        saved["fig"] = fig
        return path

    monkeypatch.setattr(reporting, "_save", keep)
    y = np.array([0, 0, 1, 0, 1])
    p = np.array([0.1, 0.3, 0.8, 0.2, 0.6])
    curves = {"test": {"pelvis": RocCurve(*roc_points(y, p), 1.0, (1.0, 1.0), int(y.sum()))}}
    plot_roc(curves, tmp_path / "roc.png")
    legend = saved["fig"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["pelvis: AUC 1.00 [1.00, 1.00], n+=2"]
    assert "n+" in legend.get_title().get_text()
    # callers that pass no count still get a legend (without n+)
    plot_roc({"test": {"pelvis": RocCurve(*roc_points(y, p), 1.0)}}, tmp_path / "roc.png")
    legend = saved["fig"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["pelvis: AUC 1.00"]


def test_console_table_shows_positives(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    metrics = {**METRICS, "test/positives/hand": 0.0}
    print_summary(metrics, [*REGIONS, "hand"], stages=("val", "test"))
    out = capsys.readouterr().out
    assert "0.951 [0.910, 0.980], n+=40" in out
    assert "1.000 [1.000, 1.000], n+=1" in out
    assert "n/a, n+=0" in out  # a head without positives says why it has no AUROC
    assert "0.976" in out and "val" not in out  # no val metrics: no val column
    # training's metrics have no interval
    print_summary({"val/auroc/knee": 0.5, "val/positives/knee": 3.0}, ["knee"], stages=("val",))
    assert "0.500, n+=3" in capsys.readouterr().out


def test_model_card_auroc_per_head_and_thin_test_heads():
    summary = auroc_summary({**METRICS, "test/positives/hand": 0.0}, ("val", "test"), [
        *REGIONS, "hand", "elbow"])  # fmt: skip
    assert set(summary) == {"test"}
    assert summary["test"]["pelvis"] == {
        "auroc": 1.0, "ci": [1.0, 1.0], "positives": 1, "text": "AUC 1.00 [1.00, 1.00], n+=1"
    }  # fmt: skip
    assert summary["test"]["hand"] == {"auroc": None, "positives": 0, "text": "no AUC, n+=0"}
    assert "elbow" not in summary["test"]
    records = pd.DataFrame(
        {"region": ["knee", "pelvis"] * 60, "split": "train", "source": "a", "patient_id": "p"}
    )
    dm = SimpleNamespace(external=pd.DataFrame())
    limits = _limits(records, REGIONS, dm, METRICS)
    thin = [x for x in limits if "fewer than 10 positives" in x]
    assert thin == [
        "Test AUROC rests on fewer than 10 positives for: pelvis (n+=1); an AUROC and interval "
        "from so few positives say little."
    ]
    assert not any("positives" in x for x in _limits(records, REGIONS, dm, {}))
