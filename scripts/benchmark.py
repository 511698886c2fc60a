"""regionnet benchmarks on real radiographs and this machine, in one run.

    python scripts/benchmark.py            # the full run (the transfer section trains at the
                                           # experiment configs' size and epochs unless
                                           # --transfer-image-size/-epochs/-augment-factor)
    python scripts/benchmark.py --quick    # a smoke test of every section, about a minute on
                                           # 2 CPU cores: 32 px, ~90 films, a few batches, short
                                           # timings, one thread; no meaningful number
    python scripts/benchmark.py --skip backbones scaling --out /tmp/bench

Writes `<out>/results.json` and `<out>/RESULTS.md` (and `<out>/scaling.png`,
`<out>/reliability.png`); trained checkpoints and Grad-CAM overlays stay in
`<out>/artifacts/` (git-ignored). Every figure in RESULTS.md is measured
by this run; nothing is typed by hand. The code is the package `regionnet.bench`; this
script is its command line. Sections:
  accuracy   the study's protocol (experiment=yi2019) on ../shared/data, evaluated per head,
             per out-of-set anatomy, within the fracture-film source, on full-resolution files,
             and again with crop augmentation that hides image size and crop style
  speed      shared backbone + 5 heads vs five ResNet-18s, fp32/bf16, channels_last, batch and
             image sizes, end-to-end regionnet-predict vs model-only, GFLOP/s vs matmul roofline
  scaling    throughput and peak memory as batch size and image size grow (scaling.png)
  backbones  a Hydra multirun over timm backbones on the real data, one row each
  ssl        regionnet-pretrain (SimCLR) on the unlabelled films, continued from ImageNet
             weights, then ImageNet vs ImageNet + SSL vs that + recipe fine-tunes on one split
             (regionnet/bench/ssl.py)
  transfer   scratch vs ImageNet weights vs ImageNet + recipe (experiment=yi2019 / recipe) on
             one split, the external shoulder set, calibration, Grad-CAM of the worst errors,
             hand across its two sources, inference speed of the default backbone vs
             ResNet-18 (regionnet/bench/transfer.py)
  landmarks  DSNT landmark heads (task=landmarks) on spine_aasce and hand_dha: step 1 vs
             2-step, corner errors, MRE, PCK, Cobb MAE/SMAPE with patient-bootstrap CIs, films/s,
             within --landmarks-minutes (regionnet/bench/landmarks.py)
  findings   finding heads on the region model (task=knee_oa + an ordinal KL-grade head):
             knee OA test AUROC with its CI, sensitivity/specificity at the validation
             threshold, KL-grade accuracy/kappa/MAE/confusion; region accuracy with and without
             the finding heads (task=regions, task=knee_oa alone, same budget); vertebra
             boxes (task=boxes, vertebrae, not lesions) mAP@0.5, mAP@[.5:.95] and per-level
             AP; predict time per film; within --findings-minutes (regionnet/bench/findings.py)
  compose    region heads + hand landmarks as parts of one model (task=multi) against each
             alone (task=regions, task=landmarks), same size and budget: region AUROC with and
             without the part (paired; a second task=regions seed as the yardstick), hand MRE
             alone and composed, time per film of one composed model vs the two; within
             --compose-minutes (regionnet/bench/compose.py)

    python scripts/benchmark.py --render-only   # RESULTS.md again from results.json, no run
    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl --merge
                                           # only the transfer section, into the existing results
    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl transfer --merge
                                           # only the landmarks section (about 25 min)
    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl transfer findings \
        --merge --landmarks-rows hand.two_step  # one landmarks row, the others kept
    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl transfer landmarks \
        compose --merge                    # only the findings section (about 40 min)
    python scripts/benchmark.py --skip accuracy speed scaling backbones ssl transfer landmarks \
        findings --merge                   # only the compose section (about 30 min)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from regionnet.bench.settings import SECTIONS, BenchSettings, FineTune

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke test of every section (about a minute)"
    )
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
        "--landmarks-minutes",
        type=float,
        default=20.0,
        help="wall-clock budget of all the landmarks section's trainings (minutes)",
    )
    p.add_argument("--landmarks-image-size", type=int, default=256, help="landmark input size (px)")
    p.add_argument(
        "--landmarks-rows",
        nargs="+",
        default=(),
        metavar="GROUP.ROW",
        help="landmarks section: train only these rows (e.g. hand.two_step) and keep the others "
        "from the existing results.json",
    )
    p.add_argument(
        "--findings-minutes",
        type=float,
        default=BenchSettings.findings_minutes,
        help="findings section: the budget its trainings' shares are taken of (minutes; "
        "28 %% per region run, 56 %% for the separate finding backbone, 30 %% for the box "
        "run, 170 %% in all)",
    )
    p.add_argument(
        "--findings-runs",
        nargs="+",
        default=(),
        metavar="RUN",
        help="findings section: train only these runs (knee_oa, knee_oa_binary, regions, "
        "knee_oa_separate, boxes) and keep the others from the existing results.json and their "
        "evaluations under artifacts/findings/",
    )
    p.add_argument(
        "--compose-minutes",
        type=float,
        default=24.0,
        help="compose section: the budget its five trainings' shares are taken of (minutes; "
        "25 %% each, at most)",
    )
    p.add_argument(
        "--predict-ckpt",
        type=Path,
        default=None,
        help="region checkpoint of the speed section's end-to-end predict and int8 figures "
        "(default: the accuracy section's; e.g. a 224 px model to measure at the study's size)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: write RESULTS.md again from the existing results.json (after a "
        "change to the report's wording)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of <out>/results.json that this run skips (each section "
        "records the commit and date it was measured at)",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, argv: list[str]) -> BenchSettings:
    if args.precision is None:
        from regionnet.precision import fast_precision

        args.precision = fast_precision()
    settings = BenchSettings(
        data_dir=args.data_dir,
        out_dir=args.out,
        precision=args.precision,
        skip=frozenset(args.skip),
        merge=args.merge,
        accuracy=FineTune(args.image_size, args.epochs, args.augment_factor),
        backbone_size=args.backbone_size,
        backbone_epochs=args.backbone_epochs,
        pretrain_size=args.pretrain_size,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_minutes=args.pretrain_minutes,
        ssl_method=args.ssl_method,
        ssl_start=args.ssl_start,
        recipe=args.recipe,
        transfer_experiment=args.transfer_experiment,
        transfer=FineTune(
            args.transfer_image_size, args.transfer_epochs, args.transfer_augment_factor
        ),
        transfer_accelerator=args.transfer_accelerator,
        landmarks_minutes=args.landmarks_minutes,
        landmarks_image_size=args.landmarks_image_size,
        landmarks_rows=tuple(args.landmarks_rows),
        findings_minutes=args.findings_minutes,
        findings_runs=tuple(args.findings_runs),
        compose_minutes=args.compose_minutes,
        predict_ckpt=args.predict_ckpt,
        repo=ROOT,
        command=" ".join(["python", "scripts/benchmark.py", *argv]),
    )
    return settings.quick_sized() if args.quick else settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.render_only:
        import json

        from regionnet.bench.report import markdown_report

        results = json.loads((args.out / "results.json").read_text())
        (args.out / "RESULTS.md").write_text(markdown_report(results))
        print(f"wrote {args.out / 'RESULTS.md'} from {args.out / 'results.json'}")
        return 0
    settings = settings_from(args, argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from regionnet.bench.run import run_benchmark

    run_benchmark(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
