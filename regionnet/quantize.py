"""int8 static quantisation of an exported ONNX model, guarded by AUROC
(`regionnet-export format=onnx quantize=int8`).

Steps: `quant_pre_process` (shape inference, graph optimisation) of the float32 export, then
`onnxruntime.quantization.quantize_static` in QDQ format with per-channel int8 weights and
uint8 activations (ONNX Runtime's recommended x86 setting), activation ranges calibrated
(`calibrate_method`: the 99.99th percentile of each activation's values by default, or
MinMax / Entropy) on `calibration_films` films of the checkpoint's training split, preprocessed by
`eval_transform(model)` like every other inference path. The int8 graph and the float32 graph
then predict the guard films (the run's validation split by default; never the test split,
which stays untouched for reporting); per head with both classes among them, AUROC
(torchmetrics, `regionnet.reporting.auroc`) of each. When the mean drop over those heads
exceeds `max_auroc_drop` the int8 file is refused (`QuantizationRefused`) and nothing is
written; otherwise the facts go into the sidecar's `quantization` entry.

Film sets: a split name of the run's `split.csv` (`<run_dir>/split.csv`, next to
`<run_dir>/checkpoints/`, as `regionnet-eval` finds it), or a CSV manifest / folder tree
(`regionnet.data.sources.records_from_path`). onnxruntime is the optional `export` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from regionnet.data.dataset import RadiographDataset, collate
from regionnet.data.sources import label_columns, records_from_path
from regionnet.data.transforms import eval_transform
from regionnet.reporting import auroc, decide_all

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)
SPLITS = ("train", "val", "test")
#: calibrate_method= choices. `auto` (the default) quantises with percentile and with minmax
#: and keeps the file whose guard-film probabilities stay closest to float32's (mean |p_int8 -
#: p_fp32|): neither wins everywhere. On the ssl_base benchmark model (EfficientNet-Lite0,
#: 224 px, 470 test films) MinMax on 64 films lost 0.0030 test AUROC, moved probabilities by
#: 0.028 on average (at most 0.37) and changed 6.0 % of regions; the 99.99th percentile on 128
#: films lost 0.0014, 0.015 (at most 0.18) and 4.5 % (a few extreme activations stretch
#: MinMax's range and waste the 256 levels on the rest). On the tiny phantom model of the
#: tests, whose extremes carry the signal, MinMax is the closer one.
CALIBRATE_METHODS = ("auto", "percentile", "minmax", "entropy")
AUTO_METHODS = ("percentile", "minmax")
INSTALL_HINT = "pip install 'regionnet[export]' (or pip install onnx onnxruntime)"


class QuantizationRefused(RuntimeError):
    """The int8 model loses more AUROC on the guard films than `max_auroc_drop` allows."""


def quantize_mode(value) -> str | None:
    """`quantize`: null (float32 only) or int8."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    mode = str(value).strip().lower()
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={value!r}: choose null (float32) or int8")
    return mode


def import_quantization():
    """onnxruntime's quantization module, or an ImportError saying how to install it."""
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise ImportError(f"quantize=int8 needs onnxruntime: {INSTALL_HINT}") from e
    return quantization, quant_pre_process


def int8_path(output: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside the float32 file."""
    return output.with_name(f"{output.stem}.int8{output.suffix or '.onnx'}")


# -- film sets --------------------------------------------------------------------------------
def run_dir_of(ckpt: Path) -> Path:
    """The training run directory of a checkpoint (`<run_dir>/checkpoints/best.ckpt`)."""
    parent = Path(ckpt).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def film_table(spec: str, regions: list[str], ckpt: Path, key: str) -> pd.DataFrame:
    """Records (`path`, `label_<region>` in head order) of `spec`: a split of the run's
    split.csv, or a CSV manifest / folder tree. `key` is the config key, for errors."""
    spec = str(spec)
    if spec in SPLITS:
        split_csv = run_dir_of(ckpt) / "split.csv"
        if not split_csv.is_file():
            raise FileNotFoundError(
                f"{key}={spec}: {split_csv} not found, so the checkpoint's {spec} split is "
                f"unknown (a checkpoint of regionnet-train lies in <run_dir>/checkpoints/). "
                f"Give {key}=FILE.csv (path + region) or a folder of <region>/ subfolders"
            )
        records = pd.read_csv(split_csv, dtype={"path": str, "split": str})
        records = records[records["split"] == spec]
        where = f"split {spec!r} of {split_csv}"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{key}={spec!r}: neither a split ({', '.join(SPLITS)}) nor an existing CSV or "
                "folder"
            )
        records = records_from_path(path, tuple(regions), unknown_as_other=True)
        where = str(path)
    missing = [c for c in label_columns(regions) if c not in records]
    if missing:
        raise ValueError(f"{key}={spec}: {where} lacks the label columns {missing}")
    if records.empty:
        raise ValueError(f"{key}={spec}: {where} holds no films")
    return records.reset_index(drop=True).assign(_from=where)


def pick(records: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `n` films, seeded, taken in turn from each region (so a small region such as
    pelvis is among the calibration films too); all of them when `n` is null."""
    if n is None or len(records) <= int(n):
        return records
    shuffled = records.sample(frac=1.0, random_state=seed)
    turn = shuffled.groupby(shuffled["region"].astype(str), sort=False).cumcount()
    return shuffled.assign(_turn=turn.to_numpy()).sort_values("_turn", kind="stable").head(int(n))


def load_films(
    records: pd.DataFrame, model, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (N, 1, S, S) float32 preprocessed by `eval_transform(model)`, labels (N, R),
    paths); unreadable films are left out (logged by the dataset)."""
    dataset = RadiographDataset(
        records,
        list(model.regions),
        eval_transform(model),
        phantom_size=int(model.hparams.image_size),
    )
    images, labels, paths = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if "image" in batch:
            images.append(batch["image"].numpy())
            labels.append(batch["labels"].numpy())
            paths += batch["path"]
    if not images:
        raise ValueError(f"none of the {len(records)} films of {records['_from'].iloc[0]} reads")
    return np.concatenate(images), np.concatenate(labels), paths


def calibration_reader(images: np.ndarray, input_name: str, batch_size: int = 8):
    """An onnxruntime `CalibrationDataReader` giving the preprocessed films in batches."""
    quantization, _ = import_quantization()

    class FilmReader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches: Iterator[dict] = iter(
                {input_name: np.ascontiguousarray(images[i : i + batch_size])}
                for i in range(0, len(images), batch_size)
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    return FilmReader()


def session(path_or_bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    return np.concatenate(
        [
            sess.run([name_out], {name_in: np.ascontiguousarray(images[i : i + batch_size])})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def auroc_change(
    labels: np.ndarray, p_fp32: np.ndarray, p_int8: np.ndarray, regions: list[str], where: str
) -> dict:
    """Per head with both classes among the films: AUROC of float32 and int8, their drop
    (fp32 - int8), and the mean drop over those heads. Raises when no head has both classes."""
    heads = {}
    for k, region in enumerate(regions):
        a32, a8 = auroc(labels[:, k], p_fp32[:, k]), auroc(labels[:, k], p_int8[:, k])
        if a32 is None or a8 is None:
            continue
        heads[region] = {
            "auroc_fp32": a32,
            "auroc_int8": a8,
            "drop": round(a32 - a8, 6),
            "positives": int(labels[:, k].sum()),
        }
    if not heads:
        positives = {r: int(labels[:, k].sum()) for k, r in enumerate(regions)}
        raise ValueError(
            f"the {len(labels)} guard films ({where}) have no head with both classes "
            f"(positives per head: {positives}), so AUROC cannot tell whether int8 loses "
            "accuracy. Point guard_split at labelled films with both classes for some head "
            "(guard_split=val, or a CSV with path and region columns)"
        )
    drop = float(np.mean([h["drop"] for h in heads.values()]))
    skipped = [r for r in regions if r not in heads]
    return {"heads": heads, "mean_drop": round(drop, 6), "heads_without_both_classes": skipped}


def region_agreement(p_fp32: np.ndarray, p_int8: np.ndarray, model) -> float:
    """Share of films whose predicted region (at the checkpoint's thresholds, `unknown`
    included) is the same with both models."""
    thresholds, regions = [float(t) for t in model.thresholds], list(model.regions)
    a, _ = decide_all(p_fp32, thresholds, regions)
    b, _ = decide_all(p_int8, thresholds, regions)
    return round(float(np.mean([x == y for x, y in zip(a, b, strict=True)])), 6)


def quantize_int8(
    fp32_path: Path,
    int8_out: Path,
    model,
    ckpt: Path,
    calibration: str = "train",
    calibration_films: int | None = 128,
    guard_split: str = "val",
    guard_films: int | None = None,
    max_auroc_drop: float | None = 0.005,
    seed: int = 0,
    calibrate_method: str = "auto",
    percentile: float = 99.99,
) -> dict:
    """Quantise the float32 ONNX file `fp32_path` to `int8_out` and compare the two on the
    guard films; returns the `quantization` facts. Raises `QuantizationRefused` (after
    removing `int8_out`) when the mean AUROC drop exceeds `max_auroc_drop`."""
    method = str(calibrate_method).lower()
    if method not in CALIBRATE_METHODS:
        raise ValueError(
            f"calibrate_method={calibrate_method!r}: choose one of {list(CALIBRATE_METHODS)} "
            "(auto, the default, tries percentile and minmax and keeps the closer to float32)"
        )
    if not 90.0 <= float(percentile) <= 100.0:
        raise ValueError(
            f"calibrate_percentile={percentile!r}: use a percentile in [90, 100], e.g. 99.99"
        )
    quantization, quant_pre_process = import_quantization()
    calibrators = {
        "percentile": quantization.CalibrationMethod.Percentile,
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
    }
    regions = list(model.regions)
    if str(calibration) == "test" or str(guard_split) == "test":
        log.warning(
            "quantize: calibration=%s guard_split=%s uses the test split; its AUROC is then no "
            "longer an untouched estimate (use train for calibration, val for the guard)",
            calibration,
            guard_split,
        )
    calib = pick(film_table(calibration, regions, ckpt, "calibration"), calibration_films, seed)
    calib_images, _, _ = load_films(calib, model)
    guard = pick(film_table(guard_split, regions, ckpt, "guard_split"), guard_films, seed)
    guard_images, guard_labels, _ = load_films(guard, model)
    input_name = session(fp32_path, 1).get_inputs()[0].name

    p32 = run_session(session(fp32_path), guard_images)
    tried: dict[str, float] = {}  # method -> mean |p_int8 - p_fp32| on the guard films
    best = None
    pre = int8_out.with_name(int8_out.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre))
        for m in AUTO_METHODS if method == "auto" else (method,):
            out = int8_out.with_name(f"{int8_out.name}.{m}.onnx")
            quantization.quantize_static(
                str(pre),
                str(out),
                calibration_reader(calib_images, input_name),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=calibrators[m],
                extra_options={"CalibPercentile": float(percentile)} if m == "percentile" else {},
            )
            probs = run_session(session(out), guard_images)
            tried[m] = round(float(np.abs(probs - p32).mean()), 6)
            if best is None or tried[m] < tried[best[0]]:
                if best is not None:
                    best[1].unlink(missing_ok=True)
                best = (m, out, probs)
            else:
                out.unlink(missing_ok=True)
        chosen, kept, p8 = best
        kept.replace(int8_out)
    finally:
        pre.unlink(missing_ok=True)
        for m in AUTO_METHODS + (method,):
            int8_out.with_name(f"{int8_out.name}.{m}.onnx").unlink(missing_ok=True)
    if len(tried) > 1:
        log.info("quantize: mean |p_int8 - p_fp32| on the guard films %s; kept %s", tried, chosen)
    where = f"guard_split={guard_split}, {guard['_from'].iloc[0]}"
    try:
        change = auroc_change(guard_labels, p32, p8, regions, where)
    except ValueError:
        int8_out.unlink(missing_ok=True)
        raise
    facts = {
        "mode": "int8",
        "method": "onnxruntime quantize_static, QDQ, per-channel QInt8 weights, QUInt8 "
        f"activations, {chosen} calibration, after quant_pre_process",
        "calibrate_method": chosen,
        "calibrate_percentile": float(percentile) if chosen == "percentile" else None,
        "calibrate_methods_tried": tried,
        "calibration": str(calibration),
        "calibration_films": len(calib_images),
        "guard_split": str(guard_split),
        "guard_films": len(guard_images),
        "auroc": change["heads"],
        "mean_auroc_drop": change["mean_drop"],
        "heads_without_both_classes": change["heads_without_both_classes"],
        "max_auroc_drop": None if max_auroc_drop is None else float(max_auroc_drop),
        "max_abs_prob_diff_vs_fp32": round(float(np.abs(p8 - p32).max()), 6),
        "region_agreement": region_agreement(p32, p8, model),
        "fp32_file_bytes": fp32_path.stat().st_size,
        "int8_file_bytes": int8_out.stat().st_size,
    }
    table = ", ".join(
        f"{r} {h['auroc_fp32']:.4f} -> {h['auroc_int8']:.4f}" for r, h in change["heads"].items()
    )
    print(
        f"int8 on {len(guard_images)} guard films ({where}): AUROC fp32 -> int8 {table}; "
        f"mean drop {change['mean_drop']:+.4f} (max_auroc_drop={max_auroc_drop}); "
        f"max |p_int8 - p_fp32| {facts['max_abs_prob_diff_vs_fp32']:.4f}; same region on "
        f"{facts['region_agreement']:.1%} of them"
    )
    if max_auroc_drop is not None and change["mean_drop"] > float(max_auroc_drop):
        int8_out.unlink(missing_ok=True)
        raise QuantizationRefused(
            f"quantize=int8 refused: the int8 model's mean AUROC on {len(guard_images)} guard "
            f"films ({where}) is {change['mean_drop']:.4f} below float32 ({table}), more than "
            f"max_auroc_drop={max_auroc_drop}. Nothing was written. Use more calibration films "
            f"(calibration_films=, now {len(calib_images)}), raise max_auroc_drop= if the loss "
            "is acceptable, or deploy the float32 model.onnx (quantize=null)"
        )
    return facts
