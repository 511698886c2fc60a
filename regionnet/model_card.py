"""`model_card.json`: what a trained RegionNet is, takes, returns, was trained on and is for.

Keys follow the MONAI bundle `metadata.json` where one fits (`version`, `task`,
`description`, `data_source`, `data_type`, `image_classes`, `label_classes`, `pred_classes`,
`eval_metrics`, `intended_use`, `references`, `network_data_format` with `inputs`/`outputs`)
plus regionnet's own (`regions` with DICOM terms and SNOMED CT codes, `thresholds`, `backbone`,
`training_data`, `auroc_per_head`: each head's AUROC with its interval where known and its
positives, n+, `known_limits`, and with finding heads `findings`: each finding's declaration,
threshold and metrics). Written next to the checkpoints at the end of training.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import regionnet
from regionnet.regions import OTHER, UNKNOWN, region_info
from regionnet.reporting import auroc_summary

FEW_IMAGES = 100  # fewer training images than this for a head is called out as a limit
FEW_POSITIVES = 10  # a test AUROC resting on fewer positives than this is called out

INTENDED_USE = (
    "Tell which anatomical region a musculoskeletal radiograph shows, to drive hanging "
    "protocols, to check or fill DICOM BodyPartExamined (quality assurance) and to sort or "
    "curate radiograph collections. Not for diagnosis: it says nothing about pathology, and "
    "its output must not steer patient care."
)
REFERENCES = (
    "Yi et al., Pediatric Radiology 2019: the reference study of the five-region set and "
    "its 64/12/24 % split (one network per region; regionnet shares one backbone).",
)


def write_model_card(
    path: str | Path,
    model,
    datamodule,
    metrics: Mapping[str, float] | None = None,
    card: Callable[..., dict] | None = None,
) -> Path:
    """Write `model_card.json` into the folder `path` (or to `path` itself when it ends in
    `.json`) for a trained `model` and the `datamodule` it was trained on. `card(model,
    datamodule, metrics)` makes the card: the region card (`model_card`) by default; the
    landmark, box and composed tasks pass their own (`regionnet.train.TASK_RUNS`)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "model_card.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    card = (card or model_card)(model, datamodule, metrics or {})
    path.write_text(json.dumps(card, indent=2, default=_plain) + "\n")
    return path


def _about() -> dict:
    """The keys every card opens with: what made it, when, and what input kind it takes."""
    return {
        "name": "regionnet",
        "version": regionnet.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pytorch_version": torch.__version__,
        "data_type": "radiograph (DICOM, PNG, JPEG, TIFF)",
        "image_classes": "single channel greyscale radiograph, MONOCHROME2 (bone bright)",
    }


def _backbone(model) -> dict:
    """The backbone every card names; starting weights: random, imagenet-package (package,
    version, sha256), timm-hub or file (name, sha256)."""
    h = model.hparams
    return {
        "name": h.backbone,
        "library": "timm",
        "weights": dict(h.get("weights_source") or {"kind": "unknown"}),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def head_card(model, datamodule, metrics: Mapping[str, float], **fields) -> dict:
    """The keys every head type's card shares (`_about`, `_backbone`, training films,
    `eval_metrics`) around the head type's own `fields` (`task`, `description`,
    `network_data_format`, `intended_use`, ...): the landmark and box cards."""
    films = int(getattr(datamodule, "train_size", lambda: 0)() or 0)
    return {
        **_about(),
        **fields,
        "backbone": _backbone(model),
        "training_data": {"films": films},
        "eval_metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))},
    }


def model_card(model, datamodule, metrics: Mapping[str, float]) -> dict:
    """The card as a plain dict (see the module docstring for its keys)."""
    card = _card(model, datamodule, metrics)
    if getattr(model, "findings", None):
        card["findings"] = _findings(model, metrics)
    return card


def _findings(model, metrics: Mapping[str, float]) -> dict:
    """Per finding head: its declaration, its threshold (chosen on validation; binary heads)
    and its metrics, over the films that carry its label."""
    out = {}
    backbone = model.hparams.get("finding_backbone", "shared")  # older checkpoints: shared
    for k, f in enumerate(model.findings):
        spec = {**dict(model.hparams.findings[f]), "backbone": backbone}
        found = {key: v for key, v in metrics.items() if key.endswith(f"/{f}") and "/" in key}
        if "grades" in spec:
            out[f] = {
                **spec,
                "kind": "ordinal",
                "label": (
                    f"the grade of {spec['from']}, lowest first {spec['grades']}, on "
                    f"{spec['region']} films only"
                ),
                "output": "a probability per grade; the predicted grade is the median grade",
                "metrics": found,
            }
            continue
        out[f] = {
            **spec,
            "label": f"1 = {spec['from']} in {spec['positive']}, on {spec['region']} films only",
            "threshold": float(model.finding_thresholds[k]),
            "metrics": found,
        }
    return out


def _card(model, datamodule, metrics: Mapping[str, float]) -> dict:
    h, d = model.hparams, datamodule.hparams
    regions = list(model.regions)
    size = int(d.image_size)
    records = datamodule.records
    return {
        **_about(),
        "task": "Anatomical region classification of musculoskeletal radiographs",
        "description": (
            f"One shared {h.backbone} backbone with one binary (one-vs-rest) head per region "
            f"({', '.join(regions)}). A head calls its region when its probability is at or "
            f"above its threshold; when no head does, the radiograph is '{UNKNOWN}'."
        ),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "label_classes": {r: f"1 = shows the {r}, 0 = does not" for r in regions},
        "pred_classes": [*regions, UNKNOWN],
        "regions": [_region(r, k) for k, r in enumerate(regions)],
        "network_data_format": _data_format(regions, size, d),
        "thresholds": dict(zip(regions, model.thresholds.tolist(), strict=True)),
        "threshold_method": h.get("threshold_method", "fixed"),
        "threshold_chosen_on": "validation split",
        "backbone": {
            **_backbone(model),
            "shared": bool(h.get("shared_backbone", True)),
            "pretrained": bool(h.get("pretrained")) or bool(h.get("weights_file")),
        },
        "training_data": _training_data(records, regions, datamodule),
        "data_source": sorted(records["source"].astype(str).unique()),
        "eval_metrics": {
            k: v for k, v in metrics.items() if k.startswith(("test/", "external/", "val/"))
        },
        # "AUC 1.00, n+=1": an AUROC from one positive says little; say how many it rests on
        "auroc_per_head": auroc_summary(metrics, ("val", "test", "external"), regions),
        "intended_use": INTENDED_USE,
        "known_limits": _limits(records, regions, datamodule, metrics),
        "references": list(REFERENCES),
    }


def _region(name: str, head: int) -> dict:
    info = region_info(name)
    return {
        "head": head,
        "name": name,
        "dicom_body_part_examined": info.dicom if info else "",
        "snomed_ct": info.snomed if info else "",
        "probability_column": f"p_{name}",
    }


def _data_format(regions: list[str], size: int, d) -> dict:
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "XR",
                "num_channels": 1,
                "spatial_shape": [size, size],
                "dtype": "float32",
                # what the network sees: [0, 1] intensities after normalisation
                "value_range": [(0 - d.mean) / d.std, (1 - d.mean) / d.std],
                "intensity_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
                "preprocessing": [
                    "read as greyscale, MONOCHROME1 inverted, intensities scaled to [0, 1]",
                    f"aspect-preserving resize of the longest side to {size} px, "
                    f"zero padding to {size} x {size}",
                    f"normalise: (x - {d.mean}) / {d.std}",
                ],
                "normalisation": {"mean": float(d.mean), "std": float(d.std)},
            }
        },
        "outputs": {
            "pred": {
                "type": "probabilities",
                "format": "sigmoid of each head's logit; independent, need not sum to 1",
                "num_channels": len(regions),
                "spatial_shape": [len(regions)],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_onehot": False,
                "channel_def": {str(k): r for k, r in enumerate(regions)},
            }
        },
    }


def _training_data(records, regions: list[str], datamodule) -> dict:
    counts = records.groupby(["region", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex([r for r in [*regions, OTHER] if r in counts.index])
    summary = {
        "sources": records["source"].astype(str).value_counts().sort_index().to_dict(),
        "images": len(records),
        "patients": int(records["patient_id"].nunique()),
        "images_per_region_and_split": {
            r: {s: int(n) for s, n in row.items()} for r, row in counts.iterrows()
        },
        "split": _split_rule(datamodule.hparams),
    }
    if "age_group" in records:
        ages = records.groupby(["age_group", "split"]).size().unstack(fill_value=0)
        summary["images_per_age_group_and_split"] = {
            str(a): {s: int(n) for s, n in row.items()} for a, row in ages.iterrows()
        }
    if datamodule.external is not None:
        summary["external_test_images_per_region"] = (
            datamodule.external["region"].value_counts().sort_index().to_dict()
        )
    return summary


def _split_rule(h) -> str:
    if h.split_file:
        return f"from {h.split_file}"
    if h.folds:
        return f"fold {h.fold} of {h.folds} (patient-grouped, stratified, seed {h.split_seed})"
    return f"patient-grouped stratified {list(h.split_fractions)} (seed {h.split_seed})"


def _limits(records, regions: list[str], datamodule, metrics: Mapping | None = None) -> list[str]:
    limits = [
        "Heads are one-vs-rest: anatomy absent from training (as a target or as "
        f"'{OTHER}') may still make a head fire instead of giving '{UNKNOWN}'.",
        "Thresholds were chosen on the validation split; recheck them on local data.",
    ]
    sources = records["source"].astype(str)
    if (sources == "phantom").any():
        limits.insert(
            0,
            "Trained on SYNTHETIC phantoms, not radiographs: its accuracy says nothing about "
            "real images.",
        )
    if sources.nunique() > 1:
        for r in [*regions, OTHER]:
            src = sorted(sources[records["region"] == r].unique())
            if len(src) == 1:
                limits.append(
                    f"All {r} images come from one source ({src[0]}): the model may recognise "
                    "the source (scanner, burned-in text, crop) instead of the anatomy."
                )
    train = records[records["split"] == "train"]
    few = [r for r in regions if (train["region"] == r).sum() < FEW_IMAGES]
    if few:
        limits.append(f"Fewer than {FEW_IMAGES} training images for: {', '.join(few)}.")
    metrics = metrics or {}
    thin = {
        r: int(n)
        for r in regions
        if (n := metrics.get(f"test/positives/{r}")) is not None and n < FEW_POSITIVES
    }
    if thin:
        counts = ", ".join(f"{r} (n+={n})" for r, n in thin.items())
        limits.append(
            f"Test AUROC rests on fewer than {FEW_POSITIVES} positives for: {counts}; "
            "an AUROC and interval from so few positives say little."
        )
    if datamodule.external is None:
        limits.append("Not tested on an external site (no data.external_test).")
    return limits


def _plain(value):
    """JSON fallback for numpy and torch scalars."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
