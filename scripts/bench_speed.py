"""Speed measurements for scripts/benchmark.py: model-only throughput, roofline, cost curves.

Every figure is measured here, in this process (or a child process for peak memory), with
warm-up runs and the median of repeated timed runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from regionnet.model.module import RegionNet
from regionnet.regions import REGIONS


def build(shared: bool, backbone: str = "resnet18") -> RegionNet:
    return RegionNet(regions=list(REGIONS), backbone=backbone, shared_backbone=shared).eval()


def images_per_second(
    model: torch.nn.Module,
    batch: int,
    size: int,
    bf16: bool = False,
    channels_last: bool = False,
    repeats: int = 5,
    min_seconds: float = 0.5,
) -> float:
    """Median radiographs/s of inference (no grad) over `repeats` timed runs after warm-up."""
    x = torch.rand(batch, 1, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), ctx:
        for _ in range(3):  # warm-up: allocator, kernels, oneDNN primitives
            model.logits(x)
        rates = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while True:
                model.logits(x)
                n += batch
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            rates.append(n / elapsed)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return statistics.median(rates)


def gflops_per_image(model: RegionNet, size: int) -> float:
    """Forward FLOPs of one radiograph (multiply-add = 2 FLOPs), counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.logits(torch.rand(1, 1, size, size))
    return counter.get_total_flops() / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured fp32 matmul GFLOP/s: this machine's practical compute roofline."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def speed_section(quick: bool, log) -> dict:
    """Shared vs five backbones, precision/layout grid, batch and image sizes, roofline."""
    reps = 3 if quick else 5
    min_s = 0.2 if quick else 0.6
    shared, separate = build(True), build(False)
    size, batch = (128, 8) if quick else (224, 16)
    out: dict = {"threads": torch.get_num_threads(), "image_size": size, "batch": batch}

    log(f"speed: shared vs separate backbones at {size} px, batch {batch}, fp32")
    s = images_per_second(shared, batch, size, repeats=reps, min_seconds=min_s)
    f = images_per_second(separate, batch, size, repeats=reps, min_seconds=min_s)
    out["shared_vs_separate"] = {"shared": s, "separate": f, "ratio": s / f}

    log("speed: fp32/bf16 x channels_last")
    grid = {}
    for bf16 in (False, True):
        for cl in (False, True):
            key = f"{'bf16' if bf16 else 'fp32'}{'+channels_last' if cl else ''}"
            grid[key] = images_per_second(shared, batch, size, bf16, cl, reps, min_s)
    out["precision_layout"] = grid

    log("speed: batch sizes and image sizes")
    batches = (1, 8) if quick else (1, 8, 32)
    out["batch_sizes"] = {
        b: images_per_second(shared, b, size, repeats=reps, min_seconds=min_s) for b in batches
    }
    sizes = (128, 224) if quick else (128, 224, 320, 384)
    out["image_sizes"] = {
        z: images_per_second(shared, batch, z, repeats=reps, min_seconds=min_s) for z in sizes
    }

    log("speed: achieved GFLOP/s vs matmul roofline")
    gf = gflops_per_image(shared, size)
    roof = matmul_gflops(1024 if quick else 2048, reps)
    out["roofline"] = {
        "gflop_per_image": gf,
        "achieved_gflops": gf * s,
        "matmul_gflops": roof,
        "fraction_of_roofline": gf * s / roof,
    }
    return out


_CHILD = """
import json, sys, torch
sys.path.insert(0, {here!r})
from bench_speed import build, images_per_second, peak_rss_mib, reset_peak_rss
torch.set_num_threads({threads})
model = build(True)
reset_peak_rss()  # the peak of importing torch and building the model is not this run's cost
base = peak_rss_mib()
rate = images_per_second(model, {batch}, {size}, repeats={reps}, min_seconds={min_s})
peak = peak_rss_mib()
print(json.dumps({{"rate": rate, "peak_mib": peak, "inference_mib": peak - base}}))
"""


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


def cost_point(batch: int, size: int, reps: int, min_s: float) -> dict:
    """Throughput and peak resident memory of one (batch, size) in a fresh process, so the
    peak is this configuration's alone."""
    from pathlib import Path

    code = _CHILD.format(
        here=str(Path(__file__).parent),
        threads=torch.get_num_threads(),
        batch=batch,
        size=size,
        reps=reps,
        min_s=min_s,
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def scaling_section(quick: bool, log) -> dict:
    """Cost curves: throughput and peak memory as batch size and image size grow."""
    reps, min_s = (2, 0.2) if quick else (3, 0.5)
    batches = (1, 4, 16) if quick else (1, 4, 16, 64)
    sizes = (128, 224) if quick else (128, 224, 320, 384)
    out = {"by_batch": {}, "by_size": {}, "batch_for_sizes": 8, "size_for_batches": 224}
    for b in batches:
        log(f"scaling: batch {b} at 224 px")
        out["by_batch"][b] = cost_point(b, 224, reps, min_s)
    for z in sizes:
        log(f"scaling: {z} px at batch 8")
        out["by_size"][z] = cost_point(8, z, reps, min_s)
    return out


def plot_scaling(scaling: dict, path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for ax, key, xlabel in (
        (fig.add_subplot(1, 2, 1), "by_batch", "batch size (224 px)"),
        (fig.add_subplot(1, 2, 2), "by_size", "image size, px (batch 8)"),
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
