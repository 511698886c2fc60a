"""GPU readiness, checked without a GPU: `trainer=gpu` (and the DDP configs on top of it) and
`regionnet-predict accelerator=gpu` ask for pinned batches, non-blocking copies, channels_last
and bf16 autocast. Where CUDA is present, one short GPU training and prediction run; elsewhere
that test skips with its reason, a skip CI allows (CI has no GPU)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, MUST_RUN_IN_CI
from PIL import Image

from regionnet.bench import BenchSettings
from regionnet.bench.gpu import NO_CUDA, gpu_section, throughput
from regionnet.bench.speed import build
from regionnet.config import compose_config
from regionnet.predict import predict_trainer_config
from regionnet.regions import REGIONS

NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is false): the GPU run needs one"


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_trainer_gpu_pins_batches_and_runs_bf16_channels_last(trainer, tmp_path):
    cfg = compose_config("train", [f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.pin_memory is True and cfg.model.channels_last is True
    # the rest of the Trainer node is trainer/default.yaml's, and the command line still wins
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.log_every_n_steps == 10
    cfg = compose_config("train", [f"trainer={trainer}", "model.channels_last=false"])
    assert cfg.model.channels_last is False


def test_cpu_trainers_keep_pageable_memory_and_fp32():
    for overrides in ([], ["trainer=cpu"], ["trainer=ddp_sim"], ["debug=tiny"]):
        cfg = compose_config("train", overrides)
        assert cfg.trainer.precision == "32-true", overrides
        assert cfg.data.pin_memory is False and cfg.model.channels_last is False, overrides
    sim = compose_config("train", ["trainer=ddp_sim"]).trainer
    assert (sim.accelerator, sim.strategy, sim.devices, sim.sync_batchnorm) == (
        "cpu",
        "ddp",
        2,
        False,
    )
    # regionnet-pretrain shares the trainer group
    cfg = compose_config("pretrain", ["trainer=gpu"])
    assert cfg.data.pin_memory is True and cfg.model.channels_last is True


def test_trainer_gpu_data_module_pins_its_loaders(tmp_path):
    from regionnet.run import build_datamodule

    cfg = compose_config("train", [*FAST, "trainer=gpu", f"paths.output_dir={tmp_path}"])
    dm = build_datamodule(cfg)
    dm.setup()
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory


def test_lightning_copies_batches_to_cuda_without_blocking():
    """What trainer=gpu relies on: Lightning's batch transfer passes non_blocking=True for a
    CUDA target (so pinned batches copy asynchronously), and blocks for the CPU."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    calls = []

    def fake_to(self, *args, **kwargs):
        calls.append(kwargs)
        return self

    batch = {"image": torch.zeros(2, 1, 4, 4), "labels": torch.zeros(2, 5), "path": ["a", "b"]}
    with mock.patch.object(torch.Tensor, "to", fake_to):
        move_data_to_device(batch, torch.device("cuda", 0))
    assert calls == [{"non_blocking": True}] * 2
    calls.clear()
    with mock.patch.object(torch.Tensor, "to", fake_to):
        move_data_to_device(batch, torch.device("cpu"))
    assert calls == [{}] * 2


def test_predict_on_a_gpu_runs_bf16_channels_last():
    def cfg(*overrides):
        return compose_config("predict", ["ckpt_path=x.ckpt", "input=y", *overrides])

    for asked in (["accelerator=gpu"], ["accelerator=cuda"], ["trainer.accelerator=gpu"]):
        c = cfg(*asked)
        assert predict_trainer_config(c)["precision"] == "bf16-mixed", asked
        assert c.channels_last is True, asked
    for asked in ([], ["accelerator=cpu"], ["accelerator=auto"]):
        c = cfg(*asked)  # auto may land on the CPU or feed ONNX Runtime: full precision
        assert predict_trainer_config(c)["precision"] == "32-true", asked
        assert c.channels_last is False, asked
    c = cfg("accelerator=gpu", "precision=32-true", "channels_last=false")
    assert predict_trainer_config(c)["precision"] == "32-true" and c.channels_last is False


def test_gpu_benchmark_code_runs_and_skips_without_cuda(tmp_path):
    model = build(True)
    for train in (False, True):
        rate = throughput(
            model, "cpu", 2, 32, bf16=True, channels_last=True, train=train, min_run_time=0.01
        )
        assert rate > 0
    settings = BenchSettings(tmp_path, tmp_path / "out", "32-true", quick=True)
    if not torch.cuda.is_available():
        assert gpu_section(settings) == {"skipped": NO_CUDA}


def test_no_gpu_skip_is_allowed_under_ci():
    """CI has no GPU: conftest must leave this skip a skip under CI=true."""
    assert not any(key in NO_GPU for key in MUST_RUN_IN_CI)


def _films(folder: Path, n: int = 6) -> Path:
    from regionnet.data.phantom import render_phantom

    folder.mkdir(parents=True)
    for i in range(n):
        pixels = render_phantom(REGIONS[i % len(REGIONS)], i, 64)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.gpu
def test_short_gpu_training_and_prediction(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    from regionnet.predict import predict
    from regionnet.train import train

    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        # debug=tiny chooses the CPU; the GPU settings come back on the command line
        [*FAST, "trainer=gpu", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
         f"paths.output_dir={run}"],
    )  # fmt: skip
    assert cfg.data.pin_memory and cfg.model.channels_last
    metrics = train(cfg)
    assert "val/auroc_mean_best" in metrics
    ckpt = run / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "preds.csv"
    summary = predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={ckpt}",
                f"input={_films(tmp_path / 'films')}",
                f"output={out}",
                f"paths.output_dir={tmp_path}",
                "accelerator=gpu",
                "num_workers=0",
            ],
        )  # fmt: skip
    )
    assert summary["ok"] == 6 and summary["errors"] == 0
    rows = pd.read_csv(out)
    probs = rows[[f"p_{r}" for r in REGIONS]].to_numpy()
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
