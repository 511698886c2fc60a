"""UNIFESP X-ray Body Part Classifier (Kaggle competition, 2022): DICOM radiographs, 22 classes.

Layout (`--root` is the unpacked competition folder)::

    train.csv                columns SOPInstanceUID, Target; Target holds one or more class
                             ids separated by spaces ("3" or "3 0")
    train/**/<SOPInstanceUID>-c.dcm   (Kaggle nests train/<study>/<series>/<uid>-c.dcm; files are
                             matched by name anywhere under the root, with or without the -c/-d
                             suffix)

Class ids: 0 Abdomen, 1 Ankle, 2 Cervical Spine, 3 Chest, 4 Clavicles, 5 Elbow, 6 Feet,
7 Finger, 8 Forearm, 9 Hand, 10 Hip, 11 Knee, 12 Lower Leg, 13 Lumbar Spine, 14 Others,
15 Pelvis, 16 Shoulder, 17 Sinus, 18 Skull, 19 Thigh, 20 Thoracic Spine, 21 Wrist.
regionnet names (`CLASSES`): hip and pelvis -> pelvis; cervical/lumbar/thoracic spine -> spine;
feet -> foot; lower leg -> leg; thigh -> femur; sinus -> skull (sinus series are skull
views); clavicles and others -> other (no regionnet anatomy fits).

Multi-label rows (an image showing e.g. chest and abdomen) are handled explicitly:
- single-label manifest (default): a row whose ids map to ONE regionnet name is kept ("10 15",
  hip + pelvis, is pelvis); rows mapping to several names are excluded and counted;
- `multilabel=True` (`--multilabel`): every row is kept, with one 0/1 column per regionnet
  name instead of `region` (clavicles/others rows are all 0); `csv_records` trains one positive
  head per region shown.
`patient_id` is the DICOM PatientID, else the StudyInstanceUID (headers are read, pixels are
not); `original_label` is the Target string.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from regionnet.datasets.manifest import Excluded, build_manifest, find_images, require
from regionnet.io import RadiographReadError, read_dicom_header
from regionnet.regions import OTHER

NAME = "unifesp"
LAYOUT = "train.csv (SOPInstanceUID,Target) and train/**/<SOPInstanceUID>-c.dcm"
# class id -> (the competition's name, regionnet name)
CLASSES: dict[int, tuple[str, str]] = {
    0: ("Abdomen", "abdomen"), 1: ("Ankle", "ankle"), 2: ("Cervical Spine", "spine"),
    3: ("Chest", "chest"), 4: ("Clavicles", OTHER), 5: ("Elbow", "elbow"), 6: ("Feet", "foot"),
    7: ("Finger", "finger"), 8: ("Forearm", "forearm"), 9: ("Hand", "hand"),
    10: ("Hip", "pelvis"), 11: ("Knee", "knee"), 12: ("Lower Leg", "leg"),
    13: ("Lumbar Spine", "spine"), 14: ("Others", OTHER), 15: ("Pelvis", "pelvis"),
    16: ("Shoulder", "shoulder"), 17: ("Sinus", "skull"), 18: ("Skull", "skull"),
    19: ("Thigh", "femur"), 20: ("Thoracic Spine", "spine"), 21: ("Wrist", "wrist"),
}  # fmt: skip
MULTILABEL_COLUMNS = tuple(dict.fromkeys(r for _, r in CLASSES.values() if r != OTHER))


def _uid(name: str) -> str:
    """SOPInstanceUID from a file stem or CSV cell: drop the export's -c/-d suffix."""
    name = name.strip()
    return name[:-2] if name.endswith(("-c", "-d")) else name


def _patient(path: Path) -> str:
    try:
        header = read_dicom_header(path)
    except RadiographReadError:
        return ""
    return header["PatientID"] or header["StudyInstanceUID"]


def index(root: str | Path, source: str = NAME, multilabel: bool = False) -> pd.DataFrame:
    """Index the UNIFESP training set under `root` (see the module docstring)."""
    root = require(root, NAME, LAYOUT, "train.csv")
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    if not {"SOPInstanceUID", "Target"} <= set(table.columns):
        raise ValueError(
            f"{root / 'train.csv'}: needs columns SOPInstanceUID, Target; has {list(table.columns)}"
        )
    files = {_uid(p.stem): p for p in find_images(root, (".dcm",))}
    if not files:
        raise FileNotFoundError(
            f"--root {str(root)!r} does not match the {NAME} layout: no .dcm files under it. "
            f"Expected {LAYOUT}"
        )
    excluded, rows = Excluded(), []
    for _, r in table.iterrows():
        uid, target = _uid(r["SOPInstanceUID"]), r["Target"].strip()
        try:
            ids = sorted({int(t) for t in target.split()})
        except ValueError:
            ids = []
        if not ids or any(i not in CLASSES for i in ids):
            excluded.add(f"Target is not class ids 0-{len(CLASSES) - 1}", f"{uid}: {target!r}")
            continue
        path = files.get(uid)
        if path is None:
            excluded.add(f"listed in {root / 'train.csv'} but no <uid>.dcm file found", uid)
            continue
        names = list(dict.fromkeys(CLASSES[i][1] for i in ids))
        row = {"path": path, "patient_id": _patient(path), "original_label": target}
        if multilabel:
            row.update({c: int(c in names) for c in MULTILABEL_COLUMNS})
        elif len(names) > 1:
            excluded.add(f"multi-label ({'+'.join(names)}); use --multilabel to keep", uid)
            continue
        else:
            row["region"] = names[0]
        row["original_classes"] = "+".join(CLASSES[i][0] for i in ids)
        rows.append(row)
    return build_manifest(rows, source, excluded, where=str(root))
