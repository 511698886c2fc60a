"""The landmarks section (issue 17): DSNT landmark heads on real spine and hand films.

Rows, each `regionnet-train task=landmarks` (`regionnet.train.train` with the real configs, no
second loop) under a wall-clock budget (`trainer.max_time`, a share of `--landmarks-minutes`),
then `regionnet-eval` of its best checkpoint on the run's held-out test patients
(`regionnet.landmarks.evaluate`, through `regionnet.evaluate.evaluate`):

  spine.step1     data.dataset=spine_aasce                      (one network, the whole film)
  spine.two_step  data.dataset=spine_aasce model.refine=true    (+ step 2 on vertebra crops)
  hand.step1      data.dataset=hand_dha
  hand.two_step   data.dataset=hand_dha model.refine=true       (+ step 2 per landmark)
  spine.detector_crops  no training: spine.two_step's checkpoint evaluated with
                  refine_detector=<the findings section's vertebra box checkpoint>, so step 2
                  crops each level around the detector's box instead of step 1's corners

A two-step row starts from its group's step-1 checkpoint of the same run
(`init_from=<step1 best.ckpt>`, `ROWS[...]["start_from"]`): its step 1 continues training and
its step 2 starts from ImageNet, so its budget goes mostly to step 2. Its "its step 1"
column is that continued step 1; the step-1 row is step 1 alone. `--landmarks-rows GROUP.ROW`
trains only those rows and keeps the others from `<out>/results.json` (a two-step row trained
alone starts from ImageNet: the kept step-1 checkpoint may not be on this machine).

Runs live in `<out>/artifacts/landmarks/<dataset>_<row>/` (git-ignored); their
`checkpoints/best.ckpt` loads with `regionnet.load_model`. Each row also times
`regionnet.load_model(ckpt).predict(paths)` over its test films (films/s, read + letterbox +
network + map-back).

Only the error-by-level plots (no patient pixels) are copied to `<out>/figures/landmarks/`:
spine_aasce and hand_dha are "internal use, do not redistribute" (../shared/data/README.md),
so the best / median / worst overlays stay in the run's evaluation folder under artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from regionnet.bench.keys import flat_keys as numbered_keys
from regionnet.bench.protocol import timed_evaluate
from regionnet.bench.settings import BenchSettings, log
from regionnet.bench.timeline import Timeline, max_time
from regionnet.config import compose_config
from regionnet.landmarks.data import SKELETONS
from regionnet.train import train

#: (group, row) -> data set and two steps; `share`: the row's part of --landmarks-minutes
ROWS = {
    ("spine", "step1"): {"dataset": "spine_aasce", "refine": False, "share": 0.30},
    ("spine", "two_step"): {"dataset": "spine_aasce", "refine": True, "share": 0.45,
                            "start_from": "step1"},
    ("hand", "step1"): {"dataset": "hand_dha", "refine": False, "share": 0.25},
    ("hand", "two_step"): {"dataset": "hand_dha", "refine": True, "share": 0.25,
                           "start_from": "step1"},
    # step 1 at twice the input size (`scale`: x --landmarks-image-size): a vertebra ~2.8
    # heatmap cells tall instead of ~1.4. Optional (outside the 20 minutes): trained only when
    # named, e.g. `--landmarks-rows spine.step1_2x`
    ("spine", "step1_2x"): {"dataset": "spine_aasce", "refine": False, "share": 0.5,
                            "scale": 2, "optional": True},
    # evaluation only (`eval_of`, ~1 min): the two-step checkpoint, step 2's crops from the
    # vertebra detector (`detector`, under artifacts/); skipped with the reason where either
    # checkpoint is not on this machine, e.g. before the findings section has run once
    ("spine", "detector_crops"): {"dataset": "spine_aasce", "refine": True, "share": 0.0,
                                  "eval_of": "two_step", "detector": "findings/boxes"},
}  # fmt: skip
#: whether the hand two-step row runs (its share comes on top of the others')
HAND_TWO_STEP = True
TWO_STEP_HAND_NOTE = (
    "left out of the 20-minute CPU budget: step 2 places each of the 37 hand landmarks alone "
    "(37 crops per film, about 1.5 full-film passes more per step), and the spine rows already "
    "answer step 1 vs 2-step; run it with `regionnet-train task=landmarks data.dataset=hand_dha "
    "model.refine=true`"
)
#: model settings of every row (conf/model/dsnt.yaml's): stride-8 heatmaps, a vertebra ~1.4
#: cells tall at 256 px (a 1024 px film letterboxed to 256 px: ~11 px per vertebra; DSNT's
#: expectation places points within a cell). Stride 4 with a 64-wide FPN keeps ~3 cells but
#: took 197 s per spine epoch on 2 shared cores (load ~5): 2 epochs in a 6-minute row
STRIDE = 8
HEAD_WIDTH = 128
BATCH_SIZE = 8
#: epochs each row's cosine schedule runs (`trainer.max_epochs`, and so the scheduler's
#: T_max); `trainer.max_time` stops a slower machine earlier. The spine rows fill their share
#: of the 20 minutes on an idle 2-core machine (measured: step 1 ~28 s per epoch of 337 films,
#: two-step ~78 s); the hand rows were set from a trial on 2 shared cores
EPOCHS = {
    ("spine", "step1"): 11,
    ("spine", "two_step"): 6,
    ("hand", "step1"): 15,
    ("hand", "two_step"): 15,
    # ~4x step 1's work per film: 5 epochs in its 10 minutes
    ("spine", "step1_2x"): 5,
}
#: --quick: films per data set (patient split 70/15/15 of the first ones), batches per epoch
QUICK_FILMS = 30
QUICK_BATCHES = 2

#: the issue's targets (held-out patients) and the published figures next to them
TARGETS = {
    "spine.err_x_median_pct": ("≤ 2 % of vertebra size", 2.0, "1.98 % (Cina et al. 2021)"),
    "spine.err_y_median_pct": ("≤ 2 % of vertebra size", 2.0, "1.68 % (Cina et al. 2021)"),
    "spine.cobb_smape": ("≤ 20 %", 20.0, "21.71 % (best AASCE 2019 entry)"),
    "hand.mre_pct": ("≤ 2 % of hand width", 2.0, None),
}

#: evaluation names (`test/<name>`) -> results keys
FIGURES = {
    "err_x_median_pct": "err_x_median_pct",
    "err_y_median_pct": "err_y_median_pct",
    "err_x_mean_pct": "err_x_mean_pct",
    "err_y_mean_pct": "err_y_mean_pct",
    "mre_px": "mre_px",
    "mre_pct": "mre_pct",
    "pck@2": "pck_2pct",
    "pck@5": "pck_5pct",
    "off_level_pct": "off_level_pct",
    "cobb_mae/pt": "cobb_mae_pt_deg",
    "cobb_mae/mt": "cobb_mae_mt_deg",
    "cobb_mae/tl": "cobb_mae_tl_deg",
    "cobb_mae_mean": "cobb_mae_mean_deg",
    "cobb_smape": "cobb_smape",
    "films": "films",
    "hidden_points": "hidden_points",
    "hidden_films": "hidden_films",
    "unreadable": "unreadable",
}


def rows(settings: BenchSettings) -> list[tuple[str, str]]:
    """The rows this run trains: `--landmarks-rows` where given, else the default ones."""
    if settings.landmarks_rows:
        chosen = [tuple(r.split(".", 1)) for r in settings.landmarks_rows]
        unknown = [".".join(r) for r in chosen if r not in ROWS]
        if unknown:
            names = ", ".join(".".join(r) for r in ROWS)
            raise ValueError(f"--landmarks-rows {unknown}: use some of {names}")
        return chosen
    return [r for r in ROWS if (r != ("hand", "two_step") or HAND_TWO_STEP)
            and not ROWS[r].get("optional")]  # fmt: skip


def start_checkpoint(res: dict, row: tuple[str, str]) -> Path | None:
    """The checkpoint a row starts from (`ROWS[row]["start_from"]`): that row's best.ckpt when
    this benchmark run trained it (not one kept from an earlier run, whose file a fresh
    checkout lacks), else None (the row starts from ImageNet)."""
    source = ROWS[row].get("start_from")
    done = res.get(row[0], {}).get(source) if source else None
    if not done or done.get("from_earlier_run") or "checkpoint" not in done:
        return None
    ckpt = Path(done["checkpoint"])
    return ckpt if ckpt.is_file() else None


def previous_rows(settings: BenchSettings) -> dict:
    """The landmarks section of `<out>/results.json` where only some rows run
    (`--landmarks-rows`): the rows kept, each marked with the run it comes from."""
    if not settings.landmarks_rows:
        return {}
    previous = settings.out_dir / "results.json"
    old = json.loads(previous.read_text()).get("landmarks", {}) if previous.is_file() else {}
    kept = {}
    for group in ("spine", "hand"):
        for name, values in old.get(group, {}).items():
            if "skipped" not in values:
                kept.setdefault(group, {})[name] = {**values, "from_earlier_run": True}
    if old.get("data"):
        kept["data"] = old["data"]
    return kept


def row_minutes(settings: BenchSettings, row: tuple[str, str]) -> float:
    return settings.landmarks_minutes * ROWS[row]["share"]


def row_image_size(settings: BenchSettings, row: tuple[str, str]) -> int:
    """The row's input size: --landmarks-image-size times the row's `scale` (default 1)."""
    return settings.landmarks_image_size * int(ROWS[row].get("scale", 1))


def row_overrides(settings: BenchSettings, row: tuple[str, str], run_dir: Path) -> list[str]:
    """regionnet-train overrides of one row."""
    spec = ROWS[row]
    out = [
        "task=landmarks",
        f"data.root={settings.data_dir / 'landmarks'}",
        f"data.dataset={spec['dataset']}",
        f"data.image_size={row_image_size(settings, row)}",
        f"data.batch_size={BATCH_SIZE}",
        f"data.num_workers={settings.num_workers}",
        f"model.refine={str(spec['refine']).lower()}",
        f"model.stride={STRIDE}",
        f"model.head_width={HEAD_WIDTH}",
        f"trainer.max_epochs={1 if settings.quick else EPOCHS[row]}",
        f"trainer.max_time={max_time(row_minutes(settings, row))}",
        f"trainer.precision={settings.precision}",
        "trainer.accelerator=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        f"paths.output_dir={run_dir}",
        "test=false",  # regionnet-eval tests the best checkpoint, with bootstrap intervals
    ]
    if settings.quick:
        out += [
            f"data.limit={QUICK_FILMS}",
            f"trainer.limit_train_batches={QUICK_BATCHES}",
            f"trainer.limit_val_batches={QUICK_BATCHES}",
        ]
    return out


def test_figures(result: dict, stage: str = "test") -> dict:
    """The evaluation's `<stage>/<name>` figures (and `_ci` intervals) under results keys."""
    out = {}
    for name, key in FIGURES.items():
        value = result.get(f"{stage}/{name}")
        if value is None:
            continue
        out[key] = int(value) if key in ("films", "hidden_points", "hidden_films") else value
        ci = result.get(f"{stage}/{name}_ci")
        if ci is not None:
            out[f"{key}_ci"] = [float(c) for c in ci]
    return out


def predict_rate(ckpt: Path, paths: list[str]) -> dict:
    """`regionnet.load_model(ckpt).predict(paths)` over the films, after one warm-up film:
    films/s (read at full size, letterbox, network, map back to film pixels)."""
    import regionnet

    model = regionnet.load_model(ckpt)
    model.predict(paths[:1])
    start = time.perf_counter()
    found = model.predict(paths)
    seconds = time.perf_counter() - start
    return {
        "predict_films": len(found),
        "predict_seconds": round(seconds, 2),
        "predict_films_per_s": len(found) / seconds if seconds > 0 else None,
        "predict_torch_threads": torch.get_num_threads(),
        "predict_errors": sum(1 for p in found if getattr(p, "error", None)),
    }


def annotation_summary(run_dir: Path, skeleton: str) -> dict:
    """The data module's annotation check (`annotation_issues.csv` beside `split.csv`):
    films, vertebrae (or landmarks) and points hidden, by kind of finding; films and patients
    per split."""
    split = pd.read_csv(run_dir / "split.csv")
    out: dict = {
        "films": len(split),
        "patients": int(split["patient_id"].nunique()),
        "by_split": {
            s: {"films": int(len(g)), "patients": int(g["patient_id"].nunique())}
            for s, g in split.groupby("split")
        },
    }
    issues_csv = run_dir / "annotation_issues.csv"
    issues = pd.read_csv(issues_csv) if issues_csv.is_file() else pd.DataFrame()
    kinds = {
        "out of head-to-foot order": "out_of_order",
        "not above": "upside_down",
        "not left of": "mirrored",
        "off the": "off_film",
    }
    by_kind = {v: 0 for v in kinds.values()}
    for reason in issues.get("reason", pd.Series(dtype=str)).astype(str):
        for text, kind in kinds.items():
            if text in reason:
                by_kind[kind] += 1
    is_spine = skeleton == "vertebrae"
    out["annotation_check"] = {
        "films": int(issues["path"].nunique()) if len(issues) else 0,
        "parts": len(issues),
        "part": "vertebrae" if is_spine else "landmarks",
        "points_hidden": len(issues) * (4 if is_spine else 1),
        "findings_by_kind": by_kind,
        "note": "a finding hides the 4 corners of the vertebra (or the landmark) in every split "
        "(visible=False): not trained on, not scored; the films stay",
    }
    return out


def one_row(
    settings: BenchSettings,
    row: tuple[str, str],
    root: Path,
    figures: Path,
    init: Path | None = None,
) -> dict:
    """Train, evaluate and time one row; `init`: the checkpoint it starts from
    (`init_from`, a two-step row from its group's step-1 run of this same benchmark run)."""
    group, name = row
    spec = ROWS[row]
    run_dir = root / f"{spec['dataset']}_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun trains afresh (skip_if_done)
    overrides = row_overrides(settings, row, run_dir)
    if init is not None:
        overrides.append(f"init_from={init}")
    log(f"landmarks: {group}.{name}: regionnet-train {' '.join(overrides)}")
    timeline = Timeline(("val/mre_pct",))
    start = time.perf_counter()
    metrics = train(compose_config("train", overrides), extra_callbacks=[timeline])
    train_s = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    result, eval_s = timed_evaluate(ckpt, run_dir / "eval", num_workers=settings.num_workers)
    out: dict = {
        "dataset": spec["dataset"],
        "refine": spec["refine"],
        "image_size": row_image_size(settings, row),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "budget_minutes": round(row_minutes(settings, row), 2),
        "max_epochs": 1 if settings.quick else EPOCHS[row],
        "epochs": timeline.points[-1]["epoch"] if timeline.points else 0,
        "train_seconds": round(train_s, 1),
        "train_films_per_s": timeline.films_per_s,
        "val_mre_pct_best": metrics.get("val/mre_pct_best"),
        "timeline": timeline.points,
        "params": metrics.get("model/params"),
        "eval_seconds": round(eval_s, 1),
        "test": test_figures(result, "test"),
    }
    if init is not None:
        out["init_from"] = str(init)
    if spec["refine"]:
        out["test_step1"] = test_figures(result, "test/step1")
    data_root = settings.data_dir / "landmarks"
    test = pd.read_csv(run_dir / "split.csv")
    paths = [str(data_root / p) for p in test.loc[test["split"] == "test", "path"]]
    if paths:
        out.update(predict_rate(ckpt, paths))
    plot = run_dir / "eval" / "error_by_level.png"
    if plot.is_file():
        figures.mkdir(parents=True, exist_ok=True)
        target = figures / f"{group}_{name}_error_by_level.png"
        shutil.copyfile(plot, target)
        out["error_by_level"] = str(target)
    out["overlays"] = {
        k: str(run_dir / "eval" / v) for k, v in (result.get("overlays") or {}).items()
    }
    out["per_level"] = result.get("per_level", {}).get("test", {})
    log(
        f"landmarks: {group}.{name}: {out['epochs']} epochs in {train_s / 60:.1f} min, test "
        f"MRE {out['test'].get('mre_pct', float('nan')):.2f} %"
    )
    return out


def detector_row(settings: BenchSettings, res: dict, row: tuple[str, str], root: Path) -> dict:
    """An evaluation-only row (`ROWS[row]["eval_of"]`): that row's checkpoint evaluated with
    `refine_detector=` the box checkpoint under artifacts (`ROWS[row]["detector"]`), on the
    same held-out patients. Skipped, with the reason, where a checkpoint is missing or the
    two runs split the patients differently (the detector would be tested on its training
    films)."""
    group, name = row
    spec = ROWS[row]
    source = res.get(group, {}).get(spec["eval_of"], {})
    ckpt = Path(source.get("checkpoint", "missing"))
    box_dir = settings.artifacts / spec["detector"]
    detector = box_dir / "checkpoints" / "best.ckpt"
    missing = [str(p) for p in (ckpt, detector) if not p.is_file()]
    if missing:
        return {
            "skipped": f"needs {' and '.join(missing)} on this machine (the {spec['eval_of']} "
            "row's checkpoint and the findings section's vertebra box checkpoint); run both, "
            f"then `--landmarks-rows {group}.{name}`"
        }
    splits = [
        pd.read_csv(d / "split.csv").set_index("path")["split"].sort_index()
        for d in (ckpt.parent.parent, box_dir)
    ]
    if not splits[0].equals(splits[1]):
        return {
            "skipped": f"{box_dir}/split.csv and {ckpt.parent.parent}/split.csv split the "
            "films differently, so the detector would see its own training films in the test"
        }
    run_dir = root / f"{spec['dataset']}_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"landmarks: {group}.{name}: regionnet-eval {ckpt} refine_detector={detector}")
    result, eval_s = timed_evaluate(
        ckpt, run_dir / "eval", [f"refine_detector={detector}"], settings.num_workers
    )
    return {
        "dataset": spec["dataset"],
        "refine": True,
        "eval_of": spec["eval_of"],
        "checkpoint": str(ckpt),
        "detector": str(detector),
        "eval_seconds": round(eval_s, 1),
        "test": test_figures(result, "test"),
        "test_step1": test_figures(result, "test/step1"),
        "per_level": result.get("per_level", {}).get("test", {}),
    }


def targets(res: dict) -> list[dict]:
    """Each target with the best row's figure and met / missed."""
    out = []
    for key, (text, bound, published) in TARGETS.items():
        group, figure = key.split(".")
        for row, values in res.get(group, {}).items():
            value = values.get("test", {}).get(figure) if isinstance(values, dict) else None
            if value is None:
                continue
            out.append(
                {
                    "key": f"{group}.{row}.test.{figure}",
                    "value": value,
                    "ci": values["test"].get(f"{figure}_ci"),
                    "target": text,
                    "published": published,
                    "met": bool(value <= bound),
                }
            )
    return out


def landmark_section(settings: BenchSettings) -> dict:
    """Train, evaluate and time the rows (see the module docstring); the results dict."""
    data_root = settings.data_dir / "landmarks"
    if not (data_root / "manifest.csv").is_file():
        return {"skipped": f"no landmark data at {data_root} (manifest.csv)"}
    root = settings.artifacts / "landmarks"
    figures = settings.out_dir / "figures" / "landmarks"
    start = time.perf_counter()
    res: dict = {
        "settings": {
            "image_size": settings.landmarks_image_size,
            "backbone": compose_config("train", ["task=landmarks"]).model.backbone,
            "pretrained": "ImageNet (installed package, no download)",
            "stride": STRIDE,
            "head_width": HEAD_WIDTH,
            "batch_size": BATCH_SIZE,
            "optimizer": "AdamW lr 1e-3, weight decay 1e-4, cosine over max_epochs",
            "precision": settings.precision,
            "budget_minutes": settings.landmarks_minutes,
            "torch_threads": torch.get_num_threads(),
            "num_workers": settings.num_workers,
            "load_average_at_start": os.getloadavg()[0],
        },
        "data": {},
    }
    for key, value in previous_rows(settings).items():
        res[key] = value
    for row in rows(settings):
        group, name = row
        if "eval_of" in ROWS[row]:
            res.setdefault(group, {})[name] = detector_row(settings, res, row, root)
            continue
        values = one_row(settings, row, root, figures, start_checkpoint(res, row))
        res.setdefault(group, {})[name] = values
        if group not in res["data"]:
            skeleton = SKELETONS[ROWS[row]["dataset"]]
            res["data"][group] = annotation_summary(Path(values["run_dir"]), skeleton)
    if "two_step" not in res.get("hand", {}):
        res.setdefault("hand", {})["two_step"] = {"skipped": TWO_STEP_HAND_NOTE}
    res["targets"] = targets(res)
    res["settings"]["load_average_at_end"] = os.getloadavg()[0]
    res["wall_seconds"] = round(time.perf_counter() - start, 1)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    (settings.artifacts / "landmarks.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def flat_keys(res: dict, prefix: str = "landmarks") -> dict[str, object]:
    """The section's figures under dotted names, e.g. `landmarks.spine.step1.test.
    err_x_median_pct`, `landmarks.spine.two_step.test.cobb_smape`,
    `landmarks.spine.step1.predict_films_per_s` (lists and texts left out)."""
    return numbered_keys(res, prefix)


# -- RESULTS.md ------------------------------------------------------------------------------
def _v(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _cell(fig: dict, key: str, nd: int = 2, scale: float = 1.0) -> str:
    value = fig.get(key)
    if value is None:
        return "n/a"
    ci = fig.get(f"{key}_ci")
    text = f"{value * scale:.{nd}f}"
    return text + (f" [{ci[0] * scale:.{nd}f}, {ci[1] * scale:.{nd}f}]" if ci else "")


SPINE_ROWS = (
    ("median \\|dx\\| (% vertebra size)", "err_x_median_pct", 2, 1, "≤ 2", "1.98"),
    ("median \\|dy\\| (% vertebra size)", "err_y_median_pct", 2, 1, "≤ 2", "1.68"),
    ("mean \\|dx\\| (%)", "err_x_mean_pct", 2, 1, "", ""),
    ("mean \\|dy\\| (%)", "err_y_mean_pct", 2, 1, "", ""),
    ("MRE (px of the 1024 px film)", "mre_px", 1, 1, "", ""),
    ("MRE (% vertebra size)", "mre_pct", 1, 1, "", ""),
    ("PCK@2 % (share of points)", "pck_2pct", 1, 100, "", ""),
    ("PCK@5 % (share of points)", "pck_5pct", 1, 100, "", ""),
    ("vertebrae placed on another level (% of vertebrae)", "off_level_pct", 1, 1, "", ""),
    ("Cobb MAE PT (°)", "cobb_mae_pt_deg", 1, 1, "", ""),
    ("Cobb MAE MT (°)", "cobb_mae_mt_deg", 1, 1, "", ""),
    ("Cobb MAE TL/L (°)", "cobb_mae_tl_deg", 1, 1, "", ""),
    ("Cobb SMAPE (%)", "cobb_smape", 1, 1, "≤ 20", "21.71 (AASCE 2019 best)"),
)
HAND_ROWS = (
    ("MRE (% hand width)", "mre_pct", 2, 1, "≤ 2"),
    ("MRE (px of the 1024 px film)", "mre_px", 1, 1, ""),
    ("median \\|dx\\| (% hand width)", "err_x_median_pct", 2, 1, ""),
    ("median \\|dy\\| (% hand width)", "err_y_median_pct", 2, 1, ""),
    ("PCK@2 % (share of points)", "pck_2pct", 1, 100, ""),
    ("PCK@5 % (share of points)", "pck_5pct", 1, 100, ""),
)


def _run_line(label: str, r: dict) -> str:
    rate, fit = r.get("predict_films_per_s"), r.get("train_films_per_s")
    return (
        f"- {label}: {r['epochs']} of {r['max_epochs']} epochs in {r['train_seconds'] / 60:.1f} "
        f"min (budget {r['budget_minutes']:.1f} min"
        + (f", {fit:.2f} training films/s" if fit else "")
        + f"), best val MRE {_v(r['val_mre_pct_best'])} %; "
        f"`regionnet.load_model(ckpt).predict(paths)` {_v(rate)} films/s over "
        f"{r.get('predict_films', 0)} test films ({r.get('predict_torch_threads')} torch threads); "
        f"checkpoint `{r['checkpoint']}`"
        + (
            " (kept from an earlier run: --landmarks-rows reran other rows)"
            if r.get("from_earlier_run")
            else ""
        )
    )


def _detector_line(label: str, r: dict) -> str:
    return (
        f"- {label}: no training; the {r['eval_of']} row's checkpoint `{r['checkpoint']}` "
        f"evaluated with `refine_detector={r['detector']}` (step 2 crops each level around "
        f"the detector's box for it; step 1's corners where it finds none) in "
        f"{r['eval_seconds']:.0f} s"
        + (" (kept from an earlier run)" if r.get("from_earlier_run") else "")
    )


def detector_bullet(spine: dict) -> str:
    """The vertebra detector's line of "what would reach the targets": measured or not."""
    det, two = spine.get("detector_crops", {}), spine.get("two_step", {})
    text = (
        "- A vertebra detector for step 2's crops, so each vertebra gets its crop even where "
        "step 1's corners slide along the column: `refine_detector=<task=boxes checkpoint>` "
        "in regionnet-eval and regionnet-predict"
    )
    if "test" not in det or "test" not in two:
        return text + " does this; this section has not measured it (spine detector_crops)."
    d, t = det["test"], two["test"]
    worse = (d.get("off_level_pct") or 0) > (t.get("off_level_pct") or 0)
    return text + (
        f". Measured with the findings section's detector (its own figures there): "
        f"{_v(d.get('off_level_pct'), 0)} % of vertebrae on another level against "
        f"{_v(t.get('off_level_pct'), 0)} % with step 1's crops, median |dy| "
        f"{_v(d.get('err_y_median_pct'), 1)} % against {_v(t.get('err_y_median_pct'), 1)} %, "
        f"Cobb SMAPE {_v(d.get('cobb_smape'), 1)} % against {_v(t.get('cobb_smape'), 1)} %. "
        + (
            "More crops land on a neighbouring level than with step 1's corners: the "
            "detector's level labels are wrong more often than step 1's count, so its crops "
            "can help only once it labels levels better."
            if worse
            else "The detector's crops put more vertebrae on their own level."
        )
    )


def hand_bullet(lm: dict) -> str:
    """The hands' line of "what would reach the targets": met (by which row), or the levers."""
    met = [t["key"].split(".")[1] for t in lm.get("targets", [])
           if t["key"].startswith("hand.") and t["met"]]  # fmt: skip
    if met:
        return (
            f"- Hands: the ≤ 2 % target is met by the {', '.join(met)} row"
            f"{'s' if len(met) > 1 else ''} (per-landmark crops from the detail image); more "
            "epochs would tighten it further."
        )
    return (
        "- Hands: more epochs and resolution mostly, and step 2's per-landmark crops; 2 % of a "
        "hand's width is ~4 px of a 1024 px film, ~1 input px at 256 px."
    )


def level_text(lm: dict) -> str:
    """What `off_level_pct` says about step 1's levels, and step 1 at 2x where it ran."""
    spine = lm.get("spine", {})
    one, two = spine.get("step1", {}), spine.get("two_step", {})
    big = spine.get("step1_2x", {})
    off = one.get("test", {}).get("off_level_pct")
    if off is None:
        return ""
    text = (
        f" Step 1 alone places {off:.0f} % of the test vertebrae nearer another vertebra than "
        "their own (`off_level_pct`)"
    )
    final = two.get("test", {}).get("off_level_pct")
    if final is not None:
        text += (
            f"; after step 2, whose crops follow step 1's corners, {final:.0f} % remain "
            f"(its own step 1: {_v(two.get('test_step1', {}).get('off_level_pct'), 0)} %)"
        )
    text += ": the level, not the sub-pixel placement, is the first gap."
    off_big = big.get("test", {}).get("off_level_pct")
    if off_big is not None:
        size = lm.get("settings", {}).get("image_size")
        text += (
            f" Step 1 alone at {big.get('image_size')} px ({big['epochs']} epochs): "
            f"{off_big:.0f} % on another level, median |dy| "
            f"{_v(big['test'].get('err_y_median_pct'), 1)} % (at {one.get('image_size', size)} "
            f"px, {one.get('epochs')} epochs: {_v(one['test'].get('err_y_median_pct'), 1)} %)."
        )
        change = off_big - off
        text += (
            " Twice the resolution left that share where it was at this training length."
            if abs(change) < 5
            else f" Twice the resolution {'cut' if change < 0 else 'raised'} that share by "
            f"{abs(change):.0f} points."
        )
    return text


def landmarks_markdown(lm: dict) -> list[str]:
    """The "Landmarks (issue 17)" section of RESULTS.md."""
    lines = ["## Landmarks (issue 17): DSNT heads on spines and hands", ""]
    if "skipped" in lm:
        return lines + [f"Skipped: {lm['skipped']}.", ""]
    s = lm["settings"]
    lines += [
        f"`regionnet-train task=landmarks` (Cina et al. 2021: DSNT heads; step 2 on vertebra "
        "crops, or one crop per hand landmark; a two-step row starts from its step-1 row's "
        "checkpoint, `init_from`, so its step 1 trained longer) with "
        f"{s['backbone']} ({s['pretrained']}), {s['image_size']} px letterbox, "
        f"heatmap stride {s['stride']}, FPN width {s['head_width']}, batch {s['batch_size']}, "
        f"{s['optimizer']}, {s['precision']}, a wall-clock budget of "
        f"{s['budget_minutes']:g} CPU minutes in all (`trainer.max_time` per row); then "
        "`regionnet-eval` on each run's held-out test patients. 95 % intervals bootstrap whole "
        "patients. Section wall time "
        f"{lm['wall_seconds'] / 60:.1f} min"
        + (
            " (the rows this run trained; the others are kept from an earlier run)."
            if any(
                r.get("from_earlier_run") for g in ("spine", "hand") for r in lm.get(g, {}).values()
            )
            else "."
        ),  # fmt: skip
        "",
    ]
    spine = lm.get("spine", {})
    if spine:
        one, two = spine.get("step1", {}), spine.get("two_step", {})
        big = spine.get("step1_2x", {})
        films = one.get("test", {}).get("films") or two.get("test", {}).get("films")
        cols = [one.get("test", {}), two.get("test_step1", {}), two.get("test", {})]
        head = "step 1 alone | 2-step: its step 1 | 2-step: final"
        det = spine.get("detector_crops", {})
        if "test" in det:
            cols.append(det["test"])
            head += " | 2-step, crops from the vertebra detector"
        if "test" in big:
            cols.append(big["test"])
            head += f" | step 1 alone at {big.get('image_size', '2x')} px"
        lines += [
            f"### Spine (spine_aasce, {films} test films)",
            "",
            f"| figure | target | Cina 2021 / AASCE | {head} |",
            "| --- | --- | --- |" + " ---: |" * len(cols),
        ]
        for label, key, nd, scale, target, published in SPINE_ROWS:
            cells = [_cell(c, key, nd, scale) for c in cols]
            lines.append(f"| {label} | {target} | {published} | " + " | ".join(cells) + " |")
        lines.append("")
    hand = lm.get("hand", {})
    if hand.get("step1"):
        h, two = hand["step1"], hand.get("two_step", {})
        # the 2-step columns where that row ran (step 2: each landmark on its own crop)
        cols = [h["test"]] + ([two["test_step1"], two["test"]] if "test" in two else [])
        head = "step 1 | 2-step: its step 1 | 2-step: final" if len(cols) > 1 else "step 1"
        lines += [
            f"### Hand (hand_dha, {h['test'].get('films')} test films)",
            "",
            f"| figure | target | {head} |",
            "| --- | --- |" + " ---: |" * len(cols),
            *[
                f"| {label} | {target} | "
                + " | ".join(_cell(c, key, nd, scale) for c in cols)
                + " |"
                for label, key, nd, scale, target in HAND_ROWS
            ],
            "",
        ]
    lines += ["Targets (held-out patients):", ""]
    for t in lm.get("targets", []):
        ci = f" [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}]" if t.get("ci") else ""
        lines.append(
            f"- `{t['key']}` = {t['value']:.2f}{ci}, target {t['target']}: "
            f"**{'met' if t['met'] else 'missed'}**"
        )
    lines += ["", "Runs:", ""]
    for group in ("spine", "hand"):
        for name, r in lm.get(group, {}).items():
            if "skipped" in r:
                lines.append(f"- {group} {name}: {r['skipped']}.")
            elif "eval_of" in r:
                lines.append(_detector_line(f"{group} {name}", r))
            else:
                lines.append(_run_line(f"{group} {name}", r))
    lines.append("")
    for group, d in lm.get("data", {}).items():
        a = d["annotation_check"]
        k = a["findings_by_kind"]
        splits = ", ".join(f"{n} {v['films']} films / {v['patients']} patients"
                           for n, v in d["by_split"].items())  # fmt: skip
        found = (
            f"hid {a['parts']} {a['part']} ({a['points_hidden']} points) on {a['films']} films: "
            f"{k['out_of_order']} out of head-to-foot order, {k['upside_down']} upside down, "
            f"{k['mirrored']} left/right swapped, {k['off_film']} off the film ({a['note']})"
            if a["parts"]
            else "found nothing to hide"
        )
        lines.append(
            f"- {group} data: {d['films']} films of {d['patients']} patients ({splits}); the "
            f"annotation check {found}."
        )
    load = [s.get(k) for k in ("load_average_at_start", "load_average_at_end")]
    loaded = (
        f" (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)"
        if None not in load
        else ""
    )
    epochs = sorted({r["epochs"] for g in ("spine", "hand") for r in lm.get(g, {}).values()
                     if "epochs" in r})  # fmt: skip
    reached = "-".join(str(e) for e in (epochs[:1] + epochs[-1:] if len(epochs) > 1 else epochs))
    reached = f"{reached} epoch{'s' if epochs and epochs[-1] > 1 else ''}"
    rows = [r for g in ("spine", "hand") for r in lm.get(g, {}).values() if "epochs" in r]
    # what ended the rows: the time budget (fewer epochs than max_epochs) or max_epochs
    cut = [r["epochs"] < r.get("max_epochs", r["epochs"]) for r in rows]
    ended = (
        "the time budget" if cut and all(cut)
        else "`trainer.max_epochs`" if not any(cut)
        else "the time budget or `trainer.max_epochs`"
    )  # fmt: skip
    lines += [
        "",
        f"Caveats: CPU only, {s['torch_threads']} torch threads on a machine whose cores other "
        f"jobs shared{loaded}; {ended}, not convergence, ended every row (epochs above), so "
        "these are the figures of a few epochs, not of the method. Films/s and training times "
        "are noisy for the same reason; they include reading the 1024 px JPEG and the "
        "letterbox. The test split is a 15 % patient-grouped share of each set (split.csv in "
        "each run), never trained on or used to pick the checkpoint (val picks it).",
        "",
        "What would reach the targets:",
        "",
        "- Resolution where the points are placed. At "
        f"{s['image_size']} px a 1024 px spine film is letterboxed to about a quarter, so a "
        "vertebra is ~11 input px tall and 2 % of its size is ~0.2 input px; the letterbox also "
        "spends ~60 % of the square on padding beside a ~400 px wide spine. Step 2 crops "
        "each vertebra from the detail image (`data.detail_size`, default 1024 px, the stored "
        "films' size; the rows above record theirs), as Cina et al. crop from the "
        "full-resolution film; a tall input for step 1 (e.g. 512 x 256, not built) would give "
        "step 1 twice the vertical resolution at about half the cost of a 512 px square."
        + level_text(lm),
        f"- Training length: tens to hundreds of epochs instead of the {reached} here, with "
        "the cosine schedule over "
        "that length.",
        "- A GPU: one H200-class GPU runs a 512 px spine epoch in seconds, so the runs above "
        "at 2-4x the resolution and 50-100x the epochs fit in well under an hour.",
        detector_bullet(spine),
        hand_bullet(lm),
    ]
    figs = [r["error_by_level"] for g in ("spine", "hand") for r in lm.get(g, {}).values()
            if "error_by_level" in r]  # fmt: skip
    lines += [
        "",
        "Error by level (radial error per vertebra / landmark, test films): "
        + ", ".join(f"`{f}`" for f in figs)
        + ". The best, median and worst test films with predicted and true points are drawn "
        "under each run's `eval/overlays/` in `benchmarks/artifacts/landmarks/` only: "
        "spine_aasce and hand_dha are for internal use and may not be redistributed "
        "(../shared/data/README.md), so no image derived from them is committed.",
        "",
    ]
    return lines
