"""The accuracy section: the study's protocol (`experiment=yi2019`) on ../shared/data.

Trains on the shared manifest (patient-grouped 64/12/24 split, one-vs-rest heads, other
regions as negatives), evaluates the best checkpoint and breaks the result down
(`regionnet.bench.protocol.one_protocol`); a full run trains again with augmentation that hides
image size and crop style.
"""

from __future__ import annotations

import json
import time

import pandas as pd

from regionnet.bench.protocol import one_protocol, protocol_overrides, read_manifest
from regionnet.bench.settings import BenchSettings
from regionnet.regions import REGIONS


def leave_one_source_out(manifest: pd.DataFrame) -> dict:
    """Regions with at least two sources can be trained on one and tested on the other."""
    sources = manifest.groupby("anatomy")["source"].nunique()
    ready = sorted(r for r in REGIONS if sources.get(r, 0) >= 2)
    return {
        "regions_with_two_sources": ready,
        "note": (
            "measured in the transfer section (regionnet/bench/transfer.py) for"
            if ready
            else "not possible yet: every target region comes from one source"
        ),
    }


def accuracy_section(settings: BenchSettings) -> dict:
    manifest = read_manifest(settings.data_dir)
    fine_tune = settings.accuracy
    base = [
        "experiment=yi2019",
        "trainer.accelerator=cpu",
        *protocol_overrides(settings, fine_tune),
    ]
    out = {
        "data": {
            "images": len(manifest),
            "by_anatomy": manifest["anatomy"].value_counts().to_dict(),
        },
        "settings": {
            "image_size": fine_tune.image_size,
            "epochs": fine_tune.epochs,
            "augment_factor": fine_tune.augment_factor,
            "precision": settings.precision,
        },
        "leave_one_source_out": leave_one_source_out(manifest),
    }
    start = time.perf_counter()
    out["yi2019"] = one_protocol(settings, "yi2019", base, manifest)
    if not settings.quick:
        crop = [*base, "data.augment.crop_scale=[0.35,1.0]"]
        out["yi2019_crop"] = one_protocol(settings, "yi2019_crop", crop, manifest)
    out["wall_seconds"] = time.perf_counter() - start
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    (settings.artifacts / "accuracy.json").write_text(json.dumps(out, indent=2, default=str))
    return out
