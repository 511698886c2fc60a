"""The findings section of the benchmark (regionnet.bench.findings, issue 18) on fake
evaluations: its training overrides compose, its figures carry names that say what they are
(findings.knee_oa.test_auroc, findings.boxes.map_50, ...), the paired region comparison, and
its RESULTS.md section, without training anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regionnet.bench import BenchSettings
from regionnet.bench.findings import (
    ANCHORS,
    KL_GRADE,
    box_figures,
    findings_markdown,
    flat_keys,
    grade_figures,
    kept_runs,
    knee_oa_figures,
    paired_region_delta,
    region_figures,
    run_overrides,
)
from regionnet.bench.paths import relativise
from regionnet.config import compose_config

REGIONS = ["shoulder", "elbow", "hand", "pelvis", "knee"]


def _eval_result() -> dict:
    """What regionnet-eval returns for a region + knee_oa + kl_grade checkpoint (a subset)."""
    out = {
        "regions": REGIONS,
        "threshold_method": "youden",
        "test/auroc_mean": 0.97,
        "test/auroc_min": 0.9,
        "test/top1_acc": 0.91,
        "test/unknown_rate_other": 0.3,
        "test/images": 470,
        "test/auroc/knee_oa": 0.85,
        "test/auroc_ci/knee_oa": [0.78, 0.91],
        "test/sensitivity/knee_oa": 0.8,
        "test/specificity/knee_oa": 0.7,
        "test/labelled/knee_oa": 113,
        "test/positives/knee_oa": 64,
        "test/accuracy/kl_grade": 0.5,
        "test/kappa/kl_grade": 0.7,
        "test/kappa_ci/kl_grade": [0.6, 0.8],
        "test/mae/kl_grade": 0.6,
        "test/labelled/kl_grade": 10,
        "test/confusion/kl_grade": [
            [2, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1],
        ],  # fmt: skip
    }
    for r in REGIONS:
        out[f"test/auroc/{r}"], out[f"test/auroc_ci/{r}"] = 0.95, (0.9, 0.99)
        out[f"test/acc/{r}"], out[f"test/positives/{r}"] = 0.9, 20
    return out


def _box_result() -> dict:
    return {
        "dataset": "spine_aasce",
        "test/map": 0.3,
        "test/map_50": 0.7,
        "test/map_75": 0.25,
        "test/mar_100": 0.4,
        "test/films": 72,
        "test/seconds_per_film": 0.2,
        "per_level": {"T1": {"ap": 0.2, "ap_50": 0.6}, "L5": {"ap": 0.35, "ap_50": 0.8}},
    }


def test_the_runs_compose_with_the_real_configs(tmp_path):
    s = BenchSettings(tmp_path / "data", tmp_path / "out", "32-true")
    knee = run_overrides(s, "knee_oa", tmp_path / "knee")
    assert "task=knee_oa" in knee and KL_GRADE in knee and "test=false" in knee
    assert any(o.startswith("trainer.max_time=") for o in knee)
    regions = run_overrides(s, "regions", tmp_path / "regions")
    assert "task=regions" in regions and KL_GRADE not in regions
    # same data, size, epochs and budget with and without the finding heads
    assert sorted(set(knee) - {"task=knee_oa", KL_GRADE, f"paths.output_dir={tmp_path}/knee"}) == (
        sorted(set(regions) - {"task=regions", f"paths.output_dir={tmp_path}/regions"})
    )
    binary = run_overrides(s, "knee_oa_binary", tmp_path / "binary")
    assert set(binary) == set(knee) - {KL_GRADE, f"paths.output_dir={tmp_path}/knee"} | {
        f"paths.output_dir={tmp_path}/binary"
    }
    assert set(compose_config("train", binary).model.findings) == {"knee_oa"}
    boxes = run_overrides(s, "boxes", tmp_path / "boxes")
    assert {"task=boxes", "data.dataset=spine_aasce", "test=false"} <= set(boxes)
    cfg = compose_config("train", knee)
    assert set(cfg.model.findings) == {"knee_oa", "kl_grade"}
    assert list(cfg.model.findings.kl_grade.grades) == ["KL0", "KL1", "KL2", "KL3", "KL4"]
    assert cfg.data.findings.kl_grade.region == "knee"
    assert compose_config("train", regions).model.findings is None
    assert compose_config("train", boxes).data.dataset == "spine_aasce"
    quick = s.quick_sized()
    assert quick.findings_minutes < s.findings_minutes == 90.0  # sized for 14 epochs at 224 px
    over = run_overrides(quick, "knee_oa", tmp_path / "q")
    assert over.count("test=false") == 1 and "trainer.max_epochs=1" in over


def test_paired_region_delta_resamples_patients_for_both_models(tmp_path):
    rng = np.random.default_rng(0)
    truth = ["knee"] * 6 + ["hand"] * 6 + ["other"] * 4
    rows = []
    for k, t in enumerate(truth):
        probs = {f"p_{r}": float(rng.uniform(0, 0.3)) for r in ["hand", "knee"]}
        if t != "other":
            probs[f"p_{t}"] = 0.9
        rows.append({"path": f"f{k}.png", "true_region": t, "split": "test",
                     "patient_id": f"p{k // 2}", **probs})  # fmt: skip
    good = pd.DataFrame(rows)
    worse = good.copy()
    worse.loc[0, "p_knee"], worse.loc[0, "p_hand"] = 0.1, 0.95  # one knee called hand
    good.to_csv(tmp_path / "with.csv", index=False)
    worse.to_csv(tmp_path / "without.csv", index=False)
    d = paired_region_delta(tmp_path / "with.csv", tmp_path / "without.csv", ["hand", "knee"], 50)
    assert d["paired_films"] == 16 and d["same_films"]
    assert d["test_top1_acc_with"] == 1.0 and d["test_top1_acc_without"] == pytest.approx(11 / 12)
    assert d["delta_test_top1_acc"] == pytest.approx(1 / 12)
    assert d["delta_test_auroc_mean"] > 0
    lo, hi = d["delta_test_top1_acc_ci"]
    assert 0 <= lo <= d["delta_test_top1_acc"] <= hi < 1
    same = paired_region_delta(tmp_path / "with.csv", tmp_path / "with.csv", ["hand", "knee"], 20)
    assert same["delta_test_auroc_mean"] == 0 and same["delta_test_auroc_mean_ci"] == [0, 0]


def test_findings_section_names_its_figures_for_what_they_are(tmp_path):
    result = _eval_result()
    run = {
        "task": "knee_oa",
        "epochs": 3,
        "max_epochs": 4,
        "train_seconds": 400.0,
        "budget_minutes": 7.0,
        "checkpoint_epoch": 3,
        "checkpoint_monitor": "val/auroc_mean",
        "params": 3.4e6,
        "train_films_per_s": 9.0,
        "checkpoint": str(tmp_path / "out/artifacts/findings/knee_oa/checkpoints/best.ckpt"),
    }
    res = {
        "settings": {"backbone": "tf_efficientnet_lite0", "pretrained": "ImageNet",
                     "image_size": 160, "box_image_size": 256, "region_batch_size": 32,
                     "box_batch_size": 8, "precision": "32-true", "budget_minutes": 25},
        "anchors": ANCHORS,
        "runs": {"knee_oa": run, "regions": {**run, "task": "regions"},
                 "boxes": {"skipped": "no landmark data"}},
        "knee_oa": knee_oa_figures(result, 0.42),
        "kl_grade": grade_figures(result),
        "region_accuracy": {
            "with_finding_heads": region_figures(result),
            "without_finding_heads": region_figures({**result, "test/auroc_mean": 0.96}),
            "same_split": True,
            "paired": {"paired_films": 470, "delta_test_auroc_mean": 0.01,
                       "delta_test_auroc_mean_ci": [-0.01, 0.03]},
            "with_knee_oa_head_only": region_figures({**result, "test/top1_acc": 0.8}),
            "paired_knee_oa_head_only": {"paired_films": 470, "delta_test_top1_acc": -0.11,
                                         "delta_test_top1_acc_ci": [-0.2, -0.05]},
        },
        "knee_oa_head_only": knee_oa_figures({**result, "test/auroc/knee_oa": 0.81}, 0.5),
        "boxes": box_figures(_box_result()),
        "predict": {"regions": {"films": 470, "ms_per_film": 30.0, "films_per_s": 33.3,
                                "seconds_per_pass": [14.1, 14.3]},
                    "knee_oa": {"films": 470, "ms_per_film": 30.5, "films_per_s": 32.8,
                                "seconds_per_pass": [14.3, 14.4]},
                    "finding_heads_extra_ms_per_film": 0.5, "finding_heads_extra_pct": 1.7,
                    "network": {"image_size": 160, "network_ms_per_film_region_heads": 10.0,
                                "network_ms_per_film_with_finding_heads": 10.1},
                    "finding_heads_params": 1286},
        "wall_seconds": 1500.0,
    }  # fmt: skip
    keys = flat_keys(res)
    assert keys["findings.knee_oa.test_auroc"] == 0.85
    assert keys["findings.knee_oa.threshold"] == 0.42
    assert keys["findings.kl_grade.test_kappa_quadratic"] == 0.7
    assert keys["findings.kl_grade.test_mae_grades"] == 0.6
    assert keys["findings.boxes.map_50"] == 0.7 and keys["findings.boxes.map_50_95"] == 0.3
    assert keys["findings.boxes.per_level.L5.ap_50"] == 0.8
    assert keys["findings.boxes.per_level.T1.ap_50_95"] == 0.2
    assert keys["findings.region_accuracy.without_finding_heads.test_auroc_mean"] == 0.96
    assert keys["findings.region_accuracy.paired.delta_test_auroc_mean"] == 0.01
    assert keys["findings.predict.knee_oa.ms_per_film"] == 30.5
    assert res["knee_oa"]["test_auroc_ci"] == [0.78, 0.91]
    assert res["kl_grade"]["test_majority_grade_share"] == pytest.approx(3 / 9)
    assert "not of lesions" in res["boxes"]["what"]

    text = "\n".join(findings_markdown(res))
    assert "## Findings and boxes (issue 18)" in text
    assert "88.61 %" in text and "0.93" in text and "0.850 [0.780, 0.910]" in text
    assert "not of lesions" in text and "| AP@0.5 | 0.60 | 0.80 |" in text
    assert "| KL0 | 2 | 1 | 0 | 0 | 0 |" in text
    assert "boxes: skipped" in text
    assert "| test top-1 accuracy | 0.910 | 0.910 | 0.800 | n/a | -0.110 [-0.200, -0.050] |" in text
    assert "knee_oa head alone (`task=knee_oa`, no KL-grade head) | 0.810" in text
    paths = [
        {"repo": str(Path.cwd()), "out": str(tmp_path / "out"), "data": str(tmp_path / "data")}
    ]
    rel = relativise(text, paths)
    assert str(tmp_path) not in rel and "`<out>/artifacts/findings/knee_oa/" in rel


def test_findings_runs_keep_the_other_runs_records_and_evaluations(tmp_path):
    """--findings-runs: the runs not named come from results.json (marked) with their
    evaluations from artifacts/findings/<run>/eval; a missing one or an unknown name stops."""
    import json

    from regionnet.bench.findings import RUNS, _earlier, _run_line

    out = tmp_path / "out"
    root = out / "artifacts" / "findings"
    record = {"task": "knee_oa", "epochs": 5, "max_epochs": 5, "train_seconds": 300.0,
              "budget_minutes": 9.0, "checkpoint_epoch": 5, "checkpoint_monitor": "val/auroc_mean",
              "params": 3.4e6, "run_dir": "benchmarks/artifacts/findings/x",
              "checkpoint": "benchmarks/artifacts/findings/x/checkpoints/best.ckpt"}  # fmt: skip
    runs = {r: {**record, "task": RUNS[r]["task"]} for r in RUNS}
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"findings": {"runs": runs}}))
    for r in RUNS:
        (root / r / "eval").mkdir(parents=True)
        (root / r / "eval" / "metrics.json").write_text(json.dumps({"test/auroc_mean": 0.9}))
    s = BenchSettings(tmp_path, out, "32-true", findings_runs=("knee_oa", "boxes"))
    kept = kept_runs(s, root)
    assert set(kept) == set(RUNS) - {"knee_oa", "boxes"}
    rec, evaluation = kept["knee_oa_separate"]
    assert evaluation == {"test/auroc_mean": 0.9} and rec["from_earlier_run"]
    assert rec["run_dir"] == str(root / "knee_oa_separate")
    assert rec["checkpoint"] == str(root / "knee_oa_separate" / "checkpoints" / "best.ckpt")
    assert "kept from an earlier run" in _run_line("knee_oa_separate", rec)
    fd = {"runs": {"knee_oa_separate": rec, "knee_oa": record}}
    assert "5 of 5 epochs, checkpoint by `val/auroc_mean`" in _earlier(fd, "knee_oa_separate")
    assert _earlier(fd, "knee_oa") == ""  # trained by this run: no note
    assert kept_runs(BenchSettings(tmp_path, out, "32-true"), root) == {}  # all runs train

    (root / "regions" / "eval" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="add regions to --findings-runs"):
        kept_runs(s, root)
    with pytest.raises(ValueError, match="--findings-runs"):
        kept_runs(BenchSettings(tmp_path, out, "32-true", findings_runs=("knees",)), root)


def test_a_run_line_says_what_stopped_the_run_early():
    """Early stopping ends a run after a whole epoch; the wall-clock budget within one."""
    from regionnet.bench.findings import _run_line

    run = {"task": "knee_oa", "epochs": 9, "max_epochs": 14, "train_seconds": 770.0,
           "budget_minutes": 25.2, "checkpoint_epoch": 4, "checkpoint_monitor": "val/auroc_mean",
           "params": 3.4e6, "checkpoint": "best.ckpt"}  # fmt: skip
    early = _run_line("a", {**run, "timeline": [{"step": 9 * 39, "steps_per_epoch": 39}]})
    assert "9 of 14 epochs (early stopping ended it)" in early and "budget cut" not in early
    cut = _run_line("a", {**run, "timeline": [{"step": 9 * 39 - 5, "steps_per_epoch": 39}]})
    assert "346 steps of 39 per epoch: the budget cut the last epoch" in cut
    full = _run_line("a", {**run, "epochs": 14, "timeline": [{"step": 546, "steps_per_epoch": 39}]})
    assert "14 of 14 epochs in" in full
