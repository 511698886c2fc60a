"""The ssl section: does self-supervised pretraining help?

One run: `regionnet-pretrain` on ../shared/data's unlabelled films plus the labelled training
split (never val/test), starting from the default backbone's ImageNet weights (`ssl_start=
imagenet`; `random` starts from random init), then three fine-tunes of the study protocol on the
same split (the split the pretraining used, via `data.split_file`): from the starting weights
alone (`base`: ImageNet, or `scratch` for random), from the SSL backbone, and from the SSL
backbone with the recipe experiment (chosen on the validation split before this run). Each is
evaluated as the accuracy section does (per head with bootstrap CIs, within the fracture-film
source, per out-of-set anatomy), plus in-set sensitivity at the operating thresholds, so
rejection is never reported without what it costs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from regionnet.bench.protocol import (
    one_protocol,
    operating_point,
    protocol_overrides,
    read_manifest,
)
from regionnet.bench.settings import BenchSettings, log
from regionnet.config import compose_config
from regionnet.pretrain import pretrain

ROWS = ("base", "ssl", "ssl_recipe")


def ssl_section(settings: BenchSettings) -> dict:
    s = settings
    manifest = read_manifest(s.data_dir)
    run = s.artifacts / "ssl_pretrain"
    pretrained = "true" if s.ssl_start == "imagenet" else "false"
    overrides = [
        f"paths.data_dir={s.data_dir}",
        f"paths.output_dir={run}",
        f"ssl={s.ssl_method}",
        f"model.pretrained={pretrained}",
        "logger=csv",
        f"trainer.precision={s.precision}",
        f"data.image_size={s.pretrain_size}",
        f"trainer.max_epochs={s.pretrain_epochs}",
        f"trainer.max_time=00:00:{s.pretrain_minutes:02d}:00",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
    if s.quick:  # the labelled part from the quick manifest the fine-tunes use
        overrides += [
            f"data.labelled.csv={s.quick_manifest}",
            f"data.num_workers={s.num_workers}",
            "data.max_images=64",
            "data.batch_size=16",
            "trainer.limit_train_batches=2",
        ]
    log(f"ssl: pretraining ({' '.join(overrides)})")
    t0 = time.perf_counter()
    pre = pretrain(compose_config("pretrain", overrides))
    pre_seconds = time.perf_counter() - t0
    weights, split = run / "backbone.pth", run / "labelled_split.csv"

    base = [*protocol_overrides(s, s.accuracy), f"data.split_file={split}"]
    rows_overrides = {
        "base": ["experiment=yi2019", f"model.pretrained={pretrained}", *base],
        "ssl": ["experiment=yi2019", *base, f"model.weights_file={weights}"],
        "ssl_recipe": [f"experiment={s.recipe}", *base, f"model.weights_file={weights}"],
    }
    out: dict = {
        "settings": {
            "method": s.ssl_method,
            "start": s.ssl_start,
            "recipe": s.recipe,
            "pretrain_image_size": s.pretrain_size,
            "pretrain_epochs_max": s.pretrain_epochs,
            "pretrain_minutes_max": s.pretrain_minutes,
            "image_size": s.accuracy.image_size,
            "epochs": s.accuracy.epochs,
            "augment_factor": s.accuracy.augment_factor,
            "precision": s.precision,
        },
        "pretrain": {**pre, "wall_seconds": pre_seconds},
    }
    for name in ROWS:
        key = "scratch" if name == "base" and s.ssl_start == "random" else name
        row = one_protocol(s, f"ssl_{key}", rows_overrides[name], manifest)
        eval_dir = Path(row["checkpoint"]).parents[1] / "eval"
        row["operating_point"] = operating_point(eval_dir, row["eval"]["thresholds"])
        out[key] = row
    (s.artifacts / "ssl.json").write_text(json.dumps(out, indent=2, default=str))
    return out
