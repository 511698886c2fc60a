"""A phantom-trained checkpoint good enough to say `unknown` to anatomy it was not trained on.

Shared by the prediction and API tests (``from phantom_model import phantom_checkpoint``):
the session-scoped fixture trains once per test session, whichever module asks first. The
model sees phantoms of the five target regions plus chest, foot and skull as negatives for
every head; thresholds are chosen so that 95 % of the validation split's out-of-set phantoms
are `unknown` (rejection@0.95): out-of-set phantoms fall below every head's threshold. About
15-30 s on a busy 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regionnet.config import compose_config
from regionnet.train import train

PHANTOM_TRAIN = [
    "debug=tiny",
    "model.backbone=test_resnet",  # timm's tiny test ResNet: fast on a CPU at 32 px
    "model.optimizer.lr=0.002",
    "model.threshold_method=rejection@0.95",  # 95% of val out-of-set phantoms unknown
    "trainer.max_epochs=10",
    "trainer.check_val_every_n_epoch=10",  # validate (and choose thresholds) once, at the end
    "callbacks.early_stopping=null",
    "data.phantom.per_region=60",
    "data.phantom.other_regions=[chest,foot,skull]",
    "data.batch_size=8",
    "data.augment=null",
    "data.split_fractions=[0.6,0.3,0.1]",
    "test=false",
]
_RUNS: dict[str, Path] = {}


def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory (config.yaml, split.csv, checkpoints/best.ckpt), trained once."""
    if "run" not in _RUNS:
        run = tmp_path_factory.mktemp("phantom_run")
        threads = torch.get_num_threads()
        # Tiny convolutions: one thread avoids contention on a shared 2-core machine.
        torch.set_num_threads(1)
        try:
            train(compose_config("train", [*PHANTOM_TRAIN, f"paths.output_dir={run}"]))
        finally:
            torch.set_num_threads(threads)
        _RUNS["run"] = run
    return _RUNS["run"]


@pytest.fixture(scope="session")
def phantom_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/best.ckpt of the shared phantom training."""
    ckpt = phantom_run(tmp_path_factory) / "checkpoints" / "best.ckpt"
    assert ckpt.is_file(), f"training wrote no checkpoint at {ckpt}"
    return ckpt
