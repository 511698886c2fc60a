"""The backbones section: `regionnet-train -m` over timm backbones on the real data, gathered
into one table, with each backbone's model-only inference radiographs/s measured here."""

from __future__ import annotations

import os
import shutil
import subprocess

from regionnet.bench.settings import BenchSettings, log
from regionnet.bench.speed import build, images_per_second

BACKBONES = ("resnet18", "mobilenetv3_large_100", "efficientnet_b0", "convnext_atto")


def _plain(v):
    try:
        return v.item()
    except AttributeError:
        return v


def backbones_section(settings: BenchSettings) -> dict:
    from regionnet.sweep import gather

    quick, size, epochs = settings.quick, settings.backbone_size, settings.backbone_epochs
    names = BACKBONES[:2] if quick else BACKBONES
    sweep = settings.artifacts / "backbones"
    cmd = [
        shutil.which("regionnet-train") or "regionnet-train",
        "-m",
        f"hydra.sweep.dir={sweep}",
        f"model={','.join(names)}",
        "data=shared",
        f"paths.data_dir={settings.data_dir}",
        "logger=csv",
        "trainer.accelerator=cpu",
        f"trainer.precision={settings.precision}",
        f"data.image_size={size}",
        f"trainer.max_epochs={epochs}",
        f"data.num_workers={settings.num_workers}",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "skip_if_done=false",
    ]
    if quick:
        cmd += [
            f"data.csv={settings.quick_manifest}",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
        ]
    log(f"backbones: regionnet-train {' '.join(cmd[1:])}")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=settings.repo, check=True, env=env)
    table = gather(sweep)
    rows = []
    for _, row in table.iterrows():
        model = build(True, row["backbone"])
        rate = images_per_second(model, 16, size, min_run_time=0.05 if quick else 2.5)
        rows.append({**{k: _plain(v) for k, v in row.items()}, "infer_images_per_s": rate})
    return {
        "sweep_dir": str(sweep),
        "image_size": size,
        "epochs": epochs,
        "precision": settings.precision,
        "rows": rows,
    }
