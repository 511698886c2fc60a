"""Evaluation (regionnet.evaluate, regionnet.reporting) and the model card written by train.

One tiny phantom model is trained once per session (about 20 s on a CPU) and evaluated once
per module on its test split plus an external folder holding an unreadable file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.evaluate import evaluate
from regionnet.regions import OTHER, REGIONS, UNKNOWN, region_info
from regionnet.reporting import (
    auroc,
    bootstrap_auroc_ci,
    bootstrap_samples,
    confusion,
    decide_all,
    resampling_unit,
    stage_metrics,
    unknown_rate_other,
)
from regionnet.train import train

EXTERNAL = {"knee": 3, "hand": 3, "elbow": 2, "chest": 3}  # chest -> other


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Run directory of one tiny phantom training (config.yaml, split.csv, checkpoints/)."""
    run = tmp_path_factory.mktemp("train_run")
    train(compose_config("train", [*FAST, f"paths.output_dir={run}"]))
    return run


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A folder tree of phantom PNGs (<region>/*.png) plus one file that is not an image."""
    root = tmp_path_factory.mktemp("external")
    for region, n in EXTERNAL.items():
        (root / region).mkdir()
        for i in range(n):
            pixels = (render_phantom(region, 9000 + i, 48) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / region / f"{i}.png")
    (root / "knee" / "broken.png").write_bytes(b"this is not a PNG")
    return root


def saved_thresholds(run):
    """The `thresholds` buffer as saved in the run's best.ckpt."""
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]["thresholds"].tolist()


def eval_config(ckpt, out, *overrides):
    return compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={out}",
            "num_workers=0",
            "trainer.accelerator=cpu",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def evaluated(trained, external, tmp_path_factory):
    """(output dir, returned metrics) of evaluating best.ckpt on test + external."""
    out = tmp_path_factory.mktemp("eval_run")
    ckpt = trained / "checkpoints" / "best.ckpt"
    metrics = evaluate(eval_config(ckpt, out, f"data.external_test={external}"))
    return out, metrics


# -- evaluate() end to end ------------------------------------------------------------------
def test_eval_writes_metrics_figures_and_predictions(evaluated, trained):
    out, returned = evaluated
    for name in ("metrics.json", "roc.png", "confusion.png", "predictions.csv", "errors.csv"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").stat().st_size > 10_000  # a drawn figure, not an empty canvas
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["regions"] == list(REGIONS)
    assert metrics["bootstrap"]["resamples"] >= 1000 and metrics["bootstrap"]["seed"] == 0
    assert metrics["bootstrap"]["unit"]["test"] == "image"  # phantoms carry no patient ids
    for r in REGIONS:
        a, (lo, hi) = metrics[f"test/auroc/{r}"], metrics[f"test/auroc_ci/{r}"]
        assert 0 <= lo <= a <= hi <= 1, (r, lo, a, hi)
        for name in ("acc", "sensitivity", "specificity"):
            assert 0 <= metrics[f"test/{name}/{r}"] <= 1
    assert 0 <= metrics["test/top1_acc"] <= 1
    assert 0 <= metrics["test/unknown_rate_other"] <= 1
    assert metrics["test/auroc_mean"] == pytest.approx(
        np.mean([metrics[f"test/auroc/{r}"] for r in REGIONS])
    )

    split = pd.read_csv(trained / "split.csv")
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    test_preds = preds[preds["split"] == "test"]
    assert sorted(test_preds["path"]) == sorted(split.loc[split["split"] == "test", "path"])
    assert metrics["test/images"] == len(test_preds)
    probs = preds[[f"p_{r}" for r in REGIONS]].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert set(preds["region"]) <= {*REGIONS, UNKNOWN}
    assert set(preds["true_region"]) <= {*REGIONS, OTHER}
    assert list(preds.columns[:2]) == ["path", "true_region"]
    assert {"regions", "split", "source", "patient_id"} <= set(preds.columns)


def test_eval_auroc_matches_training_test_metrics(evaluated, trained):
    """The same checkpoint on the same test split: evaluate agrees with trainer.test."""
    metrics = evaluated[1]
    trained_metrics = json.loads((trained / "metrics.json").read_text())
    for r in REGIONS:
        assert metrics[f"test/auroc/{r}"] == pytest.approx(
            trained_metrics[f"test/auroc/{r}"], abs=1e-5
        )


def test_confusion_counts_sum_to_image_count(evaluated):
    metrics = evaluated[1]
    for stage in ("test", "external"):
        block = metrics["confusion"][stage]
        assert block["true"] == [*REGIONS, OTHER]
        assert block["predicted"] == [*REGIONS, UNKNOWN]
        counts = np.array(block["counts"])
        assert counts.sum() == metrics[f"{stage}/images"]
        for k, r in enumerate(block["true"]):
            assert counts[k].sum() == metrics[f"{stage}/images/{r}"]


def test_thresholds_round_trip_from_checkpoint(evaluated, trained):
    buffer = saved_thresholds(trained)
    metrics = evaluated[1]
    assert [metrics["thresholds"][r] for r in REGIONS] == buffer
    assert [metrics[f"test/threshold/{r}"] for r in REGIONS] == buffer
    assert metrics["threshold_method"] == "youden"


def test_external_folder_reported_and_unreadable_file_listed(evaluated, external):
    out, metrics = evaluated
    readable = sum(EXTERNAL.values())
    assert metrics["external/images"] == readable
    assert metrics["external/unreadable"] == 1
    assert metrics["external/images/other"] == EXTERNAL["chest"]
    for r in ("knee", "hand", "elbow"):
        assert 0 <= metrics[f"external/auroc/{r}"] <= 1
    # no shoulder or pelvis films: no AUROC, no sensitivity, listed by name
    assert metrics["external/heads_without_positives"] == ["shoulder", "pelvis"]
    assert "external/auroc/shoulder" not in metrics
    assert "external/sensitivity/pelvis" not in metrics
    errors = pd.read_csv(out / "errors.csv")
    assert errors["path"].tolist() == [str(external / "knee" / "broken.png")]
    assert errors["stage"].tolist() == ["external"]
    assert errors["reason"].str.len().min() > 0
    preds = pd.read_csv(out / "predictions.csv")
    assert (preds["split"] == "external").sum() == readable
    assert "broken.png" not in " ".join(preds["path"])


def test_model_card_written_by_train(trained):
    card = json.loads((trained / "checkpoints" / "model_card.json").read_text())
    assert [r["name"] for r in card["regions"]] == list(REGIONS)
    assert [r["head"] for r in card["regions"]] == list(range(len(REGIONS)))
    assert card["regions"][4]["snomed_ct"] == region_info("knee").snomed
    assert card["regions"][3]["dicom_body_part_examined"] == "PELVIS"
    assert list(card["thresholds"].values()) == saved_thresholds(trained)
    inputs = card["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == 1 and inputs["spatial_shape"] == [32, 32]
    outputs = card["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert list(outputs.values()) == list(REGIONS)
    assert card["training_data"]["sources"] == {"phantom": card["training_data"]["images"]}
    assert "test/auroc_mean" in card["eval_metrics"]
    # every AUROC comes with the positives it rests on
    for r, head in card["auroc_per_head"]["test"].items():
        assert head["positives"] == card["eval_metrics"][f"test/positives/{r}"]
        assert head["text"].endswith(f"n+={head['positives']}")
    assert any("SYNTHETIC" in limit for limit in card["known_limits"])
    assert "Not for diagnosis" in card["intended_use"]


# -- evaluate() errors ----------------------------------------------------------------------
def test_wrong_ckpt_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "best.ckpt"
    with pytest.raises(FileNotFoundError, match=f"ckpt_path=.*{re.escape(str(missing))}"):
        evaluate(eval_config(missing, tmp_path / "out"))


def test_region_set_other_than_the_heads_fails(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    with pytest.raises(ValueError, match=r"data.regions \['hand', 'knee'\] differ from the heads"):
        evaluate(eval_config(ckpt, tmp_path, "data.regions=[hand,knee]"))


def test_checkpoint_outside_a_run_needs_data(trained, tmp_path):
    lone = tmp_path / "model.ckpt"
    shutil.copy(trained / "checkpoints" / "best.ckpt", lone)
    with pytest.raises(FileNotFoundError, match="config.yaml.*data=folder"):
        evaluate(eval_config(lone, tmp_path / "out"))


def test_unknown_split_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="split='train'"):
        evaluate(eval_config(tmp_path / "x.ckpt", tmp_path, "split=train"))


def test_cli_evaluates_the_validation_split(trained, tmp_path):
    """`regionnet-eval` through Hydra, with the W&B code path (disabled, so no network)."""
    out = tmp_path / "cli"
    args = [
        f"ckpt_path={trained / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={out}",
        "split=val",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "bootstrap.resamples=100",
        "logger=wandb",
    ]
    code = "from regionnet.cli import eval_main; eval_main()"
    env_run = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bootstrap"]["resamples"] == 100
    assert "val/auroc_mean" in metrics and not any(k.startswith("test/") for k in metrics)
    assert set(pd.read_csv(out / "predictions.csv")["split"]) == {"val"}


# -- reporting functions on synthetic arrays ------------------------------------------------
def test_separable_scores_give_auroc_one_and_ci_one():
    y = np.array([0] * 20 + [1] * 10)
    p = np.concatenate([np.linspace(0, 0.4, 20), np.linspace(0.6, 1, 10)])
    assert auroc(y, p) == 1.0
    assert bootstrap_auroc_ci(y, p, resamples=1000, seed=0) == (1.0, 1.0)
    assert auroc(1 - y, p) == 0.0


def test_random_labels_give_auroc_near_half():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 2000), rng.random(2000)
    a = auroc(y, p)
    lo, hi = bootstrap_auroc_ci(y, p, resamples=1000, seed=0)
    assert abs(a - 0.5) < 0.05
    assert lo < 0.5 < hi and hi - lo < 0.1


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 2, 80), rng.random(80)
    assert bootstrap_auroc_ci(y, p, seed=3) == bootstrap_auroc_ci(y, p, seed=3)
    assert bootstrap_auroc_ci(y, p, seed=3) != bootstrap_auroc_ci(y, p, seed=4)


def test_patient_resampling_keeps_a_patients_images_together():
    groups = np.repeat([f"patient{i}" for i in range(10)], 3)  # 3 films per patient
    for idx in bootstrap_samples(len(groups), groups, resamples=50, seed=0):
        drawn = pd.Series(groups[idx]).value_counts()
        assert (drawn % 3 == 0).all()  # whole patients only
        assert len(idx) == len(groups)  # equal-sized patients: same image count


def test_resampling_unit_is_patient_only_with_patient_ids():
    paths = ["a.png", "b.png", "c.png"]
    assert resampling_unit(paths, paths) == "image"  # ids filled in from paths
    assert resampling_unit(["p1", "p1", "p2"], paths) == "patient"


def test_bootstrap_without_both_classes_gives_no_interval():
    assert auroc(np.ones(5), np.random.default_rng(0).random(5)) is None
    assert bootstrap_auroc_ci(np.zeros(5), np.linspace(0, 1, 5)) is None


def test_decide_most_probable_passing_head_or_unknown():
    regions = ("hand", "knee", "elbow")
    probs = np.array([[0.9, 0.2, 0.95], [0.6, 0.7, 0.1], [0.1, 0.2, 0.3]])
    thresholds = [0.5, 0.5, 0.99]  # elbow's 0.95 does not pass
    region, every = decide_all(probs, thresholds, regions)
    assert region == ["hand", "knee", UNKNOWN]
    assert every == ["hand", "hand;knee", ""]  # head order


def test_confusion_and_unknown_rate():
    regions = ("hand", "knee")
    true = ["hand", "hand", "knee", OTHER, OTHER, OTHER]
    pred = ["hand", "knee", "knee", UNKNOWN, "hand", UNKNOWN]
    block = confusion(true, pred, regions)
    assert block["counts"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert np.sum(block["counts"]) == len(true)
    assert unknown_rate_other(true, pred) == pytest.approx(2 / 3)
    assert unknown_rate_other(["hand"], ["hand"]) is None


def test_stage_metrics_on_arrays():
    regions = ("hand", "knee", "elbow")
    true = np.array(["hand"] * 4 + ["knee"] * 4 + [OTHER] * 4)
    labels = np.stack([true == r for r in regions], 1).astype(int)
    probs = np.where(labels == 1, 0.8, 0.2)
    probs[8:] = 0.1  # every `other` film below every threshold -> unknown
    m = stage_metrics("test", probs, labels, true, regions, [0.5] * 3, resamples=200)
    assert m["test/auroc/hand"] == m["test/auroc/knee"] == 1.0
    assert m["test/auroc_ci/hand"] == [1.0, 1.0]
    assert m["test/heads_without_positives"] == ["elbow"]
    assert "test/auroc/elbow" not in m and "test/sensitivity/elbow" not in m
    assert m["test/specificity/elbow"] == 1.0
    assert m["test/top1_acc"] == 1.0 and m["test/unknown_rate_other"] == 1.0
    assert m["test/images"] == 12 and m["test/images/other"] == 4
    assert m["test/auroc_mean"] == 1.0
    json.dumps(m)  # plain JSON values
