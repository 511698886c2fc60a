"""`regionnet-eval` of a box checkpoint: `evaluate_boxes(cfg, ckpt_path)`. Boxes are vertebrae
(T1..L5), not lesions.

The data are those of the training run, as for landmark checkpoints
(`regionnet.landmarks.evaluate`): `<run_dir>/config.yaml` (its `data` node) with
`<run_dir>/split.csv`, non-null `data.*` keys of the eval config on top; input size and
normalisation follow the checkpoint. `split`: `test` (default), `val` or `all`.

Writes into `paths.output_dir`:

- `metrics.json`: `<split>/map` (mAP@[.5:.95]), `<split>/map_50`, `<split>/map_75`,
  `<split>/mar_100`, per level `<split>/ap/<level>` and `<split>/ap_50/<level>` (COCO rules,
  `MeanAveragePrecision` with the `faster_coco_eval` backend), `<split>/films`,
  `<split>/unreadable`, `<split>/seconds_per_film` (the predict loop's wall time per film,
  reading included) and `per_level` ({level: {"ap", "ap_50"}});
- `predictions.csv`: one row per readable film (`regionnet.boxes.run.prediction_rows`: boxes,
  true boxes, vertebrae found at IoU 0.5) with `patient_id` and `split`;
- `ap_by_level.png`: AP@0.5 and AP@[.5:.95] per vertebra level;
- `errors.csv`: unreadable files (path, reason, stage).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from regionnet.boxes.data import BoxDataModule
from regionnet.boxes.infer import load_box_model
from regionnet.boxes.module import box_metric, map_values
from regionnet.boxes.run import prediction_rows
from regionnet.data.transforms import GRAY_MEAN, GRAY_STD
from regionnet.landmarks.data import LandmarkDataModule
from regionnet.run import build_datamodule, eval_trainer, log_eval

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "all")
TARGET = f"{BoxDataModule.__module__}.{BoxDataModule.__name__}"


def box_data_config(cfg: DictConfig, model, ckpt_path: str | Path) -> DictConfig:
    """The box data node to evaluate on (see the module docstring)."""
    parent = Path(str(ckpt_path)).expanduser().resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    user = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}), resolve=True)
    known = set(inspect.signature(LandmarkDataModule).parameters)
    given = {k: v for k, v in user.items() if v is not None and k in known}
    run_file = run_dir / "config.yaml"
    run_data = OmegaConf.load(run_file).get("data") if run_file.is_file() else None
    if run_data is None or run_data.get("_target_") != TARGET:
        if "dataset" not in given:
            raise FileNotFoundError(
                f"{run_file} has no box data node: ckpt_path={ckpt_path} is not in a regionnet "
                "box run directory (<run_dir>/checkpoints/), so its data are unknown. Name "
                "them: data.dataset=spine_aasce data.root=DIR split=all"
            )
        data = OmegaConf.create({"_target_": TARGET, **given})
    else:
        data = run_data
        if (run_dir / "split.csv").is_file() and not given.get("split_file"):
            data.split_file = str(run_dir / "split.csv")
        data = OmegaConf.merge(data, given)
    h = model.hparams
    data.image_size = int(h.image_size)
    data.mean, data.std = float(h.get("mean", GRAY_MEAN)), float(h.get("std", GRAY_STD))
    data.batch_size, data.num_workers = int(cfg.batch_size), int(cfg.num_workers)
    return data


def plot_ap_by_level(per_level: dict, path: Path) -> Path:
    """Bars of AP@0.5 and AP@[.5:.95] per vertebra level, head to foot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_level)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.2))
    ax.bar(x - 0.2, [per_level[n].get("ap_50", np.nan) for n in names], 0.4, label="AP@0.5")
    ax.bar(x + 0.2, [per_level[n].get("ap", np.nan) for n in names], 0.4, label="AP@[.5:.95]")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("average precision")
    ax.set_title("Vertebra boxes per level (vertebrae, not lesions)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_boxes(cfg: DictConfig, ckpt_path: str | Path) -> dict:
    """Evaluate the box checkpoint `ckpt_path` as configured (conf/eval.yaml); return the
    metrics dict written to metrics.json."""
    out = Path(cfg.paths.output_dir)
    split = str(cfg.get("split", "test"))
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: box data have {', '.join(SPLITS)}")
    model = load_box_model(ckpt_path)
    dm = build_datamodule(OmegaConf.create({"data": box_data_config(cfg, model, ckpt_path)}))
    dm.setup()
    if dm.box_names != list(model.box_names):
        raise ValueError(
            f"data.dataset={dm.dataset} has vertebrae {dm.box_names[:3]}... but ckpt_path="
            f"{ckpt_path} detects {list(model.box_names)[:3]}...: evaluate on the checkpoint's "
            f"data (data.dataset={model.hparams.get('dataset')})"
        )
    if dm.dataset == "phantom":
        log.warning("data.dataset=phantom: SYNTHETIC films; these numbers are no clinical evidence")
    frame = dm.records if split == "all" else dm.split_frame(split)
    out.mkdir(parents=True, exist_ok=True)
    trainer = eval_trainer(cfg, out)
    start = time.perf_counter()
    outputs = trainer.predict(model, dataloaders=dm._loader(frame, train=False)) or []
    seconds = time.perf_counter() - start
    bad = [tuple(e) for o in outputs for e in o["errors"]]
    metric, metric_50 = box_metric(), box_metric([0.5])
    for o in outputs:
        for k in range(len(o["path"])):
            pred = [{"boxes": o["boxes"][k], "scores": o["scores"][k], "labels": o["labels"][k]}]
            truth = [{"boxes": o["boxes_px"][k], "labels": o["box_labels_px"][k]}]
            metric.update(pred, truth)
            metric_50.update(pred, truth)
    films = sum(len(o["path"]) for o in outputs)
    result: dict = {
        "checkpoint": str(Path(str(ckpt_path)).expanduser().resolve()),
        "task": "boxes (vertebrae, not lesions)",
        "dataset": dm.dataset,
        "box_names": list(model.box_names),
        "split": split,
        f"{split}/films": films,
        f"{split}/unreadable": len(bad),
        f"{split}/seconds_per_film": round(seconds / max(films + len(bad), 1), 4),
        "per_level": {},
    }
    figures: dict[str, Path] = {}
    rows = prediction_rows(outputs, model.box_names)
    table = pd.DataFrame(rows)
    if films:
        result.update(map_values(metric.compute(), metric_50.compute(), model.box_names, split))
        for n in model.box_names:
            level = {k: result[f"{split}/{k}/{n}"] for k in ("ap", "ap_50")
                     if f"{split}/{k}/{n}" in result}  # fmt: skip
            result["per_level"][n] = level
        ids = dict(zip(frame["path"], frame["patient_id"], strict=True))
        table.insert(1, "patient_id", [ids.get(p) for p in table["path"]])
        where = dict(zip(frame["path"], frame.get("split", pd.Series(split, frame.index))))
        table.insert(2, "split", [where.get(p, split) for p in table["path"]])
        figures["ap_by_level"] = plot_ap_by_level(result["per_level"], out / "ap_by_level.png")
    else:
        log.warning("%s: no readable film among %d records", split, len(frame))
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    table.to_csv(out / "predictions.csv", index=False)
    errors = [{"path": p, "reason": why, "stage": split} for p, why in bad]
    errors_table = pd.DataFrame(errors, columns=["path", "reason", "stage"])
    errors_table.to_csv(out / "errors.csv", index=False)
    log_eval(cfg, result, figures, table)
    log.info(
        "box evaluation (vertebrae) of %s on %s: mAP@0.5 %.3f, mAP@[.5:.95] %.3f -> %s",
        ckpt_path, split, result.get(f"{split}/map_50", float("nan")),
        result.get(f"{split}/map", float("nan")), out,
    )  # fmt: skip
    return result
