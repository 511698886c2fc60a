"""regionnet benchmarks on real radiographs and this machine, in one run.

    python scripts/benchmark.py            # the full run (the transfer section trains at the
                                           # experiment configs' size and epochs unless
                                           # --transfer-image-size/-epochs/-augment-factor)
    python scripts/benchmark.py --quick    # a smoke test of every section (15 min on 2 busy
                                           # CPU cores; the transfer part about 3)
    python scripts/benchmark.py --skip backbones scaling --out /tmp/bench

Writes `<out>/results.json` and `<out>/RESULTS.md` (and `<out>/scaling.png`,
`<out>/reliability.png`, `<out>/cam_errors/*.png`); trained checkpoints stay in
`<out>/artifacts/` (git-ignored). Every figure in RESULTS.md is measured
by this script in this run; nothing is typed by hand. Sections:
  accuracy   the study's protocol (experiment=yi2019) on ../shared/data, evaluated per head,
             per out-of-set anatomy, within the fracture-film source, on full-resolution files,
             and again with crop augmentation that hides image size and crop style
  speed      shared backbone + 5 heads vs five ResNet-18s, fp32/bf16, channels_last, batch and
             image sizes, end-to-end regionnet-predict vs model-only, GFLOP/s vs matmul roofline
  scaling    throughput and peak memory as batch size and image size grow (scaling.png)
  backbones  a Hydra multirun over timm backbones on the real data, one row each
  ssl        regionnet-pretrain (SimCLR) on the unlabelled films, continued from ImageNet
             weights, then ImageNet vs ImageNet + SSL vs that + recipe fine-tunes on one split
             (see bench_ssl.py)
  transfer   scratch vs ImageNet weights vs ImageNet + recipe (experiment=yi2019 / recipe) on
             one split, the external shoulder set, calibration, Grad-CAM of the worst errors,
             hand across its two sources, inference speed of the default backbone vs
             ResNet-18 (see bench_transfer.py)

    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl --merge
                                           # only the transfer section, into the existing results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDY_RATE = 33.0  # radiographs/s reported by Yi et al. 2019 (five ResNet-18s, a GPU)
SECTIONS = ("accuracy", "speed", "scaling", "backbones", "ssl", "transfer")
BACKBONES = ("resnet18", "mobilenetv3_large_100", "efficientnet_b0", "convnext_atto")


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "regionnet", "conf", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit + ("+uncommitted" if dirty else ""),
        "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def predict_throughput(ckpt: Path, folder: Path, out: Path, quick: bool) -> dict:
    """End-to-end regionnet-predict on a folder of real files vs model-only at the same size."""
    from bench_speed import images_per_second

    from regionnet.api import load_model
    from regionnet.config import compose_config
    from regionnet.predict import predict

    model = load_model(ckpt).model
    size = int(model.hparams.image_size)
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={ckpt}",
            f"input={folder}",
            f"output={out / 'predict_bench.csv'}",
            f"paths.output_dir={out}",
            "batch_size=32",
            "num_workers=2",
            "accelerator=cpu",
        ],
    )
    summary = predict(cfg)
    model_only = images_per_second(model, 32, size, repeats=3 if quick else 5)
    return {
        "input": str(folder),
        "image_size": size,
        "files": summary.get("total", summary.get("ok")),
        "end_to_end_per_s": summary["per_second"],
        "model_only_per_s": model_only,
        "fraction_of_model_only": summary["per_second"] / model_only,
        "study_per_s": STUDY_RATE,
    }


def backbones_section(
    data_dir: Path, out: Path, quick: bool, size: int, epochs: int, precision: str
) -> dict:
    """`regionnet-train -m` over timm backbones on the real data; gathered into one table,
    plus each backbone's inference radiographs/s measured here."""
    from bench_speed import images_per_second

    from regionnet.model.module import RegionNet
    from regionnet.sweep import gather

    names = BACKBONES[:2] if quick else BACKBONES
    sweep = out / "artifacts" / "backbones"
    cmd = [
        shutil.which("regionnet-train") or "regionnet-train",
        "-m",
        f"hydra.sweep.dir={sweep}",
        f"model={','.join(names)}",
        "data=shared",
        f"paths.data_dir={data_dir}",
        "logger=csv",
        "trainer.accelerator=cpu",
        f"data.image_size={size}",
        f"trainer.max_epochs={epochs}",
        "data.num_workers=2",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "skip_if_done=false",
    ]
    if quick:
        cmd += [
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
        ]
    log(f"backbones: regionnet-train {' '.join(cmd[1:])}")
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    table = gather(sweep)
    rows = []
    for _, row in table.iterrows():
        model = RegionNet(backbone=row["backbone"]).eval()
        rate = images_per_second(model, 16, size, repeats=3 if quick else 5)
        rows.append({**{k: _plain(v) for k, v in row.items()}, "infer_images_per_s": rate})
    return {
        "sweep_dir": str(sweep),
        "image_size": size,
        "epochs": epochs,
        "precision": precision,
        "rows": rows,
    }


def _plain(v):
    try:
        return v.item()
    except AttributeError:
        return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test of every section (minutes)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to skip")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--image-size", type=int, default=112, help="accuracy training size")
    p.add_argument("--epochs", type=int, default=12, help="accuracy training epochs")
    p.add_argument("--augment-factor", type=int, default=1, help="data.augment_factor")
    p.add_argument(
        "--precision",
        default=None,
        help="trainer.precision for training (default: bf16-mixed where bf16 is native, else "
        "32-true: emulated bf16 on an AVX2-only CPU is several times slower)",
    )
    p.add_argument("--backbone-size", type=int, default=96)
    p.add_argument("--backbone-epochs", type=int, default=6)
    p.add_argument("--pretrain-size", type=int, default=64, help="SSL view size (px)")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-minutes", type=int, default=25, help="SSL wall-time budget")
    p.add_argument("--ssl-method", default="simclr", choices=("simclr", "byol"))
    p.add_argument(
        "--ssl-start",
        default="imagenet",
        choices=("imagenet", "random"),
        help="weights the SSL pretraining (and its baseline row) start from",
    )
    p.add_argument("--recipe", default="recipe", help="experiment config of the recipe rows")
    p.add_argument(
        "--transfer-experiment",
        default="yi2019",
        help="experiment config of the transfer section's scratch and ImageNet rows",
    )
    p.add_argument(
        "--transfer-image-size",
        type=int,
        default=None,
        help="data.image_size of the transfer rows (default: the experiment config's)",
    )
    p.add_argument(
        "--transfer-epochs",
        type=int,
        default=None,
        help="trainer.max_epochs of the transfer rows (default: the experiment config's)",
    )
    p.add_argument(
        "--transfer-accelerator",
        default="cpu",
        help="trainer.accelerator of the transfer trainings (cpu, gpu or auto)",
    )
    p.add_argument(
        "--transfer-augment-factor",
        type=int,
        default=None,
        help="data.augment_factor of the transfer rows (default: the experiment config's)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of <out>/results.json that this run skips (each section "
        "records the commit and date it was measured at)",
    )
    args = p.parse_args(argv)
    if args.precision is None:
        from regionnet.precision import fast_precision

        args.precision = fast_precision()
    if args.quick:
        args.image_size, args.epochs, args.backbone_size, args.backbone_epochs = 48, 1, 48, 1
        args.transfer_image_size, args.transfer_epochs, args.transfer_augment_factor = 48, 1, 1
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    args.out.mkdir(parents=True, exist_ok=True)
    needs_data = any(s not in args.skip for s in ("accuracy", "backbones", "ssl", "transfer"))
    if needs_data and not (args.data_dir / "radiographs" / "manifest.csv").is_file():
        raise SystemExit(
            f"--data-dir {args.data_dir} has no radiographs/manifest.csv; "
            "give the shared data folder or --skip accuracy backbones ssl transfer"
        )

    results: dict = {"machine": machine(), "quick": args.quick}
    # where this run's paths point, so RESULTS.md can name them relative to the repository,
    # the output folder or the data folder (bench_report.relativise)
    results["paths"] = {
        "repo": str(ROOT),
        "out": str(args.out.resolve()),
        "data": str(args.data_dir.resolve()),
    }
    previous = args.out / "results.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for section in SECTIONS:
            if section in args.skip and section in old:
                results[section] = old[section]
                results[section].setdefault("machine", old["machine"])
        results["machine_of_skipped"] = old["machine"]
        if "paths" in old:
            results["paths_of_skipped"] = old["paths"]
    start = time.perf_counter()
    if "accuracy" not in args.skip:
        from bench_accuracy import accuracy_section

        results["accuracy"] = accuracy_section(
            args.data_dir,
            args.out,
            args.quick,
            args.image_size,
            args.epochs,
            args.augment_factor,
            args.precision,
            log,
        )
    if "backbones" not in args.skip:
        results["backbones"] = backbones_section(
            args.data_dir,
            args.out,
            args.quick,
            args.backbone_size,
            args.backbone_epochs,
            args.precision,
        )
    if "ssl" not in args.skip:
        from bench_ssl import ssl_section

        results["ssl"] = ssl_section(
            args.data_dir,
            args.out,
            args.quick,
            args.image_size,
            args.epochs,
            args.augment_factor,
            args.precision,
            48 if args.quick else args.pretrain_size,
            1 if args.quick else args.pretrain_epochs,
            args.pretrain_minutes,
            args.ssl_method,
            args.recipe,
            log,
            args.ssl_start,
        )
        results["ssl"]["machine"] = results["machine"]
    if "transfer" not in args.skip:
        from bench_transfer import transfer_section

        results["transfer"] = transfer_section(
            args.data_dir,
            args.out,
            args.quick,
            args.precision,
            args.transfer_experiment,
            args.recipe,
            args.transfer_image_size,
            args.transfer_epochs,
            args.transfer_augment_factor,
            log,
            args.transfer_accelerator,
        )
        results["transfer"]["machine"] = results["machine"]
    # timing sections last: they want a quiet machine, the training sections do not mind
    if "speed" not in args.skip:
        from bench_speed import speed_section

        results["speed"] = speed_section(args.quick, log)
        if "accuracy" in results and "accuracy" not in args.skip:
            log("speed: end-to-end regionnet-predict on the real radiographs folder")
            ckpt = Path(results["accuracy"]["yi2019"]["checkpoint"])
            folder = args.data_dir / "radiographs" / ("kneeoa_rohan145" if args.quick else "")
            results["speed"]["predict"] = predict_throughput(
                ckpt, folder, args.out / "artifacts", args.quick
            )
            acc = results["accuracy"]["yi2019"]
            results["speed"]["training"] = {
                "images_per_s": acc["train_images_per_s"],
                "seconds_to_val_auroc_mean_0.99": acc["seconds_to_val_auroc_mean_0.99"],
            }
    if "scaling" not in args.skip:
        from bench_speed import plot_scaling, scaling_section

        results["scaling"] = scaling_section(args.quick, log)
        plot_scaling(results["scaling"], args.out / "scaling.png")
    results["wall_seconds"] = time.perf_counter() - start

    from bench_report import markdown_report, portable_json

    (args.out / "results.json").write_text(portable_json(results))
    (args.out / "RESULTS.md").write_text(markdown_report(results))
    log(
        f"wrote {args.out / 'results.json'} and {args.out / 'RESULTS.md'} "
        f"in {results['wall_seconds'] / 60:.1f} min"
    )
    if "accuracy" in results:
        log(f"real-data checkpoint: {results['accuracy']['yi2019']['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
