"""The findings section (issue 18): finding heads on the region model, and vertebra boxes.

Four trainings, each `regionnet-train` (`regionnet.train.train` with the real configs, no
second loop) under a wall-clock budget (`trainer.max_time`, a share of `--findings-minutes`),
then `regionnet-eval` of its best checkpoint on the run's held-out test patients (the data
modules' own patient-grouped splits, `split.csv` in each run):

  knee_oa   task=knee_oa + an ordinal `kl_grade` head: the five region heads, the binary knee
            OA head (KL >= 2) and the KL-grade head (KL0..KL4) on one backbone, one checkpoint
  knee_oa_binary  task=knee_oa as it is: the region heads and the binary knee OA head alone
  regions   task=regions: the same data, split, input size, epochs and budget without finding
            heads, so the runs give "does adding the finding heads change region accuracy?"
  boxes     task=boxes on landmarks/spine_aasce: FCOS boxes of the vertebrae T1..L5 (boxes
            of vertebrae, not of lesions), mAP@0.5 and mAP@[.5:.95] with per-level AP

Then the time per film of `regionnet.load_model(ckpt).predict(paths)` over each run's test
films (the region checkpoints on the same films, alternated, best of two), and the
network-only cost of the finding heads (the knee_oa model's forward with and without them).

Runs live in `<out>/artifacts/findings/<run>/` (git-ignored); their `checkpoints/best.ckpt`
load with `regionnet.load_model`. Anchors printed beside the figures: VinDr-SpineXR's
image-level "abnormal spine" AUROC 88.61 % (Nguyen et al. 2021, its own credentialed data,
not reachable here) and published knee OA detection from radiographs at AUROC about 0.93.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from regionnet.bench.keys import flat_keys as numbered_keys
from regionnet.bench.protocol import protocol_overrides, timed_evaluate
from regionnet.bench.settings import QUICK_SIZE, BenchSettings, FineTune, log
from regionnet.bench.timeline import Timeline, max_time
from regionnet.config import compose_config
from regionnet.train import train

GRADES = ["KL0", "KL1", "KL2", "KL3", "KL4"]
#: the ordinal head added to task=knee_oa's binary knee_oa head (README "Findings heads")
KL_GRADE = (
    "+model.findings.kl_grade={region: knee, from: finding, grades: [KL0, KL1, KL2, KL3, KL4]}"
)
#: run -> task and its share of --findings-minutes: each region run gets the same budget, so
#: the shares add up to 1.70 (90 min: 25 min per region run, 50 for the separate backbone,
#: 27 for boxes; ~110 min of training on an idle 2-core machine), then evaluations and predict
#: timing. `--findings-runs` trains some and keeps the others (`kept_runs`)
RUNS = {
    "knee_oa": {"task": "knee_oa", "share": 0.28},
    "knee_oa_binary": {"task": "knee_oa", "share": 0.28},
    "regions": {"task": "regions", "share": 0.28},
    # knee_oa's heads on a backbone of their own (model.finding_backbone=separate): twice the
    # backbone work per step, so twice the share, for the same epochs
    "knee_oa_separate": {"task": "knee_oa", "share": 0.56},
    "boxes": {"task": "boxes", "share": 0.30},
}
#: input size (px) of the region runs: the knee crops' own 224 px, so the knee OA and KL-grade
#: heads see the joint space at full resolution (128 px gave knee OA AUROC 0.914 with a wide
#: seed spread). An idle 2-core machine trains ~14 films/s at 224 px (~100 s per epoch of the
#: 1,254 training films with validation), half that with model.finding_backbone=separate
IMAGE_SIZE = 224
#: input size of the box run (1024 px spine films letterboxed; conf/data/landmarks.yaml's)
BOX_IMAGE_SIZE = 256
REGION_BATCH = 32
BOX_BATCH = 8
#: epochs of each run's cosine schedule (trainer.max_epochs); trainer.max_time stops earlier.
#: 14: at 5 epochs the knee OA head was still improving (validation AUROC 0.91 at epoch 5,
#: 0.93-0.95 over epochs 8-12 of a 14-epoch trial) and the box run used a third of its budget.
#: Sized for --findings-minutes 90 on an idle 2-core machine: ~95 s per region epoch with
#: validation (22 of 25 minutes), ~160 s with the separate backbone (37 of 50), ~40 s per box
#: epoch (9 of 27)
EPOCHS = {"knee_oa": 14, "knee_oa_binary": 14, "regions": 14, "knee_oa_separate": 14, "boxes": 14}
#: --quick: box films (patient split of the first ones), batches per epoch, box input size
QUICK_FILMS = 30
QUICK_BATCHES = 2
QUICK_BOX_SIZE = 64
#: bootstrap resamples of the paired region comparison (--quick: fewer)
RESAMPLES = 1000

ANCHORS = {
    "vindr_spinexr_image_level_auroc": {
        "value": 0.8861,
        "ci": [0.8719, 0.9002],
        "what": "VinDr-SpineXR (Nguyen et al. 2021): image-level abnormal spine radiograph, "
        "its own credentialed data (not reachable here)",
    },
    "published_knee_oa_auroc": {
        "value": 0.93,
        "what": "published knee OA (KL >= 2) detection from radiographs, about 0.93",
    },
    "vindr_spinexr_lesion_map_50": {
        "value": 0.3356,
        "what": "VinDr-SpineXR's detector, mAP@0.5 over 7 kinds of LESION box: not comparable "
        "with the vertebra boxes here",
    },
}
BOX_NOTE = "boxes of vertebrae (T1..L5, from the annotated corners), not of lesions"


#: per run, what its timeline records each epoch; the first is the checkpoint's monitor (the
#: runs with a knee_oa head follow task=knee_oa's val/auroc_mean_all)
_KNEE_OA = ("val/auroc_mean_all", "val/auroc_mean", "val/top1_acc", "val/auroc/knee_oa")
_WITH_GRADES = (*_KNEE_OA, "val/kappa/kl_grade")
MONITORS = {
    "knee_oa": _WITH_GRADES,
    "knee_oa_binary": _KNEE_OA,
    "regions": ("val/auroc_mean", "val/top1_acc"),
    "knee_oa_separate": _WITH_GRADES,
    "boxes": ("val/map_50", "val/map"),
}


#: the runs whose region heads are compared with task=regions': (run, key of its figures,
#: key of the paired differences, column label)
REGION_VARIANTS = (
    ("knee_oa", "with_finding_heads", "paired", "task=knee_oa + kl_grade"),
    ("knee_oa_binary", "with_knee_oa_head_only", "paired_knee_oa_head_only", "task=knee_oa"),
    ("knee_oa_separate", "with_finding_heads_separate_backbone", "paired_separate_backbone",
     "task=knee_oa + kl_grade, finding_backbone=separate"),
)  # fmt: skip


def run_minutes(settings: BenchSettings, run: str) -> float:
    return settings.findings_minutes * RUNS[run]["share"]


def max_epochs(settings: BenchSettings, run: str) -> int:
    return 1 if settings.quick else EPOCHS[run]


def run_overrides(settings: BenchSettings, run: str, run_dir: Path) -> list[str]:
    """regionnet-train overrides of one run (`RUNS`)."""
    budget = [
        f"trainer.max_epochs={max_epochs(settings, run)}",
        f"trainer.max_time={max_time(run_minutes(settings, run))}",
        "trainer.accelerator=cpu",
        f"paths.output_dir={run_dir}",
    ]
    if run == "boxes":
        size = QUICK_BOX_SIZE if settings.quick else BOX_IMAGE_SIZE
        out = [
            "task=boxes",
            f"data.root={settings.data_dir / 'landmarks'}",
            "data.dataset=spine_aasce",
            f"data.image_size={size}",
            f"data.batch_size={BOX_BATCH}",
            f"data.num_workers={settings.num_workers}",
            f"trainer.precision={settings.precision}",
            "logger=csv",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            *budget,
            "test=false",  # regionnet-eval tests the best checkpoint
        ]
        if settings.quick:
            out += [
                f"data.limit={QUICK_FILMS}",
                f"trainer.limit_train_batches={QUICK_BATCHES}",
                f"trainer.limit_val_batches={QUICK_BATCHES}",
            ]
        return out
    size = QUICK_SIZE if settings.quick else IMAGE_SIZE
    base = protocol_overrides(settings, FineTune(size, max_epochs(settings, run), 1))
    base = [o for o in base if not o.startswith("trainer.max_epochs=")]
    out = [f"task={RUNS[run]['task']}", *base, f"data.batch_size={REGION_BATCH}", *budget]
    if run in ("knee_oa", "knee_oa_separate"):
        out.append(KL_GRADE)
    if run == "knee_oa_separate":
        out.append("model.finding_backbone=separate")
    if "test=false" not in out:  # --quick's protocol_overrides already has it
        out.append("test=false")
    return out


def train_run(settings: BenchSettings, run: str, root: Path) -> dict:
    """Train one run and evaluate its best checkpoint on its test patients."""
    run_dir = root / run
    return train_and_evaluate(
        settings, "findings", run, run_dir, run_overrides(settings, run, run_dir),
        MONITORS[run], RUNS[run]["task"], run_minutes(settings, run), max_epochs(settings, run),
    )  # fmt: skip


def train_and_evaluate(
    settings: BenchSettings,
    section: str,
    run: str,
    run_dir: Path,
    overrides: list[str],
    monitors: tuple[str, ...],
    task: str,
    budget_minutes: float,
    epochs: int,
    mode: str = "max",
) -> dict:
    """`regionnet-train` with `overrides` into `run_dir` (afresh), then `regionnet-eval` of
    its best checkpoint on the run's test patients: the run's record (epochs, time, the
    checkpoint's epoch by `monitors[0]`, higher better or, `mode="min"`, lower, ...) and,
    under `_result`, the evaluation."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun trains afresh (skip_if_done)
    log(f"{section}: {run}: regionnet-train {' '.join(overrides)}")
    timeline = Timeline(monitors)
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides), extra_callbacks=[timeline])
    train_s = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    eval_over = ["bootstrap.resamples=100"] if settings.quick else []
    result, eval_s = timed_evaluate(ckpt, run_dir / "eval", eval_over, settings.num_workers)
    monitor = monitors[0]
    scores = [p.get(monitor) for p in timeline.points]
    picked = None
    if any(s is not None for s in scores):  # ModelCheckpoint keeps the first best (strict)
        best = (max if mode == "max" else min)(s for s in scores if s is not None)
        picked = timeline.points[scores.index(best)]["epoch"]
    out = {
        "task": task,
        "overrides": overrides,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "budget_minutes": round(budget_minutes, 2),
        "max_epochs": epochs,
        "epochs": timeline.points[-1]["epoch"] if timeline.points else 0,
        "checkpoint_epoch": picked,
        "checkpoint_monitor": monitor,
        "train_seconds": round(train_s, 1),
        "train_films_per_s": timeline.films_per_s,
        "timeline": timeline.points,
        "params": metrics.get("model/params"),
        "eval_seconds": round(eval_s, 1),
    }
    log(
        f"{section}: {run}: {out['epochs']} epochs in {train_s / 60:.1f} min, checkpoint of "
        f"epoch {picked} ({monitor})"
    )
    return out | {"_result": result}


# -- figures from the evaluations ----------------------------------------------------------------
def _ci(value) -> list[float] | None:
    return [float(c) for c in value] if value is not None else None


def region_figures(result: dict, stage: str = "test") -> dict:
    """Region heads on the test split: AUROC mean/min, top-1 accuracy (argmax over the heads,
    films of a head's region), `other` films called unknown, and per region AUROC with its CI,
    accuracy and sensitivity at the validation threshold."""
    regions = list(result.get("regions", []))
    out = {
        "test_auroc_mean": result.get(f"{stage}/auroc_mean"),
        "test_auroc_min": result.get(f"{stage}/auroc_min"),
        "test_top1_acc": result.get(f"{stage}/top1_acc"),
        "test_unknown_rate_other": result.get(f"{stage}/unknown_rate_other"),
        "test_films": result.get(f"{stage}/images"),
        "per_region": {},
    }
    for r in regions:
        out["per_region"][r] = {
            "test_auroc": result.get(f"{stage}/auroc/{r}"),
            "test_auroc_ci": _ci(result.get(f"{stage}/auroc_ci/{r}")),
            "test_acc": result.get(f"{stage}/acc/{r}"),
            "test_sensitivity": result.get(f"{stage}/sensitivity/{r}"),
            "test_positives": result.get(f"{stage}/positives/{r}"),
        }
    return out


def knee_oa_figures(result: dict, threshold: float | None, name: str = "knee_oa") -> dict:
    """The binary finding on its labelled test films: AUROC with its patient-bootstrap 95 %
    CI, sensitivity and specificity at the threshold chosen on validation."""
    stage = "test"
    return {
        "test_auroc": result.get(f"{stage}/auroc/{name}"),
        "test_auroc_ci": _ci(result.get(f"{stage}/auroc_ci/{name}")),
        "test_sensitivity": result.get(f"{stage}/sensitivity/{name}"),
        "test_specificity": result.get(f"{stage}/specificity/{name}"),
        "threshold": threshold,
        "threshold_method": result.get("threshold_method"),
        "test_labelled": result.get(f"{stage}/labelled/{name}"),
        "test_positives": result.get(f"{stage}/positives/{name}"),
        "definition": "Kellgren-Lawrence grade >= 2 (KL2, KL3, KL4) on knee films",
    }


def grade_figures(result: dict, name: str = "kl_grade") -> dict:
    """The ordinal finding on its graded test films: exact-grade accuracy, quadratic-weighted
    kappa with its patient-bootstrap CI, mean absolute grade error, the confusion matrix
    (rows = true grade, columns = predicted) and the share of the commonest true grade."""
    stage = "test"
    confusion = result.get(f"{stage}/confusion/{name}")
    majority = None
    if confusion:
        rows = np.asarray(confusion).sum(1)
        majority = float(rows.max() / rows.sum()) if rows.sum() else None
    return {
        "grades": GRADES,
        "test_accuracy": result.get(f"{stage}/accuracy/{name}"),
        "test_kappa_quadratic": result.get(f"{stage}/kappa/{name}"),
        "test_kappa_quadratic_ci": _ci(result.get(f"{stage}/kappa_ci/{name}")),
        "test_mae_grades": result.get(f"{stage}/mae/{name}"),
        "test_labelled": result.get(f"{stage}/labelled/{name}"),
        "test_confusion": confusion,
        "test_majority_grade_share": majority,
    }


def box_figures(result: dict) -> dict:
    """The box evaluation's test figures: mAP@0.5, mAP@[.5:.95], mAP@0.75, mAR@100 and
    per level AP@0.5 and AP@[.5:.95]."""
    stage = "test"
    per_level = {
        level: {"ap_50": v.get("ap_50"), "ap_50_95": v.get("ap")}
        for level, v in (result.get("per_level") or {}).items()
    }
    return {
        "what": BOX_NOTE,
        "dataset": result.get("dataset"),
        "map_50": result.get(f"{stage}/map_50"),
        "map_50_95": result.get(f"{stage}/map"),
        "map_75": result.get(f"{stage}/map_75"),
        "mar_100": result.get(f"{stage}/mar_100"),
        "test_films": result.get(f"{stage}/films"),
        "eval_seconds_per_film": result.get(f"{stage}/seconds_per_film"),
        "per_level": per_level,
    }


def _auroc_mean(y: np.ndarray, p: np.ndarray) -> float | None:
    from regionnet.reporting import auroc

    values = [a for k in range(y.shape[1]) if (a := auroc(y[:, k], p[:, k])) is not None]
    return float(np.mean(values)) if values else None


def _top1(truth: np.ndarray, p: np.ndarray) -> float | None:
    inset = truth >= 0
    return float((p[inset].argmax(1) == truth[inset]).mean()) if inset.any() else None


def paired_region_delta(
    with_csv: Path, without_csv: Path, regions: list[str], resamples: int, seed: int = 0
) -> dict:
    """Test region AUROC mean and top-1 accuracy of the two runs on the films both tested
    (their predictions.csv), the difference (with - without) and its paired patient-bootstrap
    95 % interval: one set of resampled patients serves both models."""
    from regionnet.reporting import bootstrap_samples

    a, b = pd.read_csv(with_csv), pd.read_csv(without_csv)
    a, b = a[a["split"] == "test"], b[b["split"] == "test"]
    both = a.merge(b, on="path", suffixes=("_with", "_without"))
    if both.empty:
        return {"paired_films": 0}
    truth_region = both["true_region_with"].astype(str)
    y = np.stack([(truth_region == r).to_numpy() for r in regions], 1).astype(int)
    truth = np.array([regions.index(t) if t in regions else -1 for t in truth_region])
    pa = both[[f"p_{r}_with" for r in regions]].to_numpy(float)
    pb = both[[f"p_{r}_without" for r in regions]].to_numpy(float)

    def figures(idx) -> tuple:
        ma, mb = _auroc_mean(y[idx], pa[idx]), _auroc_mean(y[idx], pb[idx])
        ta, tb = _top1(truth[idx], pa[idx]), _top1(truth[idx], pb[idx])
        return (
            None if ma is None or mb is None else ma - mb,
            None if ta is None or tb is None else ta - tb,
        )

    every = np.arange(len(both))
    d_auroc, d_top1 = figures(every)
    samples = bootstrap_samples(len(both), both["patient_id_with"].astype(str).to_numpy(),
                                resamples, seed)  # fmt: skip
    draws = [figures(idx) for idx in samples]

    def interval(k: int) -> list[float] | None:
        values = [d[k] for d in draws if d[k] is not None]
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None

    return {
        "paired_films": len(both),
        "same_films": len(both) == len(a) == len(b),
        "test_auroc_mean_with": _auroc_mean(y, pa),
        "test_auroc_mean_without": _auroc_mean(y, pb),
        "test_top1_acc_with": _top1(truth, pa),
        "test_top1_acc_without": _top1(truth, pb),
        "delta_test_auroc_mean": d_auroc,
        "delta_test_auroc_mean_ci": interval(0),
        "delta_test_top1_acc": d_top1,
        "delta_test_top1_acc_ci": interval(1),
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient", "paired": True},
    }


# -- time per film ---------------------------------------------------------------------------------
def predict_times(ckpts: dict[str, Path], paths: list[str], repeats: int = 2) -> dict:
    """`regionnet.load_model(ckpt).predict(paths)` per checkpoint over the same films, after
    one warm-up film each, the checkpoints alternated `repeats` times; the best pass counts
    (the machine's other jobs only ever slow a pass down)."""
    import regionnet

    models = {name: regionnet.load_model(ckpt) for name, ckpt in ckpts.items()}
    for model in models.values():
        model.predict(paths[:1])
    seconds: dict[str, list[float]] = {name: [] for name in models}
    found: dict[str, list] = {}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            found[name] = model.predict(paths)
            seconds[name].append(time.perf_counter() - start)
    out = {}
    for name, s in seconds.items():
        best = min(s)
        out[name] = {
            "films": len(paths),
            "seconds_per_pass": [round(x, 2) for x in s],
            "ms_per_film": 1000 * best / max(len(paths), 1),
            "films_per_s": len(paths) / best if best > 0 else None,
            "errors": sum(1 for p in found[name] if getattr(p, "error", None)),
        }
    out["torch_threads"] = torch.get_num_threads()
    return out


def head_cost(ckpt: Path, image_size: int, batch: int = 16, repeats: int = 10) -> dict:
    """Network-only milliseconds per film of the knee_oa model at its input size, backbone +
    region heads (`RegionNet.logits`) vs backbone + region heads + finding heads
    (`_all_logits`, what eval and predict run): the finding heads' own cost, without the
    reading and resizing that dominate predict."""
    from regionnet.model.module import load_regionnet

    model = load_regionnet(ckpt).eval()
    x = torch.randn(batch, 1, image_size, image_size)

    times: dict[str, list[float]] = {"regions": [], "findings": []}
    calls = {"regions": model.logits, "findings": model._all_logits}
    with torch.inference_mode():
        for fn in calls.values():
            fn(x)
        for _ in range(repeats):  # alternated: a burst of the machine's other jobs hits both
            for name, fn in calls.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    regions_only, with_findings = (1000 * min(times[k]) / batch for k in calls)
    heads = getattr(model.net, "finding_heads", None)
    return {
        "batch": batch,
        "image_size": image_size,
        "network_ms_per_film_region_heads": regions_only,
        "network_ms_per_film_with_finding_heads": with_findings,
        "finding_heads_params": sum(p.numel() for p in heads.parameters()) if heads else 0,
    }


def region_comparison(settings: BenchSettings, runs: dict, results: dict) -> dict:
    """Region figures of task=regions beside those of the runs with finding heads (knee_oa +
    kl_grade: `with_finding_heads`, `paired`; the binary knee_oa head alone:
    `with_knee_oa_head_only`, `paired_knee_oa_head_only`), the paired differences with their
    patient-bootstrap intervals."""
    without = Path(runs["regions"]["run_dir"])
    regions = list(results["regions"]["regions"])
    out: dict = {
        "without_finding_heads": region_figures(results["regions"]),
        "with_finding_heads_are": "knee_oa (binary) + kl_grade (ordinal, KL0..KL4)",
    }
    same = []
    for run, figures, paired, _ in REGION_VARIANTS:
        if run not in results:
            continue
        with_dir = Path(runs[run]["run_dir"])
        out[figures] = region_figures(results[run])
        out[paired] = paired_region_delta(
            with_dir / "eval" / "predictions.csv",
            without / "eval" / "predictions.csv",
            regions,
            50 if settings.quick else RESAMPLES,
        )
        same.append(_same_split(with_dir, without))
    out["same_split"] = all(same)
    return out


def held_out_paths(run_dir: Path, root: Path | None = None) -> list[str]:
    """The test films of a run's split.csv (relative paths resolved against `root`)."""
    split = pd.read_csv(run_dir / "split.csv")
    paths = split.loc[split["split"] == "test", "path"].astype(str)
    return [p if root is None or Path(p).is_absolute() else str(root / p) for p in paths]


def _same_split(a: Path, b: Path) -> bool:
    sa = pd.read_csv(a / "split.csv")[["path", "split"]].sort_values("path")
    sb = pd.read_csv(b / "split.csv")[["path", "split"]].sort_values("path")
    return sa.reset_index(drop=True).equals(sb.reset_index(drop=True))


def kept_runs(settings: BenchSettings, root: Path) -> dict[str, tuple[dict, dict]]:
    """Where only some runs train (`--findings-runs`): each other run's record from
    `<out>/results.json`, marked `from_earlier_run`, and its evaluation from
    `<root>/<run>/eval/metrics.json` (its checkpoint and predictions stay where that run left
    them), so every figure is derived as if it had run now."""
    if not settings.findings_runs:
        return {}
    unknown = sorted(set(settings.findings_runs) - set(RUNS))
    if unknown:
        raise ValueError(f"--findings-runs {unknown}: use some of {', '.join(RUNS)}")
    previous = settings.out_dir / "results.json"
    old = json.loads(previous.read_text()).get("findings", {}) if previous.is_file() else {}
    kept = {}
    for run in RUNS:
        if run in settings.findings_runs:
            continue
        record, evaluation = old.get("runs", {}).get(run), root / run / "eval" / "metrics.json"
        if not record or "skipped" in record or not evaluation.is_file():
            raise FileNotFoundError(
                f"--findings-runs keeps {run} from an earlier run, but {previous} has no record "
                f"of it or {evaluation} is missing: add {run} to --findings-runs"
            )
        run_dir = root / run  # the record's paths are relative to the repository
        record = {**record, "run_dir": str(run_dir),
                  "checkpoint": str(run_dir / "checkpoints" / "best.ckpt"),
                  "from_earlier_run": True}  # fmt: skip
        kept[run] = (record, json.loads(evaluation.read_text()))
    return kept


def findings_section(settings: BenchSettings) -> dict:
    """Train, evaluate and time the runs (see the module docstring); the results dict."""
    from regionnet.model.module import load_regionnet

    root = settings.artifacts / "findings"
    start = time.perf_counter()
    res: dict = {
        "settings": {
            "backbone": compose_config("train", []).model.backbone,
            "pretrained": "ImageNet (installed package, no download)",
            "image_size": QUICK_SIZE if settings.quick else IMAGE_SIZE,
            "box_image_size": QUICK_BOX_SIZE if settings.quick else BOX_IMAGE_SIZE,
            "region_batch_size": REGION_BATCH,
            "box_batch_size": BOX_BATCH,
            "precision": settings.precision,
            "budget_minutes": settings.findings_minutes,
            "torch_threads": torch.get_num_threads(),
            "num_workers": settings.num_workers,
            "load_average_at_start": os.getloadavg()[0],
        },
        "anchors": ANCHORS,
        "runs": {},
    }
    have_regions = settings.manifest_csv.is_file()
    have_boxes = (settings.data_dir / "landmarks" / "manifest.csv").is_file()
    results: dict[str, dict] = {}
    kept = kept_runs(settings, root)
    for run in RUNS:
        if run in kept:
            res["runs"][run], results[run] = kept[run]
            continue
        if run == "boxes" and not have_boxes:
            res["runs"][run] = {"skipped": f"no landmark data under {settings.data_dir}"}
            continue
        if run != "boxes" and not have_regions:
            res["runs"][run] = {"skipped": f"no {settings.manifest_csv}"}
            continue
        values = train_run(settings, run, root)
        results[run] = values.pop("_result")
        res["runs"][run] = values
    if "knee_oa" in results:
        ckpt = Path(res["runs"]["knee_oa"]["checkpoint"])
        model = load_regionnet(ckpt)
        names = list(model.findings)
        threshold = float(model.finding_thresholds[names.index("knee_oa")])
        res["knee_oa"] = knee_oa_figures(results["knee_oa"], threshold)
        res["kl_grade"] = grade_figures(results["knee_oa"])
    if "knee_oa_binary" in results:
        model = load_regionnet(Path(res["runs"]["knee_oa_binary"]["checkpoint"]))
        threshold = float(model.finding_thresholds[list(model.findings).index("knee_oa")])
        res["knee_oa_head_only"] = knee_oa_figures(results["knee_oa_binary"], threshold)
    if "knee_oa_separate" in results:
        model = load_regionnet(Path(res["runs"]["knee_oa_separate"]["checkpoint"]))
        threshold = float(model.finding_thresholds[list(model.findings).index("knee_oa")])
        res["knee_oa_separate_backbone"] = knee_oa_figures(results["knee_oa_separate"], threshold)
        res["kl_grade_separate_backbone"] = grade_figures(results["knee_oa_separate"])
    if "regions" in results and ({"knee_oa", "knee_oa_binary", "knee_oa_separate"} & set(results)):
        res["region_accuracy"] = region_comparison(settings, res["runs"], results)
    if "boxes" in results:
        res["boxes"] = box_figures(results["boxes"])
    res["predict"] = {}
    region_runs = {r: Path(res["runs"][r]["checkpoint"])
                   for r in ("regions", "knee_oa", "knee_oa_binary") if r in results}  # fmt: skip
    if region_runs:
        paths = held_out_paths(Path(res["runs"][next(iter(region_runs))]["run_dir"]))
        if settings.quick:
            paths = paths[:16]
        log(f"findings: predict time per film, {len(paths)} test films, {list(region_runs)}")
        res["predict"].update(predict_times(region_runs, paths))
    if "boxes" in results:
        paths = held_out_paths(
            Path(res["runs"]["boxes"]["run_dir"]), settings.data_dir / "landmarks"
        )
        if settings.quick:
            paths = paths[:4]
        log(f"findings: predict time per film, {len(paths)} spine test films, boxes")
        res["predict"]["boxes"] = predict_times({"boxes": res["runs"]["boxes"]["checkpoint"]},
                                                paths, repeats=1)["boxes"]  # fmt: skip
    p = res["predict"]
    if "knee_oa" in p and "regions" in p:
        extra = p["knee_oa"]["ms_per_film"] - p["regions"]["ms_per_film"]
        p["finding_heads_extra_ms_per_film"] = extra
        p["finding_heads_extra_pct"] = 100 * extra / p["regions"]["ms_per_film"]
        size = res["settings"]["image_size"]
        p["network"] = head_cost(region_runs["knee_oa"], size)
        n = p["network"]
        n["finding_heads_extra_ms_per_film"] = (
            n["network_ms_per_film_with_finding_heads"] - n["network_ms_per_film_region_heads"]
        )
        with_p, without_p = (res["runs"][r]["params"] for r in ("knee_oa", "regions"))
        if with_p and without_p:
            p["finding_heads_params"] = int(with_p - without_p)
    res["settings"]["load_average_at_end"] = os.getloadavg()[0]
    res["wall_seconds"] = round(time.perf_counter() - start, 1)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    (settings.artifacts / "findings.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def flat_keys(res: dict, prefix: str = "findings") -> dict[str, object]:
    """The section's figures under dotted names, e.g. `findings.knee_oa.test_auroc`,
    `findings.kl_grade.test_kappa_quadratic`, `findings.boxes.map_50`,
    `findings.boxes.per_level.L1.ap_50`, `findings.region_accuracy.paired.delta_test_auroc_mean`,
    `findings.predict.knee_oa.ms_per_film` (lists and texts left out)."""
    return numbered_keys(res, prefix)


# -- RESULTS.md ----------------------------------------------------------------------------------
def _v(x, nd: int = 3, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.{nd}f}"


def _ci_text(ci, nd: int = 3, scale: float = 1.0) -> str:
    return f" [{ci[0] * scale:.{nd}f}, {ci[1] * scale:.{nd}f}]" if ci else ""


def _run_line(name: str, r: dict) -> str:
    if "skipped" in r:
        return f"- {name}: skipped ({r['skipped']})."
    fit = r.get("train_films_per_s")
    last = (r.get("timeline") or [{}])[-1]
    # a run that stopped before max_epochs: early stopping ends it after a whole epoch, the
    # budget (trainer.max_time) within one
    steps = ""
    if "step" in last and last["step"] < r["max_epochs"] * last["steps_per_epoch"]:
        whole = last["step"] % last["steps_per_epoch"] == 0
        steps = (
            " (early stopping ended it)"
            if whole
            else f" ({last['step']} steps of {last['steps_per_epoch']} per epoch: the budget "
            "cut the last epoch)"
        )
    earlier = " (kept from an earlier run of this section)" if r.get("from_earlier_run") else ""
    return (
        f"- {name}{earlier} (`task={r['task']}`): {r['epochs']} of {r['max_epochs']} epochs"
        f"{steps} in "
        f"{r['train_seconds'] / 60:.1f} min (budget {r['budget_minutes']:.1f} min"
        + (f", {fit:.1f} training films/s" if fit else "")
        + f"), checkpoint of epoch {r.get('checkpoint_epoch')} by `{r['checkpoint_monitor']}`, "
        f"{(r.get('params') or 0) / 1e6:.2f} M parameters; `{r['checkpoint']}`"
    )


def _earlier(fd: dict, run: str) -> str:
    """A note for figures of a run kept from an earlier run (`--findings-runs`), whose epochs
    and checkpoint rule may differ from this run's; empty otherwise."""
    r = fd.get("runs", {}).get(run, {})
    if not r.get("from_earlier_run"):
        return ""
    return (
        f" (kept from an earlier run: {r['epochs']} of {r['max_epochs']} epochs, checkpoint by "
        f"`{r['checkpoint_monitor']}`)"
    )


def _region_table(ra: dict, fd: dict | None = None) -> list[str]:
    """Region figures without and with finding heads, and the paired differences."""
    wo = ra["without_finding_heads"]
    fd = fd or {}
    cols = [(ra[f], ra[p], name + _earlier(fd, run))
            for run, f, p, name in REGION_VARIANTS if f in ra]  # fmt: skip
    head = " | ".join(name for _, _, name in cols)
    deltas = " | ".join(f"{name}: with - without [95 % CI]" for _, _, name in cols)
    lines = [
        "### Region heads with and without the finding heads (same data, split, size, budget)",
        "",
        f"| figure | task=regions | {head} | {deltas} |",
        "| --- |" + " ---: |" * (1 + 2 * len(cols)),
    ]
    for label, key, delta in (
        ("test AUROC mean", "test_auroc_mean", "delta_test_auroc_mean"),
        ("test top-1 accuracy", "test_top1_acc", "delta_test_top1_acc"),
        ("test AUROC min", "test_auroc_min", None),
        ("`other` called unknown", "test_unknown_rate_other", None),
    ):
        cells = [_v(wo[key])] + [_v(w[key]) for w, _, _ in cols]
        cells += [
            f"{_v(p.get(delta))}{_ci_text(p.get(f'{delta}_ci'))}" if delta else ""
            for _, p, _ in cols
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for r in wo["per_region"]:
        cells = [_v(wo["per_region"][r]["test_auroc"])]
        cells += [_v(w["per_region"].get(r, {}).get("test_auroc")) for w, _, _ in cols]
        lines.append(f"| AUROC {r} | " + " | ".join(cells + [""] * len(cols)) + " |")
    films = ", ".join(f"{p.get('paired_films')} ({name})" for _, p, name in cols)
    return lines + [
        "",
        f"Test films in both runs: {films}; same split: {ra['same_split']}. The intervals are "
        "paired patient bootstraps (one set of resampled patients for both models).",
        "",
    ]


def findings_markdown(fd: dict) -> list[str]:
    """The "Findings and boxes (issue 18)" section of RESULTS.md."""
    lines = ["## Findings and boxes (issue 18): knee OA, KL grade, vertebra boxes", ""]
    if "skipped" in fd:
        return lines + [f"Skipped: {fd['skipped']}.", ""]
    s = fd["settings"]
    lines += [
        f"`regionnet-train` with {s['backbone']} ({s['pretrained']}), region runs at "
        f"{s['image_size']} px (batch {s['region_batch_size']}), the box run at "
        f"{s['box_image_size']} px (batch {s['box_batch_size']}), {s['precision']}, a wall-clock "
        f"budget of {s['budget_minutes']:g} CPU minutes (`trainer.max_time` per run); then "
        "`regionnet-eval` of each best checkpoint on the run's held-out test patients. 95 % "
        f"intervals bootstrap whole patients. Section wall time {fd['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    a = fd["anchors"]
    if "knee_oa" in fd:
        k, v = fd["knee_oa"], a["vindr_spinexr_image_level_auroc"]
        lines += [
            f"### Knee OA ({k['definition']}; {k['test_labelled']} test knees, "
            f"{k['test_positives']} positive)",
            "",
            "| figure | value | anchor |",
            "| --- | ---: | --- |",
            f"| test AUROC | {_v(k['test_auroc'])}{_ci_text(k['test_auroc_ci'])} | "
            f"VinDr-SpineXR image-level {100 * v['value']:.2f} % [{100 * v['ci'][0]:.2f}, "
            f"{100 * v['ci'][1]:.2f}] (spine, its own data); published knee OA ≈ "
            f"{a['published_knee_oa_auroc']['value']:.2f} |",
            f"| sensitivity at the validation threshold ({_v(k['threshold'])}, "
            f"{k['threshold_method']}) | {_v(k['test_sensitivity'])} | |",
            f"| specificity at that threshold | {_v(k['test_specificity'])} | |",
        ]
        if "knee_oa_head_only" in fd:
            b = fd["knee_oa_head_only"]
            lines.append(
                f"| test AUROC of the knee_oa head alone (`task=knee_oa`, no KL-grade head) | "
                f"{_v(b['test_auroc'])}{_ci_text(b['test_auroc_ci'])}; sensitivity "
                f"{_v(b['test_sensitivity'])}, specificity {_v(b['test_specificity'])} | |"
            )
        if "knee_oa_separate_backbone" in fd:
            b = fd["knee_oa_separate_backbone"]
            lines.append(
                "| test AUROC with the finding heads on their own backbone "
                f"(`model.finding_backbone=separate`){_earlier(fd, 'knee_oa_separate')} | "
                f"{_v(b['test_auroc'])}"
                f"{_ci_text(b['test_auroc_ci'])}; sensitivity {_v(b['test_sensitivity'])}, "
                f"specificity {_v(b['test_specificity'])} | |"
            )
        lines.append("")
    if "kl_grade" in fd:
        g = fd["kl_grade"]
        lines += [
            f"### KL grade (ordinal head, {g['test_labelled']} test knees)",
            "",
            f"Exact-grade accuracy {_v(g['test_accuracy'])} (commonest grade alone: "
            f"{_v(g['test_majority_grade_share'])}), quadratic kappa "
            f"{_v(g['test_kappa_quadratic'])}{_ci_text(g['test_kappa_quadratic_ci'])}, mean "
            f"absolute grade error {_v(g['test_mae_grades'])}. Confusion (rows true, columns "
            "predicted):",
            "",
            "| true \\ predicted | " + " | ".join(g["grades"]) + " |",
            "| --- |" + " ---: |" * len(g["grades"]),
        ]
        for grade, row in zip(g["grades"], g.get("test_confusion") or [], strict=False):
            lines.append(f"| {grade} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
        if "kl_grade_separate_backbone" in fd:
            g = fd["kl_grade_separate_backbone"]
            lines += [
                "With the finding heads on their own backbone (`model.finding_backbone="
                f"separate`){_earlier(fd, 'knee_oa_separate')}: accuracy "
                f"{_v(g['test_accuracy'])}, quadratic kappa "
                f"{_v(g['test_kappa_quadratic'])}{_ci_text(g['test_kappa_quadratic_ci'])}, mean "
                f"absolute grade error {_v(g['test_mae_grades'])}.",
                "",
            ]
    if "region_accuracy" in fd:
        lines += _region_table(fd["region_accuracy"], fd)
    if "boxes" in fd:
        b = fd["boxes"]
        lines += [
            f"### Vertebra boxes ({b['dataset']}, {b['test_films']} test films): {b['what']}",
            "",
            f"mAP@0.5 {_v(b['map_50'])}, mAP@[.5:.95] {_v(b['map_50_95'])}, mAP@0.75 "
            f"{_v(b['map_75'])}, mAR@100 {_v(b['mar_100'])}. VinDr-SpineXR's mAP@0.5 of "
            f"{100 * a['vindr_spinexr_lesion_map_50']['value']:.2f} % is over 7 kinds of lesion "
            "box and is not comparable with these vertebra boxes.",
            "",
            "| level | " + " | ".join(b["per_level"]) + " |",
            "| --- |" + " ---: |" * len(b["per_level"]),
            "| AP@0.5 | " + " | ".join(_v(v["ap_50"], 2) for v in b["per_level"].values()) + " |",
            "| AP@[.5:.95] | "
            + " | ".join(_v(v["ap_50_95"], 2) for v in b["per_level"].values())
            + " |",
            "",
        ]
    p = fd.get("predict", {})
    if p:
        lines += ["### Time per film (`regionnet.load_model(ckpt).predict(paths)`)", ""]
        for name in ("regions", "knee_oa", "knee_oa_binary", "boxes"):
            if name in p:
                q = p[name]
                lines.append(
                    f"- {name}: {q['ms_per_film']:.1f} ms per film ({q['films_per_s']:.1f} "
                    f"films/s) over {q['films']} test films, best of "
                    f"{len(q['seconds_per_pass'])} passes"
                )
        if "finding_heads_extra_ms_per_film" in p:
            n = p.get("network", {})
            lines.append(
                f"- finding heads' extra cost end to end: "
                f"{p['finding_heads_extra_ms_per_film']:+.2f} ms per film "
                f"({p['finding_heads_extra_pct']:+.1f} %, within the noise of a shared machine); "
                f"network only at {n.get('image_size')} px: "
                f"{_v(n.get('network_ms_per_film_region_heads'), 2)} ms vs "
                f"{_v(n.get('network_ms_per_film_with_finding_heads'), 2)} ms per film; "
                f"{p.get('finding_heads_params', n.get('finding_heads_params'))} parameters"
            )
        lines.append("")
    lines += ["Runs:", ""] + [_run_line(n, r) for n, r in fd.get("runs", {}).items()] + [""]
    return lines
