"""Test-wide settings: never download, never talk to W&B, locate the shared real data."""

import os
from pathlib import Path

import pytest

# Set before any test imports timm/huggingface_hub or wandb: no test may reach a network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tiny, fast phantom training for tests (conf/debug/tiny.yaml): 32 px, a dozen per region, CPU.
FAST = ["debug=tiny", "data.phantom.per_region=12"]


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
