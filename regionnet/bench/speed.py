"""Speed: model-only throughput, roofline, cost curves, end-to-end regionnet-predict.

Every figure is measured in this process (or a fresh child process, for peak memory) with
`torch.utils.benchmark.Timer`: warm-up runs, then the median of timed blocks. The model is a
RegionNet with random weights (speed does not depend on them), built by `build`, the one place
this package constructs a model itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from regionnet.bench.settings import BenchSettings, log
from regionnet.regions import REGIONS

STUDY_RATE = 33.0  # radiographs/s reported by Yi et al. 2019 (five ResNet-18s, a GPU)
WARMUP = 3  # untimed runs first: allocator, kernels, oneDNN primitives
QUICK_PREDICT_FILES = 16  # --quick: files of the end-to-end regionnet-predict


def build(shared: bool = True, backbone: str = "resnet18") -> torch.nn.Module:
    """A five-head RegionNet network with random weights, in eval mode: one shared backbone,
    or the study's design (one backbone per region). The plain `RegionClassifier` that the
    Lightning module, export and the Python API run, without importing Lightning (each cost
    curve point starts a fresh process)."""
    from regionnet.model.net import build_region_classifier

    net, _ = build_region_classifier(list(REGIONS), backbone, shared_backbone=shared)
    return net.eval()


def _forward(model: torch.nn.Module):
    """The timed call: the logits of every head, stacked (what inference computes)."""
    return model.logits


def images_per_second(
    model: torch.nn.Module,
    batch: int,
    size: int,
    *,
    bf16: bool = False,
    channels_last: bool = False,
    min_run_time: float = 2.0,
) -> float:
    """Radiographs/s of inference (no grad) on random (batch, 1, size, size) input: `batch`
    over the median time of one forward, from `Timer.blocked_autorange` (at least
    `min_run_time` seconds of timed blocks) after warm-up, on torch's threads."""
    x = torch.rand(batch, 1, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    timer = Timer(
        "forward(x)",
        globals={"forward": _forward(model), "x": x},
        num_threads=torch.get_num_threads(),
    )
    try:
        with torch.inference_mode(), ctx:
            timer.timeit(WARMUP)
            seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return batch / seconds


def gflops_per_image(model: torch.nn.Module, size: int) -> float:
    """Forward FLOPs of one radiograph (multiply-add = 2 FLOPs), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        _forward(model)(torch.rand(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def matmul_gflops(n: int = 2048, min_run_time: float = 2.0, dtype=torch.float32) -> float:
    """Measured fp32 matmul GFLOP/s: this machine's practical compute roofline."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    timer.timeit(1)
    return 2 * n**3 / timer.blocked_autorange(min_run_time=min_run_time).median / 1e9


def speed_section(settings: BenchSettings) -> dict:
    """Shared vs five backbones, precision/layout grid, batch and image sizes, roofline."""
    quick = settings.quick
    t = 0.05 if quick else 3.0  # seconds of timed runs per figure
    shared, separate = build(True), build(False)
    size, batch = (64, 4) if quick else (224, 16)
    out: dict = {"threads": torch.get_num_threads(), "image_size": size, "batch": batch}

    log(f"speed: shared vs separate backbones at {size} px, batch {batch}, fp32")
    s = images_per_second(shared, batch, size, min_run_time=t)
    f = images_per_second(separate, batch, size, min_run_time=t)
    out["shared_vs_separate"] = {"shared": s, "separate": f, "ratio": s / f}

    log("speed: fp32/bf16 x channels_last")
    grid = {}
    for bf16 in (False, True):
        for cl in (False, True):
            key = f"{'bf16' if bf16 else 'fp32'}{'+channels_last' if cl else ''}"
            grid[key] = images_per_second(
                shared, batch, size, bf16=bf16, channels_last=cl, min_run_time=t
            )
    out["precision_layout"] = grid

    log("speed: batch sizes and image sizes")
    batches = (1, 4) if quick else (1, 8, 32)
    out["batch_sizes"] = {b: images_per_second(shared, b, size, min_run_time=t) for b in batches}
    sizes = (32, 64) if quick else (128, 224, 320, 384)
    out["image_sizes"] = {z: images_per_second(shared, batch, z, min_run_time=t) for z in sizes}

    log("speed: achieved GFLOP/s vs matmul roofline")
    gf = gflops_per_image(shared, size)
    roof = matmul_gflops(256 if quick else 2048, min_run_time=t)
    out["roofline"] = {
        "gflop_per_image": gf,
        "achieved_gflops": gf * s,
        "matmul_gflops": roof,
        "fraction_of_roofline": gf * s / roof,
    }
    return out


def predict_throughput(settings: BenchSettings, ckpt: Path, *backend: str) -> dict:
    """End-to-end regionnet-predict on the folder of real files (with `--quick`, a CSV of
    the first QUICK_PREDICT_FILES files of the quick manifest) vs model-only at the same size
    and batch. `backend`: extra predict overrides, e.g. `backend=onnxruntime`,
    `onnx_path=model.int8.onnx` (model-only is the torch model's either way)."""
    from regionnet.api import load_model
    from regionnet.config import compose_config
    from regionnet.predict import predict

    out = settings.artifacts
    folder = settings.data_dir / "radiographs"
    if settings.quick:
        import pandas as pd

        folder = out / "quick" / "predict_input.csv"
        paths = pd.read_csv(settings.quick_manifest, usecols=["path"]).head(QUICK_PREDICT_FILES)
        paths.to_csv(folder, index=False)
    predictor = load_model(ckpt)
    size = predictor.image_size
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={ckpt}",
            f"input={folder}",
            f"output={out / 'predict_bench.csv'}",
            f"paths.output_dir={out}",
            "batch_size=32",
            # predict's own choice of readers and threads (what a user gets), in-process
            # with --quick (a few files do not pay for starting a worker)
            f"num_workers={0 if settings.quick else 'auto'}",
            "accelerator=cpu",
            *backend,
        ],
    )
    summary = predict(cfg)
    model_only = images_per_second(
        predictor.model, 32, size, min_run_time=0.05 if settings.quick else 2.5
    )
    return {
        "input": str(folder),
        "image_size": size,
        "files": summary["ok"],
        "end_to_end_per_s": summary["per_second"],
        "model_only_per_s": model_only,
        "fraction_of_model_only": summary["per_second"] / model_only,
        "num_workers": summary["num_workers"],
        "torch_threads": summary["torch_threads"],
        "study_per_s": STUDY_RATE,
    }


# -- cost curves: each point in a fresh process, so its peak memory is its own ---------------
def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux: clear_refs 5 resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size since start or the last reset, MiB (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cost_child(batch: int, size: int, min_run_time: float, threads: int) -> None:
    """In the child process of `cost_point`: print one JSON line with radiographs/s, peak
    resident MiB and the part of it inference added."""
    torch.set_num_threads(threads)
    model = build(True)
    reset_peak_rss()  # the peak of importing torch and building the model is not this run's cost
    base = peak_rss_mib()
    rate = images_per_second(model, batch, size, min_run_time=min_run_time)
    peak = peak_rss_mib()
    print(json.dumps({"rate": rate, "peak_mib": peak, "inference_mib": peak - base}))


def cost_point(batch: int, size: int, min_run_time: float) -> dict:
    """Throughput and peak resident memory of one (batch, size) in a fresh process, so the
    peak is this configuration's alone."""
    args = f"{batch}, {size}, {min_run_time}, {torch.get_num_threads()}"
    code = f"from regionnet.bench.speed import cost_child; cost_child({args})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def scaling_section(settings: BenchSettings) -> dict:
    """Cost curves: throughput and peak memory as batch size and image size grow (`--quick`:
    two small points each, the one they share measured once)."""
    quick = settings.quick
    t = 0.05 if quick else 1.5
    batches = (1, 4) if quick else (1, 4, 16, 64)
    sizes = (32, 64) if quick else (128, 224, 320, 384)
    at_size, at_batch = (64, 4) if quick else (224, 8)
    out = {"by_batch": {}, "by_size": {}, "batch_for_sizes": at_batch, "size_for_batches": at_size}
    points: dict[tuple[int, int], dict] = {}

    def point(batch: int, size: int) -> dict:
        if (batch, size) not in points:
            log(f"scaling: batch {batch} at {size} px")
            points[batch, size] = cost_point(batch, size, t)
        return points[batch, size]

    for b in batches:
        out["by_batch"][b] = point(b, at_size)
    for z in sizes:
        out["by_size"][z] = point(at_batch, z)
    return out


def plot_scaling(scaling: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    at_size, at_batch = scaling.get("size_for_batches", 224), scaling.get("batch_for_sizes", 8)
    for ax, key, xlabel in (
        (fig.add_subplot(1, 2, 1), "by_batch", f"batch size ({at_size} px)"),
        (fig.add_subplot(1, 2, 2), "by_size", f"image size, px (batch {at_batch})"),
    ):
        xs = [int(x) for x in scaling[key]]
        ax.plot(xs, [scaling[key][k]["rate"] for k in scaling[key]], "o-", color="tab:blue")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("radiographs / s", color="tab:blue")
        twin = ax.twinx()
        mem = [scaling[key][k]["inference_mib"] for k in scaling[key]]
        twin.plot(xs, mem, "s--", color="tab:red")
        twin.set_ylabel("extra peak memory of inference, MiB", color="tab:red")
        ax.set_xscale("log", base=2)
    fig.suptitle("regionnet (ResNet-18, 5 heads) inference cost on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
