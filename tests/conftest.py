"""Test-wide settings: never download, never talk to W&B, locate the shared real data."""

import os
from pathlib import Path

import pytest

# Set before any test imports timm/huggingface_hub or wandb: no test may reach a network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tiny, fast phantom training for tests: 32-48 px images, a dozen images per region, CPU.
FAST = [
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "model.pretrained=false",  # tests pick tiny random backbones; test_weights covers ImageNet
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "data.image_size=32",
    "data.phantom.per_region=12",
    "data.num_workers=0",
    "data.batch_size=16",
]


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout (real radiographs); skip where it is absent."""
    if not (SHARED_DATA / "radiographs" / "manifest.csv").is_file():
        pytest.skip(f"real radiographs not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def fast() -> list[str]:
    """Overrides for a tiny, quick phantom training (see FAST)."""
    return list(FAST)
