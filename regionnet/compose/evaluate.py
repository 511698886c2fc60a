"""`regionnet-eval` of a composed checkpoint (`task=multi`): every head type of the model on
the run's own split, from one pass over the films.

The films are the run's (its config.yaml's `data`, with its split.csv: each film keeps its
split), `split=test` or `split=val`. Written to the output directory:

- `metrics.json`: the region heads' numbers as the region task's eval gives them
  (`stage/auroc/<region>` with `auroc_ci`, sensitivity/specificity at the saved thresholds,
  `auroc_mean`, `top1_acc`; bootstrap by patient), the landmark part's under
  `stage/landmarks/...` with `_ci` intervals (the landmark task's report; `per_level` under
  `landmarks_per_level`), the box part's under `stage/boxes/...` (COCO mAP, AP per level);
- `predictions.csv`: one row per film, the region columns and the part columns
  (`regionnet.compose.run.test_predictions`);
- `errors.csv`: unreadable films.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from regionnet.boxes.module import box_metric, score_films
from regionnet.compose.infer import load_multi_model
from regionnet.compose.run import print_summary, test_predictions
from regionnet.data.sources import label_columns
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.landmarks.report import landmark_report
from regionnet.reporting import resampling_unit, stage_metrics
from regionnet.run import build_datamodule, eval_trainer, log_eval

log = logging.getLogger(__name__)

SPLITS = ("test", "val")


def multi_data_config(cfg: DictConfig, ckpt_path: str | Path) -> DictConfig:
    """The run's `data` (its config.yaml) with its split.csv, the non-null `data.*` keys of
    `cfg` on top (e.g. `data.num_workers`)."""
    parent = Path(str(ckpt_path)).expanduser().resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    run_file = run_dir / "config.yaml"
    if not run_file.is_file():
        raise FileNotFoundError(
            f"{run_file} not found: ckpt_path={ckpt_path} is not in a regionnet run directory "
            "(<run_dir>/checkpoints/), so the films it was trained and split on are unknown"
        )
    data = OmegaConf.load(run_file).data
    if (run_dir / "split.csv").is_file():
        data.split_file = str(run_dir / "split.csv")
    else:
        log.warning("%s has no split.csv: re-splitting with the run's seeds", run_dir)
    user = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}))
    return OmegaConf.merge(data, {k: v for k, v in user.items() if v is not None})


def evaluate_multi(cfg: DictConfig, ckpt_path: str | Path) -> dict:
    """Evaluate the composed checkpoint `ckpt_path` (module docstring); return the metrics."""
    out = Path(cfg.paths.output_dir)
    split = str(cfg.get("split", "test"))
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r}: a model with landmark or box parts is evaluated on its run's "
            f"{' or '.join(SPLITS)} split"
        )
    model = load_multi_model(ckpt_path)
    dm = build_datamodule(OmegaConf.create({"data": multi_data_config(cfg, ckpt_path)}))
    dm.setup()
    dm.test_split = split
    out.mkdir(parents=True, exist_ok=True)
    trainer = eval_trainer(cfg, out)
    trainer.test(model, datamodule=dm, verbose=False)
    boot = {"resamples": 1000, "seed": 0, "ci": 0.95, **(cfg.get("bootstrap") or {})}
    table = test_predictions(trainer, model, dm)
    result: dict = {
        "checkpoint": str(Path(str(ckpt_path)).expanduser().resolve()),
        "task": "multi",
        "regions": list(model.regions),
        "parts": list(model.parts),
        "thresholds": dict(zip(model.regions, model.thresholds.tolist(), strict=True)),
        "split": split,
        "bootstrap": {**boot, "method": "percentile", "unit": {}},
    }
    if table is not None and len(table):
        result.update(_region_metrics(model, table, split, boot, result))
        outputs = _films(model.test_outputs)
        if "landmarks" in model.parts and outputs:
            result.update(_landmark_metrics(model, outputs, table, split, boot))
        if "boxes" in model.parts and outputs:
            result.update(_box_metrics(model, outputs, split))
    errors = [{"path": p, "reason": why, "stage": split} for p, why in model.test_errors]
    result[f"{split}/unreadable"] = len(errors)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = table if table is not None else pd.DataFrame()
    table.to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(errors, columns=["path", "reason", "stage"]).to_csv(
        out / "errors.csv", index=False
    )
    log_eval(cfg, result, {}, table)
    print_summary(result, model)
    log.info("evaluation of %s written to %s", ckpt_path, out)
    return result


def _region_metrics(model, table: pd.DataFrame, split: str, boot: dict, result: dict) -> dict:
    regions = list(model.regions)
    probs = table[[f"p_{r}" for r in regions]].to_numpy(float)
    labels = table[label_columns(regions)].to_numpy()
    unit = resampling_unit(table["patient_id"], table["path"])
    result["bootstrap"]["unit"][split] = unit
    return stage_metrics(
        split, probs, labels, table["true_region"], regions, model.thresholds.tolist(),
        groups=table["patient_id"] if unit == "patient" else None,
        resamples=int(boot["resamples"]), seed=int(boot["seed"]), ci=float(boot["ci"]),
    )  # fmt: skip


def _films(outputs: list[dict]) -> dict[str, list]:
    """The test pass's per-film outputs, flattened, each film once (the first)."""
    films: dict[str, list] = {}
    seen = set()
    for out in outputs:
        for k, path in enumerate(out["path"]):
            if path in seen:
                continue
            seen.add(path)
            films.setdefault("path", []).append(path)
            for key, value in out.items():
                if key != "path" and not isinstance(value, str):
                    films.setdefault(key, []).append(value[k])
    return films


def _landmark_metrics(model, films: dict, table: pd.DataFrame, split: str, boot: dict) -> dict:
    own = [k for k, has in enumerate(films["has_points"]) if bool(has)]
    if not own:
        return {}
    part = model.parts["landmarks"]
    metric = LandmarkMetrics(part.skeleton)

    def stack(key: str) -> torch.Tensor:
        return torch.stack([films[key][k] for k in own])

    metric.update(
        stack("points"), stack("points_px"), stack("visible"), stack("cobb"), stack("size")[:, 1]
    )
    patients = dict(zip(table["path"], table["patient_id"], strict=True))
    groups = np.array([patients.get(films["path"][k], films["path"][k]) for k in own])
    stage = f"{split}/landmarks"
    report = landmark_report(
        metric, part.names, stage, part.skeleton, int(boot["resamples"]), int(boot["seed"]),
        groups,
    )  # fmt: skip
    per_level = report.pop("per_level")
    return {**report, "landmarks_per_level": per_level}


def _box_metrics(model, films: dict, split: str) -> dict:
    own = [k for k, has in enumerate(films.get("has_points", [])) if bool(has)]
    if not own or "boxes_px" not in films:
        return {}
    keys = ("boxes", "scores", "labels")
    pairs = [
        ({key: films[key][k] for key in keys},
         {"boxes": films["boxes_px"][k], "labels": films["box_labels_px"][k]})
        for k in own
    ]  # fmt: skip
    names = model.parts["boxes"].names
    values = score_films(pairs, box_metric(), box_metric([0.5]), names, split)
    return {k.replace(f"{split}/", f"{split}/boxes/", 1): v for k, v in values.items()}
