"""The framework's overhead: the study protocol trained by `regionnet-train` (Hydra config,
Lightning Trainer, callbacks, CSV logger) against the same model, data, augmentation,
optimiser, schedule and epochs in a plain PyTorch loop, in one process.

Both sides compose the same config (`overrides`), seed the same way, build the same data
module (its DataLoaders: reader, augmentation, batch size, workers) and the same network
(`RegionClassifier`, same timm backbone and initial weights), AdamW + cosine schedule, BCE
with the same `pos_weight`. The plain loop is: for each epoch, for each batch: forward, BCE,
backward, step; then one validation pass computing the mean per-head AUROC with
torchmetrics; after the last epoch, one test pass. Its "whole" time counts building the data
module and the model too.

The Lightning side is `regionnet.train.train`: fit (sanity check, training, validation with
every val metric, threshold calibration, checkpoints, logging, callbacks), then its final
validation of the best checkpoint, test, test predictions, checkpoint stripping, model card.
Its fit is broken down by Lightning's `SimpleProfiler` (per hook, summed).

The two are measured alternately (plain, Lightning, plain, Lightning, ...), so a machine
that gets busier or quieter shifts both; the ratios are medians over the pairs.
"""

from __future__ import annotations

import shutil
import statistics
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.classification import BinaryAUROC

from regionnet.bench.settings import BenchSettings, FineTune, log

#: the setting of the benchmark's overhead measurement: small enough for a few minutes on a
#: busy 2-core CPU, large enough that per-batch costs show (about 1,250 training films, 78
#: batches of 32); three pairs, since one pair on a shared machine varies by +-30 %
OVERHEAD = FineTune(image_size=48, epochs=2, augment_factor=1)
REPEATS = 3


class FitClock(L.Callback):
    """Wall seconds of `trainer.fit` (from its setup to its teardown) and the profiler's
    per-action totals at the end of fit (before validate/test add to them)."""

    def __init__(self) -> None:
        self.start = self.seconds = self.cpu_start = self.cpu_seconds = 0.0
        self.actions: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_fit_end(self, trainer, pl_module) -> None:
        durations = getattr(trainer.profiler, "recorded_durations", {})
        self.actions = {k: float(sum(v)) for k, v in durations.items()}
        self.calls = {k: len(v) for k, v in durations.items()}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start


def fit_breakdown(actions: dict[str, float], calls: dict[str, int], fit_s: float) -> dict:
    """Where a Lightning fit's seconds went, from SimpleProfiler's action totals. The
    optimizer step wraps the closure (training_step, backward), so `optimizer` is the step
    alone; `loop_other` is the fit's seconds that no measured action holds (the loops'
    own bookkeeping, logging of step metrics, setup and teardown)."""

    def total(suffix: str) -> float:  # e.g. [Strategy]SingleDeviceStrategy.training_step
        return sum(v for k, v in actions.items() if k.endswith(suffix))

    train_step = total(".training_step")
    backward = total(".backward")
    optimizer = max(0.0, total("]RegionNet.optimizer_step") - train_step - backward)
    train_data = total("[_TrainingEpochLoop].train_dataloader_next")
    val_data = total("[_EvaluationLoop].val_next")
    val_steps = total(".validation_step")
    val_end = total("]RegionNet.on_validation_epoch_end")
    callbacks = {}
    for key, seconds in actions.items():
        if key.startswith("[Callback]"):
            name = key[len("[Callback]") :].split("{")[0].split(".")[0]
            callbacks[name] = callbacks.get(name, 0.0) + seconds
    out = {
        "fit_s": fit_s,
        "train_dataloader_s": train_data,
        "training_step_s": train_step,
        "backward_s": backward,
        "optimizer_step_s": optimizer,
        "validation_dataloader_s": val_data,
        "validation_step_s": val_steps,
        "validation_metrics_and_calibration_s": val_end,
        "callbacks_s": {k: round(v, 3) for k, v in sorted(callbacks.items())},
        "checkpoint_writes_s": total("save_checkpoint"),  # within callbacks_s
        "train_batches": calls.get("run_training_batch", 0),
    }
    counted = train_data + train_step + backward + optimizer + val_data + val_steps + val_end
    counted += sum(callbacks.values())
    out["loop_other_s"] = fit_s - counted
    return out


def lightning_run(overrides: list[str], out: Path) -> dict:
    """`regionnet.train.train` of `overrides` into a fresh `out`: whole and fit seconds, the
    fit's breakdown, the last val/auroc_mean."""
    from regionnet.config import compose_config
    from regionnet.train import train

    shutil.rmtree(out, ignore_errors=True)
    clock = FitClock()
    start, cpu = time.perf_counter(), time.process_time()
    cfg = compose_config(
        "train",
        [
            *overrides,
            f"paths.output_dir={out}",
            "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
            f"+trainer.profiler.dirpath={out}",
            "+trainer.profiler.filename=profile",
        ],
    )
    metrics = train(cfg, extra_callbacks=[clock])
    whole = time.perf_counter() - start
    return {
        "whole_s": whole,
        "whole_cpu_s": time.process_time() - cpu,
        "fit_s": clock.seconds,
        "fit_cpu_s": clock.cpu_seconds,
        "after_fit_s": whole - clock.seconds,  # compose, setup, final val, test, outputs
        "breakdown": fit_breakdown(clock.actions, clock.calls, clock.seconds),
        "val_auroc_mean": metrics.get("val/auroc_mean"),
    }


def _limit(loader, limit) -> object:
    """The loader cut at an integer `trainer.limit_*_batches` (as `--quick` sets)."""
    return islice(loader, limit) if isinstance(limit, int) else loader


def _mean_auroc(net, loader, regions, autocast, limit=None) -> float:
    net.eval()
    aurocs = [BinaryAUROC() for _ in regions]
    with torch.inference_mode(), autocast():
        for batch in _limit(loader, limit):
            if "image" not in batch:
                continue
            probs = torch.sigmoid(net.logits(batch["image"]).float())
            labels = batch["labels"].int()
            for k, metric in enumerate(aurocs):
                metric.update(probs[:, k], labels[:, k])
    values = []
    for metric in aurocs:
        target = torch.cat(metric.target) if metric.target else torch.empty(0)
        if 0 < int(target.sum()) < len(target):  # a head that saw both classes
            values.append(float(metric.compute()))
    net.train()
    return sum(values) / len(values) if values else float("nan")


def plain_run(overrides: list[str]) -> dict:
    """The same training in a plain PyTorch loop: whole and fit seconds, where the fit's
    seconds went, the last validation mean AUROC."""
    from regionnet.config import compose_config
    from regionnet.run import build_datamodule, build_model

    start, cpu = time.perf_counter(), time.process_time()
    cfg = compose_config("train", overrides)
    L.seed_everything(cfg.seed, workers=True)  # as regionnet.run.prepare_run: same init
    dm = build_datamodule(cfg)
    dm.setup()
    net = build_model(cfg, dm.regions).net  # the plain RegionClassifier
    pos = torch.tensor(dm.positives(), dtype=torch.float32)
    n = float(dm.train_size())
    pos_weight = ((n - pos) / pos.clamp(min=1)).clamp(1.0, 100.0)  # model.pos_weight=auto
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    scheduler = instantiate(cfg.model.scheduler)(optimizer=optimizer)
    precision = str(cfg.trainer.precision)
    if precision not in ("32-true", "32", "bf16-mixed"):
        raise ValueError(f"plain loop: trainer.precision={precision} is not measured")

    def autocast():
        if precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    setup_s = time.perf_counter() - start
    times = dict.fromkeys(
        ("train_dataloader_s", "forward_s", "backward_s", "optimizer_step_s", "validation_s"), 0.0
    )
    fit_start, fit_cpu = time.perf_counter(), time.process_time()
    net.train()
    val_auroc = float("nan")
    batches = 0
    for _ in range(int(cfg.trainer.max_epochs)):
        t = time.perf_counter()
        for batch in _limit(dm.train_dataloader(), cfg.trainer.limit_train_batches):
            t1 = time.perf_counter()
            times["train_dataloader_s"] += t1 - t
            if "image" in batch:
                with autocast():
                    logits = net.logits(batch["image"])
                loss = F.binary_cross_entropy_with_logits(
                    logits.float(), batch["labels"], pos_weight=pos_weight
                )
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                t3 = time.perf_counter()
                optimizer.step()
                batches += 1
                times["forward_s"] += t2 - t1
                times["backward_s"] += t3 - t2
                t1 = t3
            t = time.perf_counter()
            times["optimizer_step_s"] += t - t1
        scheduler.step()
        t = time.perf_counter()
        limit = cfg.trainer.limit_val_batches
        val_auroc = _mean_auroc(net, dm.val_dataloader(), dm.regions, autocast, limit)
        times["validation_s"] += time.perf_counter() - t
    fit_s, fit_cpu_s = time.perf_counter() - fit_start, time.process_time() - fit_cpu
    t = time.perf_counter()
    for loader in dm.test_dataloader():
        _mean_auroc(net, loader, dm.regions, autocast, cfg.trainer.limit_test_batches)
    test_s = time.perf_counter() - t
    return {
        "whole_s": time.perf_counter() - start,
        "whole_cpu_s": time.process_time() - cpu,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu_s,
        "setup_s": setup_s,
        "test_s": test_s,
        "breakdown": {**times, "train_batches": batches},
        "val_auroc_mean": val_auroc,
    }


def overhead_overrides(settings: BenchSettings, fine_tune: FineTune = OVERHEAD) -> list[str]:
    """The accuracy section's regionnet-train overrides (`experiment=yi2019` on the shared
    data) at `fine_tune`'s size, with regionnet-train's default callbacks (progress bar and
    model summary included: what a user's run pays)."""
    from regionnet.bench.protocol import protocol_overrides

    keep = [
        o
        for o in protocol_overrides(settings, fine_tune)
        if o not in ("callbacks.progress_bar=null", "callbacks.model_summary=null")
    ]
    return ["experiment=yi2019", "trainer.accelerator=cpu", *keep]


def overhead_section(
    settings: BenchSettings, fine_tune: FineTune = OVERHEAD, repeats: int = REPEATS
) -> dict:
    """`speed.training`'s overhead figures: Lightning and plain seconds (medians),
    `lightning_vs_plain_ratio` (whole pipeline), `fit_ratio`, and the breakdowns of the last
    pair. `--quick`: one pair at the quick sizes."""
    if settings.quick:
        fine_tune, repeats = settings.accuracy, 1
    overrides = overhead_overrides(settings, fine_tune)
    runs: dict[str, list[dict]] = {"plain": [], "lightning": []}
    for i in range(repeats):
        log(f"speed: framework overhead, plain PyTorch loop ({i + 1}/{repeats})")
        runs["plain"].append(plain_run(overrides))
        log(f"speed: framework overhead, regionnet-train ({i + 1}/{repeats})")
        runs["lightning"].append(lightning_run(overrides, settings.artifacts / "overhead"))

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    def ratios(key: str) -> list[float]:  # Lightning / plain, pair by pair
        return [lt[key] / pl[key] for pl, lt in zip(runs["plain"], runs["lightning"], strict=True)]

    whole, fit = ratios("whole_s"), ratios("fit_s")
    cpu, fit_cpu = ratios("whole_cpu_s"), ratios("fit_cpu_s")
    return {
        "lightning_s": median("lightning", "whole_s"),
        "plain_s": median("plain", "whole_s"),
        "lightning_vs_plain_ratio": statistics.median(whole),
        "lightning_fit_s": median("lightning", "fit_s"),
        "plain_fit_s": median("plain", "fit_s"),
        "fit_ratio": statistics.median(fit),
        # CPU seconds of this process (not the data loader workers'): less noisy than wall
        # time on a shared machine
        "lightning_cpu_s": median("lightning", "whole_cpu_s"),
        "plain_cpu_s": median("plain", "whole_cpu_s"),
        "cpu_ratio": statistics.median(cpu),
        "fit_cpu_ratio": statistics.median(fit_cpu),
        "ratios": {"whole": whole, "fit": fit, "cpu": cpu, "fit_cpu": fit_cpu},
        "overhead_setting": {
            "overrides": overrides,
            "image_size": fine_tune.image_size,
            "epochs": fine_tune.epochs,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
        },
        "breakdown": {
            "lightning": runs["lightning"][-1]["breakdown"],
            "lightning_after_fit_s": runs["lightning"][-1]["after_fit_s"],
            "plain": runs["plain"][-1]["breakdown"],
            "plain_setup_s": runs["plain"][-1]["setup_s"],
            "plain_test_s": runs["plain"][-1]["test_s"],
        },
        "val_auroc_mean": {
            "lightning": runs["lightning"][-1]["val_auroc_mean"],
            "plain": runs["plain"][-1]["val_auroc_mean"],
        },
    }
