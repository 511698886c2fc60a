"""Does self-supervised pretraining help? For scripts/benchmark.py.

One run: `regionnet-pretrain` on ../shared/data's unlabelled films plus the labelled training
split (never val/test), starting from the default backbone's ImageNet weights (`start=imagenet`;
`random` starts from random init), then three fine-tunes of the study protocol on the same
split (the split the pretraining used, via `data.split_file`): from the starting weights alone
(`base`: ImageNet, or `scratch` for random), from the SSL backbone, and from the SSL backbone
with the recipe experiment (chosen on the validation split before this run). Each is evaluated
as the accuracy section does (per head with bootstrap CIs, within the fracture-film source, per
out-of-set anatomy), plus in-set sensitivity at the operating thresholds, so rejection is never
reported without what it costs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from bench_accuracy import _manifest, one_protocol, protocol_overrides

from regionnet.config import compose_config
from regionnet.pretrain import pretrain
from regionnet.regions import REGIONS, UNKNOWN

ROWS = ("base", "ssl", "ssl_recipe")


def operating_point(eval_dir: Path, thresholds: dict) -> dict:
    """Test-split rejection of out-of-set films (all, and chest) and in-set sensitivity (the
    true region's head fires) at the thresholds chosen on val."""
    pred = pd.read_csv(eval_dir / "predictions.csv")
    pred = pred[pred["split"] == "test"]
    inset = pred[pred["true_region"].isin(REGIONS)]
    fired = [
        inset.at[i, f"p_{region}"] >= thresholds[region]
        for i, region in inset["true_region"].items()
    ]
    other = pred[pred["true_region"] == "other"]
    return {
        "in_set_images": len(inset),
        "in_set_sensitivity": float(sum(fired) / max(1, len(fired))),
        "in_set_top1": float((inset["region"] == inset["true_region"]).mean()),
        "other_images": len(other),
        "other_rejected": float((other["region"] == UNKNOWN).mean()) if len(other) else None,
    }


def ssl_section(
    data_dir: Path,
    out_dir: Path,
    quick: bool,
    size: int,
    epochs: int,
    augment_factor: int,
    precision: str,
    pretrain_size: int,
    pretrain_epochs: int,
    pretrain_minutes: int,
    method: str,
    recipe: str,
    log,
    start: str = "imagenet",
) -> dict:
    manifest = _manifest(data_dir)
    run = out_dir / "artifacts" / "ssl_pretrain"
    overrides = [
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={run}",
        f"ssl={method}",
        f"model.pretrained={'true' if start == 'imagenet' else 'false'}",
        "logger=csv",
        f"trainer.precision={precision}",
        f"data.image_size={pretrain_size}",
        f"trainer.max_epochs={pretrain_epochs}",
        f"trainer.max_time=00:00:{pretrain_minutes:02d}:00",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
    if quick:
        overrides += ["data.max_images=256", "data.batch_size=32", "trainer.limit_train_batches=2"]
    log(f"ssl: pretraining ({' '.join(overrides)})")
    t0 = time.perf_counter()
    pre = pretrain(compose_config("pretrain", overrides))
    pre_seconds = time.perf_counter() - t0
    weights, split = run / "backbone.pth", run / "labelled_split.csv"

    base = [
        *protocol_overrides(data_dir, quick, size, epochs, augment_factor, precision),
        f"data.split_file={split}",
    ]
    rows_overrides = {
        "base": [
            "experiment=yi2019",
            f"model.pretrained={'true' if start == 'imagenet' else 'false'}",
            *base,
        ],
        "ssl": ["experiment=yi2019", *base, f"model.weights_file={weights}"],
        "ssl_recipe": [f"experiment={recipe}", *base, f"model.weights_file={weights}"],
    }
    out: dict = {
        "settings": {
            "method": method,
            "start": start,
            "recipe": recipe,
            "pretrain_image_size": pretrain_size,
            "pretrain_epochs_max": pretrain_epochs,
            "pretrain_minutes_max": pretrain_minutes,
            "image_size": size,
            "epochs": epochs,
            "augment_factor": augment_factor,
            "precision": precision,
        },
        "pretrain": {**pre, "wall_seconds": pre_seconds},
    }
    for name in ROWS:
        key = "scratch" if name == "base" and start == "random" else name
        row = one_protocol(f"ssl_{key}", rows_overrides[name], out_dir, data_dir, manifest, log)
        eval_dir = Path(row["checkpoint"]).parents[1] / "eval"
        row["operating_point"] = operating_point(eval_dir, row["eval"]["thresholds"])
        out[key] = row
    (out_dir / "artifacts" / "ssl.json").write_text(json.dumps(out, indent=2, default=str))
    return out
