"""One benchmark run: the sections asked for, merged with kept ones, written as results.json
and RESULTS.md (`run_benchmark`); scripts/benchmark.py is its command line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from regionnet.bench.paths import portable_json
from regionnet.bench.report import markdown_report
from regionnet.bench.settings import SECTIONS, BenchSettings, log

# a backend counts for speed.predict.end_to_end_224px_per_s only within this test AUROC of fp32
INT8_AUROC_MARGIN = 0.005


def machine(settings: BenchSettings) -> dict:
    """Where and when this run measures: CPU, cores, threads, GPU, versions, commit, command."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = settings.repo
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "regionnet", "conf", "scripts"],
        cwd=repo,
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
        "command": settings.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def check_data(settings: BenchSettings) -> None:
    """SystemExit when a section that trains is asked for and the data folder has no manifest."""
    needs_data = any(settings.runs(s) for s in ("accuracy", "backbones", "ssl", "transfer"))
    if needs_data and not settings.manifest_csv.is_file():
        raise SystemExit(
            f"--data-dir {settings.data_dir} has no radiographs/manifest.csv; "
            "give the shared data folder or --skip accuracy backbones ssl transfer"
        )


def written_checkpoints(results: dict, settings: BenchSettings) -> list[str]:
    """The checkpoints (`best.ckpt`, for `regionnet.load_model`) the sections of this run
    trained, not those of sections kept from an earlier run."""
    paths: list[str] = []
    if settings.runs("accuracy") and "accuracy" in results:
        acc = results["accuracy"]
        paths += [acc[k]["checkpoint"] for k in ("yi2019", "yi2019_crop") if k in acc]
    if settings.runs("backbones") and "backbones" in results:
        paths += sorted(
            str(p) for p in Path(results["backbones"]["sweep_dir"]).glob("*/checkpoints/best.ckpt")
        )
    if settings.runs("ssl") and "ssl" in results:
        ssl = results["ssl"]
        paths += [
            ssl[k]["checkpoint"] for k in ("scratch", "base", "ssl", "ssl_recipe") if k in ssl
        ]
    if settings.runs("transfer") and "transfer" in results:
        tr = results["transfer"]
        paths += [row["checkpoint"] for row in tr["rows"].values()]
        paths += [h["checkpoint"] for h in tr.get("hand_across_sources", {}).values()]
    if settings.runs("landmarks") and "landmarks" in results:
        lm = results["landmarks"]
        paths += [r["checkpoint"] for g in ("spine", "hand") for r in lm.get(g, {}).values()
                  if "checkpoint" in r]  # fmt: skip
    for section in ("findings", "compose"):
        if settings.runs(section) and section in results:
            paths += [r["checkpoint"] for r in results[section].get("runs", {}).values()
                      if "checkpoint" in r]  # fmt: skip
    return [p for p in paths if Path(p).is_file()]


def run_benchmark(settings: BenchSettings) -> dict:
    """Measure the sections `settings` asks for, keep the skipped ones of
    `<out>/results.json` with `merge`, write `<out>/results.json` and `<out>/RESULTS.md`
    (and the figures), and return the results.

    `--quick` runs on one torch thread, in this process and in the ones it starts: its
    tensors are tiny, and a second thread only waits for a core (on a busy 2-core machine one
    ResNet-18 forward of two 32 px images took 0.7 s on two threads, 8 ms on one)."""
    if not settings.quick:
        return _run_benchmark(settings)
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return _run_benchmark(settings)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def fastest_predict(settings: BenchSettings, sp: dict, results: dict, ckpt: Path) -> None:
    """int8 ONNX next to fp32 (`regionnet.bench.quantize`), regionnet-predict end to end with
    the int8 file, and `speed.predict.end_to_end_224px_per_s`: the fastest backend whose test
    AUROC stays within INT8_AUROC_MARGIN of fp32 (issue 19's target figure)."""
    from regionnet.bench.quantize import int8_benchmark, record
    from regionnet.bench.speed import predict_throughput
    from regionnet.quantize import QuantizationRefused

    rates = {"torch_fp32": sp["predict"]["end_to_end_per_s"]}
    if settings.quick:  # tiny inputs (32 px): int8 convolutions refuse feature maps that small
        sp["predict"]["onnx_int8"] = {"skipped": "--quick"}
        sp["predict"]["fastest_backend"] = "torch_fp32"
        return
    try:
        log("speed: int8 ONNX vs fp32 ONNX (quantize=int8, AUROC guard on val)")
        facts = int8_benchmark(ckpt, settings.artifacts / "int8")
    except QuantizationRefused as e:
        log(f"speed: int8 refused by its guard: {e}")
        sp["predict"]["onnx_int8"] = {"refused": str(e)}
    else:
        record({"speed": sp, "accuracy": results.setdefault("accuracy", {})}, facts)
        int8_run = predict_throughput(
            settings, ckpt, "backend=onnxruntime", f"onnx_path={facts['int8_file']}"
        )
        sp["predict"]["end_to_end_int8_per_s"] = int8_run["end_to_end_per_s"]
        if abs(facts["int8_auroc_drop"]) <= INT8_AUROC_MARGIN:
            rates["onnxruntime_int8"] = int8_run["end_to_end_per_s"]
    best = max(rates, key=rates.get)
    sp["predict"]["fastest_backend"] = best
    if int(sp["predict"]["image_size"]) == 224:
        sp["predict"]["end_to_end_224px_per_s"] = rates[best]


def _landmarks(settings: BenchSettings) -> dict:
    from regionnet.bench.landmarks import landmark_section

    return landmark_section(settings)


def _findings(settings: BenchSettings) -> dict:
    from regionnet.bench.findings import findings_section

    return findings_section(settings)


def _compose(settings: BenchSettings) -> dict:
    from regionnet.bench.compose import compose_section

    return compose_section(settings)


def _run_benchmark(settings: BenchSettings) -> dict:
    from regionnet.bench.accuracy import accuracy_section
    from regionnet.bench.backbones import backbones_section
    from regionnet.bench.decode import decode_section
    from regionnet.bench.gpu import gpu_section
    from regionnet.bench.overhead import overhead_section
    from regionnet.bench.speed import (
        plot_scaling,
        predict_throughput,
        scaling_section,
        speed_section,
    )
    from regionnet.bench.ssl import ssl_section
    from regionnet.bench.transfer import transfer_section

    check_data(settings)
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(settings), "quick": settings.quick}
    # where this run's paths point, so RESULTS.md can name them relative to the repository,
    # the output folder or the data folder (regionnet.bench.paths.relativise)
    results["paths"] = {
        "repo": str(settings.repo),
        "out": str(out.resolve()),
        "data": str(settings.data_dir.resolve()),
    }
    previous = out / "results.json"
    if settings.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for section in SECTIONS:
            if not settings.runs(section) and section in old:
                results[section] = old[section]
                results[section].setdefault("machine", old["machine"])
        results["machine_of_skipped"] = old["machine"]
        if "paths" in old:
            results["paths_of_skipped"] = old["paths"]
    start = time.perf_counter()
    if settings.quick and settings.manifest_csv.is_file():
        from regionnet.bench.protocol import quick_data

        manifest, _ = quick_data(settings)
        log(f"quick: every fine-tune trains on {manifest}")

    def speed(settings: BenchSettings) -> dict:
        sp = speed_section(settings)
        acc = results["accuracy"]["yi2019"] if settings.runs("accuracy") else None
        ckpt = settings.predict_ckpt or (Path(acc["checkpoint"]) if acc else None)
        if ckpt is not None:
            log(f"speed: end-to-end regionnet-predict on real radiographs ({ckpt})")
            sp["predict"] = predict_throughput(settings, ckpt)
            sp["predict"]["checkpoint"] = str(ckpt)
            fastest_predict(settings, sp, results, ckpt)
        if acc is not None:
            sp["training"] = {
                "images_per_s": acc["train_images_per_s"],
                "seconds_to_val_auroc_mean_0.99": acc["seconds_to_val_auroc_mean_0.99"],
            }
        if settings.manifest_csv.is_file():
            log("speed: framework overhead, regionnet-train vs a plain PyTorch loop")
            sp.setdefault("training", {}).update(overhead_section(settings))
        fullres = settings.data_dir / "fullres"
        if fullres.is_dir():
            log("speed: decode rate per core, full vs reduced reads of full-resolution films")
            sp["decode"] = decode_section(fullres)
        sp["gpu"] = gpu_section(settings)
        return sp

    def scaling(settings: BenchSettings) -> dict:
        sc = scaling_section(settings)
        plot_scaling(sc, out / "scaling.png")
        return sc

    measures = {
        "accuracy": accuracy_section,
        "backbones": backbones_section,
        "ssl": ssl_section,
        "transfer": transfer_section,
        "landmarks": _landmarks,
        "findings": _findings,
        "compose": _compose,
        # timing sections last: they want a quiet machine, the training sections do not mind
        "speed": speed,
        "scaling": scaling,
    }
    seconds = results["section_seconds"] = {}  # wall time of each section this run measured
    for section, measure in measures.items():
        if settings.runs(section):
            log(f"{section}: start")
            t0 = time.perf_counter()
            results[section] = measure(settings)
            seconds[section] = round(time.perf_counter() - t0, 1)
            log(f"{section}: done in {seconds[section]:.0f} s")
    for section in ("ssl", "transfer"):
        if settings.runs(section):
            results[section]["machine"] = results["machine"]
    results["wall_seconds"] = time.perf_counter() - start

    (out / "results.json").write_text(portable_json(results))
    (out / "RESULTS.md").write_text(markdown_report(results))
    log(
        f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} "
        f"in {results['wall_seconds'] / 60:.1f} min"
    )
    written = written_checkpoints(results, settings)
    if written:
        log("checkpoints trained in this run (load them with regionnet.load_model):")
        for path in written:
            log(f"  {path}")
    return results
