"""int8 vs float32 ONNX: throughput and the AUROC change on the test split.

`int8_benchmark(ckpt, out_dir)` exports a trained checkpoint with `regionnet-export
format=onnx quantize=int8` (calibrated on its training split, guarded on its validation
split; `regionnet.quantize`), then measures on the run's **test** split, which neither
calibration nor the guard saw: per-head AUROC of both files (the accuracy a deployment would
report) and the throughput of both ONNX Runtime sessions (CPU, `threads` intra-op threads,
batches of `batch` test films at the checkpoint's image size; model only, no file reading:
the median over timed runs after warm-up). `record(results, facts)` puts the three headline
numbers where the benchmark keeps such figures: `speed.predict.onnx_fp32_per_s`,
`speed.predict.onnx_int8_per_s` and `accuracy.int8_auroc_drop` (mean over heads of fp32 -
int8 test AUROC), with the details under `speed.predict.onnx_int8`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from regionnet.bench.settings import log

WARMUP = 3


def batches_per_second(sess, x: np.ndarray, min_run_time: float = 3.0) -> float:
    """Median seconds of one `sess.run` on `x` over at least `min_run_time` s, as images/s."""
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    feed = {name_in: np.ascontiguousarray(x)}
    for _ in range(WARMUP):
        sess.run([name_out], feed)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_run_time or len(times) < 5:
        t = time.perf_counter()
        sess.run([name_out], feed)
        times.append(time.perf_counter() - t)
    return len(x) / float(np.median(times))


def int8_benchmark(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    batch: int = 32,
    threads: int = 2,
    calibration_films: int = 128,
    max_auroc_drop: float = 0.005,
    test_films: int | None = None,
    min_run_time: float = 3.0,
) -> dict:
    """Export `ckpt` as float32 and int8 ONNX into `out_dir`; the test-split AUROC of both
    and their throughput. Raises `regionnet.quantize.QuantizationRefused` when the guard on
    the validation split refuses the int8 file."""
    from regionnet.config import compose_config
    from regionnet.export import export
    from regionnet.model.module import load_regionnet
    from regionnet.quantize import (
        auroc_change,
        film_table,
        int8_path,
        load_films,
        pick,
        region_agreement,
        run_session,
        session,
    )

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    fp32 = out_dir / "model.onnx"
    start = time.perf_counter()
    export(
        compose_config(
            "export",
            [
                f"ckpt_path={ckpt}",
                f"output={fp32}",
                "quantize=int8",
                f"calibration_films={calibration_films}",
                f"max_auroc_drop={max_auroc_drop}",
            ],
        )
    )
    export_seconds = time.perf_counter() - start
    int8 = int8_path(fp32)
    meta = json.loads(int8.with_name(int8.name + ".json").read_text())

    model = load_regionnet(ckpt)
    regions = list(model.regions)
    films = pick(film_table("test", regions, ckpt, "test split"), test_films)
    images, labels, _ = load_films(films, model)
    s32, s8 = session(fp32, threads), session(int8, threads)
    p32, p8 = run_session(s32, images, batch), run_session(s8, images, batch)
    test = auroc_change(labels, p32, p8, regions, "the run's test split")

    x = images[:batch]
    if len(x) < batch:  # a small test split: repeat films up to one full batch
        x = np.resize(images, (batch, *images.shape[1:]))
    fp32_per_s = batches_per_second(s32, x, min_run_time)
    int8_per_s = batches_per_second(s8, x, min_run_time)
    log(
        f"int8: {int8_per_s:.1f} vs fp32 {fp32_per_s:.1f} images/s ({int8_per_s / fp32_per_s:.2f}x,"
        f" batch {batch}, {threads} threads, {model.hparams.image_size}px); test AUROC mean "
        f"drop {test['mean_drop']:+.4f} over {len(images)} films"
    )
    return {
        "checkpoint": str(ckpt),
        "int8_file": str(int8),
        "image_size": int(model.hparams.image_size),
        "batch": batch,
        "threads": threads,
        "onnx_fp32_per_s": fp32_per_s,
        "onnx_int8_per_s": int8_per_s,
        "speedup": int8_per_s / fp32_per_s,
        "test_films": len(images),
        "test_auroc": test["heads"],
        "int8_auroc_drop": test["mean_drop"],
        "test_max_abs_prob_diff": round(float(np.abs(p8 - p32).max()), 6),
        "test_region_agreement": region_agreement(p32, p8, model),
        "guard": {k: meta["quantization"][k] for k in ("guard_split", "guard_films")}
        | {"mean_auroc_drop": meta["quantization"]["mean_auroc_drop"]},
        "calibration_films": meta["quantization"]["calibration_films"],
        "file_bytes": {
            "fp32": meta["quantization"]["fp32_file_bytes"],
            "int8": meta["quantization"]["int8_file_bytes"],
        },
        "export_seconds": export_seconds,
    }


def record(results: dict, facts: dict) -> dict:
    """`facts` (from `int8_benchmark`) into a results.json dict: the headline numbers at
    `speed.predict.onnx_fp32_per_s`, `speed.predict.onnx_int8_per_s`,
    `accuracy.int8_auroc_drop`, the rest at `speed.predict.onnx_int8`."""
    predict = results.setdefault("speed", {}).setdefault("predict", {})
    predict["onnx_fp32_per_s"] = facts["onnx_fp32_per_s"]
    predict["onnx_int8_per_s"] = facts["onnx_int8_per_s"]
    predict["onnx_int8"] = {
        k: v for k, v in facts.items() if k not in ("onnx_fp32_per_s", "onnx_int8_per_s")
    }
    results.setdefault("accuracy", {})["int8_auroc_drop"] = facts["int8_auroc_drop"]
    return results
