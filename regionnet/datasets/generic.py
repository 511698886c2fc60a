"""Any other dataset: a folder tree or a CSV, plus a label -> region map (YAML).

Layout, folder tree (`--root DIR`)::

    <root>/<label>/**/*.{png,jpg,jpeg,tif,tiff,dcm}     the first folder level is the label

Layout, CSV (`--csv FILE`; paths relative to `--root`, default the CSV's folder)::

    path,<label column>[,<patient column>][,<view column>]

with `label_column` (default `label`, else `region`), `patient_column` (default `patient_id`)
and `view_column` (default `view`) used when present. A patient column keeps a patient's
films together; without it every image is its own patient.

Label map (`--label-map map.yaml`, or a dict): `{label: region}`, e.g.
`{"XR Knee": knee, "Hüfte": pelvis, scout: null}`; a null region drops that label (counted in
the log). Labels not in the map go through regionnet's built-in aliases (`hip` -> pelvis,
`thorax` -> chest); a label neither knows is an error listing all such labels, so nothing is
labelled by accident. Mapped names outside regionnet's anatomy are allowed (a user's own
region, e.g. `clavicle`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml

from regionnet.datasets.manifest import Excluded, build_manifest, existing, find_images, require
from regionnet.regions import canonical_region

NAME = "generic"
LAYOUT = "<root>/<label>/*.png, or --csv FILE with path and label columns"
_SKIP = "_skip"


def load_label_map(label_map: str | Path | Mapping | None) -> dict[str, str | None]:
    """A label map from a YAML file or a dict: {label: region or None}."""
    if label_map is None:
        return {}
    if not isinstance(label_map, Mapping):
        path = Path(label_map).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--label-map {str(path)!r} does not exist")
        label_map = yaml.safe_load(path.read_text()) or {}
        if not isinstance(label_map, Mapping):
            raise ValueError(f"{path}: a label map is a YAML mapping label: region (or null)")
    return {str(k): (None if v is None else str(v)) for k, v in label_map.items()}


def map_labels(labels: list[str], label_map: Mapping[str, str | None], where: str) -> dict:
    """{raw label: region or None (dropped)}; raises listing labels nothing can place."""
    # A null target becomes a sentinel alias, so "XR Knee" and "xr-knee" match alike.
    aliases = {k: _SKIP if v is None else v for k, v in label_map.items()}
    out, unknown = {}, []
    for label in sorted(set(labels)):
        region = canonical_region(label, aliases)
        if region is None:
            unknown.append(label)
        out[label] = None if region == _SKIP else region
    if unknown:
        raise ValueError(
            f"{where}: labels {unknown} are not regionnet anatomy. Map them in a label map "
            "(YAML `label: region`, or `label: null` to skip) and pass --label-map FILE"
        )
    return out


def index(
    root: str | Path | None = None,
    source: str | None = None,
    csv: str | Path | None = None,
    label_map: str | Path | Mapping | None = None,
    label_column: str | None = None,
    patient_column: str = "patient_id",
    view_column: str = "view",
) -> pd.DataFrame:
    """Index a folder tree or a CSV with a label map (see the module docstring)."""
    mapping = load_label_map(label_map)
    excluded, rows = Excluded(), []
    if csv is not None:
        csv = Path(csv).expanduser()
        if not csv.is_file():
            raise FileNotFoundError(f"--csv {str(csv)!r} does not exist")
        base = require(root, NAME, LAYOUT) if root is not None else csv.resolve().parent
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        label_col = label_column or ("label" if "label" in table else "region")
        for col in ("path", label_col):
            if col not in table:
                raise ValueError(
                    f"{csv}: needs columns path and {label_col} (--label-column); "
                    f"has {list(table.columns)}"
                )
        regions = map_labels(table[label_col].tolist(), mapping, str(csv))
        for _, r in table.iterrows():
            label = r[label_col]
            if regions[label] is None:
                excluded.add(f"label {label!r} mapped to null", r["path"])
                continue
            rows.append(
                {
                    "path": base / r["path"],
                    "region": regions[label],
                    "patient_id": r.get(patient_column, ""),
                    "view": r.get(view_column, ""),
                    "original_label": label,
                }
            )
        rows = existing(rows, csv, excluded)
        where = str(csv)
        source = source or csv.stem
    else:
        if root is None:
            raise ValueError("--dataset generic needs --root DIR (a folder tree) or --csv FILE")
        base = require(root, NAME, LAYOUT)
        files = [(f, f.relative_to(base).parts) for f in find_images(base)]
        loose = [f for f, parts in files if len(parts) < 2]
        if loose:
            excluded.add("file directly under the root (no label folder)", loose[0], len(loose))
        files = [(f, parts[0]) for f, parts in files if len(parts) >= 2]
        if not files:
            raise ValueError(f"--root {str(base)!r}: no images in label folders; expected {LAYOUT}")
        regions = map_labels([label for _, label in files], mapping, str(base))
        for f, label in files:
            if regions[label] is None:
                excluded.add(f"label {label!r} mapped to null", f)
                continue
            rows.append({"path": f, "region": regions[label], "original_label": label})
        where = str(base)
        source = source or base.name
    return build_manifest(rows, source, excluded, where=where)
