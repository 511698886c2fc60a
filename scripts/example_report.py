"""Train a small phantom RegionNet on the CPU (1-2 minutes), evaluate it, and copy its ROC and
confusion figures to docs/images/ for the README.

    python scripts/example_report.py [--out outputs/example_report] [--epochs 6]

The test split comes from the training run; the external test set is a folder of phantom
PNGs drawn with other seeds at another size (a stand-in for a second site). Phantoms are
SYNTHETIC: the figures show what regionnet-eval reports, not how well it works on radiographs.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = ("shoulder", "elbow", "hand", "pelvis", "knee", "chest", "foot")  # chest, foot: other


def write_external(root: Path, per_region: int, size: int = 96) -> Path:
    """root/<region>/<i>.png phantoms with seeds the training set does not use."""
    for region in EXTERNAL:
        (root / region).mkdir(parents=True, exist_ok=True)
        for i in range(per_region):
            pixels = (render_phantom(region, 7_000_000 + i, size) * 255).round()
            Image.fromarray(pixels.astype(np.uint8)).save(root / region / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "example_report")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--per-region", type=int, default=40, help="phantoms per region")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init; never download

    from regionnet.evaluate import evaluate
    from regionnet.train import train

    shutil.rmtree(args.out, ignore_errors=True)
    common = ["logger=csv", "trainer.accelerator=cpu", "data.num_workers=0"]
    train(
        compose_config(
            "train",
            [
                *common,
                f"paths.output_dir={args.out / 'train'}",
                f"trainer.max_epochs={args.epochs}",
                f"data.phantom.per_region={args.per_region}",
                "data.image_size=48",
                "data.batch_size=32",
                "callbacks.early_stopping=null",
                "seed=0",
            ],
        )
    )
    external = write_external(args.out / "external", per_region=max(4, args.per_region // 4))
    evaluate(
        compose_config(
            "eval",
            [
                f"ckpt_path={args.out / 'train' / 'checkpoints' / 'best.ckpt'}",
                f"paths.output_dir={args.out / 'eval'}",
                f"data.external_test={external}",
                "trainer.accelerator=cpu",
                "num_workers=0",
            ],
        )
    )
    args.docs.mkdir(parents=True, exist_ok=True)
    for name in ("roc.png", "confusion.png"):
        target = shutil.copy(args.out / "eval" / name, args.docs / name)
        print(f"{target}: {Path(target).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
