"""`regionnet-eval` of a landmark checkpoint (`regionnet.landmarks.evaluate`): the run's data and
split come back, metrics with patient-bootstrap intervals (step 1 apart for a two-step model),
per-film predictions, the error-by-vertebra plot and the best/median/worst overlays."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from regionnet.config import compose_config
from regionnet.evaluate import evaluate
from regionnet.landmarks.infer import is_landmark_checkpoint
from regionnet.train import train

VERTEBRAE = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny two-step landmark run on 4-vertebra phantoms (one epoch, random resnet18), step 2
    cropping from 128 px detail images of the 64 px input's frame."""
    tmp = tmp_path_factory.mktemp("landmark_run")
    cache = tmp_path_factory.mktemp("phantoms")
    cfg = compose_config(
        "train",
        [
            "task=landmarks",
            "debug=tiny",
            "data.dataset=phantom",
            "data.phantom.n=40",
            "data.phantom.size=[128,64]",
            f"data.phantom.vertebrae={VERTEBRAE}",
            f"data.phantom.cache={cache}",
            "data.image_size=64",
            "data.batch_size=8",
            "model.backbone=resnet18",
            "model.head_width=32",
            "model.refine=true",
            "model.refine_size=32",
            "data.detail_size=128",  # step 2 crops from the phantoms at their own height
            f"paths.output_dir={tmp}",
        ],
    )
    metrics = train(cfg)
    return {
        "dir": tmp,
        "metrics": metrics,
        "ckpt": tmp / "checkpoints" / "best.ckpt",
        "cache": cache,
    }


def eval_cfg(run, out, *extra):
    return compose_config(
        "eval",
        [
            f"ckpt_path={run['ckpt']}",
            f"paths.output_dir={out}",
            "num_workers=0",
            "batch_size=8",
            "bootstrap.resamples=200",
            "trainer.accelerator=cpu",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("landmark_eval")
    return {"out": out, "result": evaluate(eval_cfg(run, out))}


def test_a_landmark_checkpoint_is_recognised(run):
    assert is_landmark_checkpoint(run["ckpt"])
    # the train loop's write_split leaves the annotation check's list beside split.csv
    issues = pd.read_csv(run["dir"] / "annotation_issues.csv")
    assert list(issues.columns) == ["path", "vertebra", "reason"] and issues.empty


def test_eval_writes_metrics_predictions_plot_and_overlays(evaluated):
    out = evaluated["out"]
    for name in ("metrics.json", "predictions.csv", "error_by_level.png", "errors.csv"):
        assert (out / name).is_file(), name
    overlays = sorted((out / "overlays").iterdir())
    assert [p.name.split("_")[0] for p in overlays] == ["best", "median", "worst"]
    for png in [out / "error_by_level.png", *overlays]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 16
    with Image.open(overlays[0]) as im:
        assert im.size == (64, 128)  # the film's own size: points drawn in its pixels
    assert json.loads((out / "metrics.json").read_text()) == evaluated["result"]
    assert pd.read_csv(out / "errors.csv").empty


def test_metrics_have_intervals_that_hold_the_point_estimate(evaluated, run):
    result = evaluated["result"]
    assert result["task"] == "landmarks" and result["refine"] and result["split"] == "test"
    assert result["detail_size"] == 128
    assert result["bootstrap"]["unit"] == "patient"
    for stage in ("test", "test/step1"):
        for name in ("mre_px", "mre_pct", "err_x_median_pct", "err_y_median_pct", "pck@5"):
            value, (lo, hi) = result[f"{stage}/{name}"], result[f"{stage}/{name}_ci"]
            assert lo - 1e-9 <= value <= hi + 1e-9, (stage, name, lo, value, hi)
        assert list(result["per_level"][stage]) == ["V1", "V2", "V3", "V4"]
    cis = [k for k in result if k.endswith("_ci")]
    assert all(result[k][0] <= result[k][1] for k in cis) and len(cis) >= 2 * 8
    split = pd.read_csv(run["dir"] / "split.csv")
    assert result["test/films"] == (split["split"] == "test").sum()
    # the run's split and the same checkpoint: the training run's own test numbers
    for key in ("test/mre_px", "test/mre_pct", "test/step1/mre_pct"):
        assert result[key] == pytest.approx(run["metrics"][key], rel=1e-4)


def test_predictions_hold_each_test_film_with_its_error(evaluated, run):
    table = pd.read_csv(evaluated["out"] / "predictions.csv")
    split = pd.read_csv(run["dir"] / "split.csv")
    assert sorted(table["path"]) == sorted(split.loc[split["split"] == "test", "path"])
    assert {"patient_id", "split", "landmarks", "landmarks_step1", "mre_px", "mre_pct"} <= set(
        table.columns
    )
    points = np.array([json.loads(p) for p in table["landmarks"]])
    assert points.shape == (len(table), 4 * VERTEBRAE, 2)
    assert np.isfinite(table["mre_px"]).all() and (table["mre_pct"] > 0).all()
    # the film-pooled mean equals the mean over every point (all films have all points)
    assert table["mre_px"].mean() == pytest.approx(evaluated["result"]["test/mre_px"], rel=1e-3)


def test_other_splits_and_the_refused_external(run, tmp_path):
    result = evaluate(eval_cfg(run, tmp_path / "all", "split=all", "bootstrap.resamples=20"))
    assert result["all/films"] == 40 and "all/mre_pct_ci" in result
    val = evaluate(eval_cfg(run, tmp_path / "val", "split=val", "bootstrap.resamples=20"))
    split = pd.read_csv(run["dir"] / "split.csv")
    assert val["val/films"] == (split["split"] == "val").sum()
    with pytest.raises(ValueError, match="no external test set"):
        evaluate(eval_cfg(run, tmp_path / "ext", "split=external"))


def test_a_named_landmark_data_group_replaces_the_runs(run, tmp_path, caplog):
    """data=landmarks: that data as configured (split afresh by its seed); eval.yaml's region
    keys (data.external_test) are named and ignored."""
    group = [
        "data=landmarks",
        "data.dataset=phantom",
        "data.phantom.n=40",
        "data.phantom.size=[128,64]",
        f"data.phantom.vertebrae={VERTEBRAE}",
        f"data.phantom.cache={run['cache']}",
        f"data.external_test={tmp_path}",
        "split=all",
        "bootstrap.resamples=20",
    ]
    result = evaluate(eval_cfg(run, tmp_path / "group", *group))
    assert result["all/films"] == 40 and result["dataset"] == "phantom"
    assert any("data.external_test: not used" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="landmark model, but data._target_"):
        evaluate(eval_cfg(run, tmp_path / "region", "data=phantom"))


def test_the_console_table_prints_each_figure_present_with_its_interval(capsys):
    from regionnet.landmarks.report import print_table

    values = {
        "test/mre_pct": 2.5,
        "test/mre_pct_ci": [2.0, 3.0],
        "test/step1/mre_pct": 4.25,
        "test/step1/off_level_pct": 12.0,
    }
    print_table(values, "errors", [("final", "test"), ("step 1", "test/step1")])
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 4}
    assert set(rows) == {"mre_pct", "off_level_pct"}  # absent everywhere: no row
    assert "2.500 [2.000, 3.000]" in rows["mre_pct"] and "4.250" in rows["mre_pct"]
    assert "n/a" in rows["off_level_pct"] and "12.000" in rows["off_level_pct"]
