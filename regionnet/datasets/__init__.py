"""Public musculoskeletal datasets -> regionnet manifests (`regionnet-data index`).

Each adapter walks one dataset as its publisher distributes it (the layout is in the adapter
module's docstring) and returns a manifest frame (`regionnet.datasets.manifest`): path,
region (canonical anatomy, e.g. wrist stays wrist), source, patient_id (prefixed by the
source), view, original_label, label_source. `index_dataset(name, root, **opts)` dispatches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from regionnet.datasets import (
    ddh,
    dicom_index,
    fracatlas,
    generic,
    grazpedwri,
    kneeoa,
    mednist,
    mura,
    rsna_boneage,
    unifesp,
)
from regionnet.datasets.manifest import (
    LayoutError,
    merge_manifests,
    read_manifest,
    write_manifest,
)

ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "mura": mura.index,
    "fracatlas": fracatlas.index,
    "unifesp": unifesp.index,
    "kneeoa": kneeoa.index,
    "rsna_boneage": rsna_boneage.index,
    "ddh": ddh.index,
    "grazpedwri": grazpedwri.index,
    "mednist": mednist.index,
    "generic": generic.index,
    "dicom": dicom_index.index,
}


def options(name: str) -> list[str]:
    """The keyword options adapter `name` accepts besides `root`."""
    params = inspect.signature(ADAPTERS[name]).parameters
    return [p for p in params if p != "root"]


def index_dataset(name: str, root: str | Path | None, **opts) -> pd.DataFrame:
    """Index dataset `name` under `root` into a manifest frame.

    `opts` are the adapter's own options (`source`, and e.g. `multilabel` for unifesp,
    `csv`/`label_map` for generic, `keywords` for dicom); options an adapter does not take
    are an error naming the ones it does.
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(ADAPTERS)}")
    allowed = options(name)
    extra = sorted(k for k in opts if k not in allowed)
    if extra:
        raise ValueError(f"--dataset {name} does not take {extra}; its options are {allowed}")
    return ADAPTERS[name](root, **opts)


__all__ = [
    "ADAPTERS",
    "LayoutError",
    "index_dataset",
    "merge_manifests",
    "options",
    "read_manifest",
    "write_manifest",
]
