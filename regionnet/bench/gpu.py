"""The GPU section of the speed results: recorded only where CUDA is present.

Throughput of the shared-backbone network at 224 px on the first CUDA device, as
`trainer=gpu` and `regionnet-predict accelerator=gpu` run it (bf16 autocast, channels_last
weights and inputs) next to plain fp32: inference (no grad) and one training step (forward,
BCE, backward, AdamW step). Timed with `torch.utils.benchmark.Timer`, which synchronises CUDA
around each timed block, after warm-up. Without CUDA the section is a note saying so.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from regionnet.bench.settings import BenchSettings, log
from regionnet.bench.speed import WARMUP, build

NO_CUDA = "no CUDA device on this machine (torch.cuda.is_available() is false): not measured"


def throughput(
    model: torch.nn.Module,
    device: str | torch.device,
    batch: int,
    size: int,
    *,
    bf16: bool = False,
    channels_last: bool = False,
    train: bool = False,
    min_run_time: float = 2.0,
) -> float:
    """Radiographs/s on `device` of inference (`train=False`) or of a training step, on
    random (batch, 1, size, size) input already on the device. The model is moved there
    and left in the layout asked for."""
    device = torch.device(device)
    model = model.to(device)
    x = torch.rand(batch, 1, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def ctx():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    if train:
        model.train()
        target = torch.randint(0, 2, (batch, len(model.regions)), device=device).float()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with ctx():
                logits = model.logits(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        timer = Timer("step()", globals={"step": step})
        timer.timeit(WARMUP)
        seconds = timer.blocked_autorange(min_run_time=min_run_time).median
        model.eval()
        return batch / seconds
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), ctx():
            model.logits(x)

    timer = Timer("forward()", globals={"forward": forward})
    timer.timeit(WARMUP)
    return batch / timer.blocked_autorange(min_run_time=min_run_time).median


def gpu_section(settings: BenchSettings) -> dict:
    """`speed.gpu`: inference and training radiographs/s at 224 px, fp32 vs bf16 +
    channels_last, on the first CUDA device; `{"skipped": why}` without one."""
    if not torch.cuda.is_available():
        log(f"speed: GPU section skipped, {NO_CUDA}")
        return {"skipped": NO_CUDA}
    quick = settings.quick
    size, batch, t = (64, 8, 0.1) if quick else (224, 64, 2.0)
    log(f"speed: GPU throughput at {size} px, batch {batch}")
    torch.set_float32_matmul_precision("high")  # as regionnet.run.prepare_run on CUDA
    out: dict = {
        "device": torch.cuda.get_device_name(0),
        "image_size": size,
        "batch": batch,
        "inference": {},
        "training": {},
    }
    for name, bf16, cl in (("fp32", False, False), ("bf16+channels_last", True, True)):
        model = build(True)  # fresh weights and layout per setting
        out["inference"][name] = throughput(
            model, "cuda", batch, size, bf16=bf16, channels_last=cl, min_run_time=t
        )
        out["training"][name] = throughput(
            model, "cuda", batch, size, bf16=bf16, channels_last=cl, train=True, min_run_time=t
        )
        del model
    out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.empty_cache()
    return out
