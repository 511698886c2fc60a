"""Grad-CAM overlays: where each region head looks.

    python scripts/cam_example.py --ckpt RUN/checkpoints/best.ckpt --out cams/ a.dcm b.png
        overlays of the given radiographs (default: one phantom per head) with a trained model
    python scripts/cam_example.py
        no checkpoint: trains a small model on SYNTHETIC phantoms (about 10 minutes on two CPU
        cores, under a minute on a GPU) and writes docs/images/cam_<region>.png, one unseen
        phantom per region, for the README

A trained model should put the heat on the bones that tell the regions apart (humeral head and
glenoid, the elbow's joint, the many small hand bones, the pelvic ring, the knee joint), not on
the "L"/"R" marker, collimation edges or the black padding. At 128 px the last feature map is
4 x 4 and every cell sees the whole image, so the maps are coarse: the phantom model's hand,
shoulder and pelvis maps sit on the bones, its elbow and knee maps partly beside them (an
occlusion test puts their evidence on the humerus and femur).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A phantom model whose last feature map is 4 x 4 (resnet18, stride 32, 128 px): coarse but
# enough to see which part of the image a head uses (val AUROC about 0.99 on phantoms).
# Phantoms only: not clinical evidence. docs/images/cam_*.png come from exactly this.
PHANTOM_TRAINING = [
    "logger=csv",
    "trainer.max_epochs=15",
    "data.image_size=128",
    "data.phantom.per_region=60",
    "data.batch_size=32",
    "data.num_workers=0",
    "callbacks.progress_bar=null",
    "callbacks.early_stopping=null",
    "test=false",
]


def train_phantom_model(run_dir: Path, overrides: list[str]) -> Path:
    from regionnet.config import compose_config
    from regionnet.train import train

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = compose_config("train", [f"paths.output_dir={run_dir}", *PHANTOM_TRAINING, *overrides])
    train(cfg)
    return run_dir / "checkpoints" / "best.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="radiographs or phantom://region/seed URIs")
    parser.add_argument("--ckpt", help="checkpoint from regionnet-train; none: train on phantoms")
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override for the phantom training (repeatable), e.g. trainer.max_epochs=12",
    )
    parser.add_argument("--run-dir", type=Path, help="keep the phantom training run here")
    parser.add_argument("--out", type=Path, help="output folder (default docs/images)")
    # training phantoms of head k use seeds k * 100_003 + i, i < per_region: 99_999 is unseen
    parser.add_argument("--seed", type=int, default=99_999, help="seed of the default phantoms")
    args = parser.parse_args()

    from regionnet.cam import cam_for_file, save_png
    from regionnet.data.phantom import PHANTOM_REGIONS, parse_phantom_uri, phantom_uri
    from regionnet.model.module import load_regionnet

    out = args.out or ROOT / "docs" / "images"
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        ckpt = Path(args.ckpt) if args.ckpt else train_phantom_model(run_dir, args.train)
        model = load_regionnet(ckpt)
    images = args.images or [
        phantom_uri(r, args.seed) for r in model.regions if r in PHANTOM_REGIONS
    ]
    for image in images:
        if image.startswith("phantom://"):  # the true region's head, file cam_<region>.png
            name = parse_phantom_uri(image)[0]
            head = name if name in model.regions else None
        else:  # the most probable head, file named after the radiograph
            name, head = Path(image).stem, None
        overlay, region, prob = cam_for_file(model, image, region=head)
        path = save_png(overlay, out / f"cam_{name}.png")
        print(f"{image}: {region} head p={prob:.2f} -> {path}")


if __name__ == "__main__":
    main()
