"""Seeded, stratified, patient-grouped train/val/test splits and k folds.

A patient's radiographs always land in one split (no leak of anatomy or acquisition between
train and test). Patients are stratified by their most common region, so every split holds
each region in about the requested share: the default 64/12/24 % is the reference study's.
K folds are scikit-learn's `StratifiedGroupKFold` (groups = patients, strata = regions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from regionnet.data.sources import SPLITS

STUDY_FRACTIONS = (0.64, 0.12, 0.24)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or not np.isclose(f.sum(), 1.0, atol=1e-6):
        raise ValueError(
            f"data.split_fractions={list(fractions)} must be three non-negative shares of "
            "train/val/test summing to 1, e.g. [0.64, 0.12, 0.24]"
        )
    return f


def _patient_strata(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: image count and stratum (most common region, ties by name)."""
    counts = df.groupby(["patient_id", "region"]).size().rename("n").reset_index()
    counts = counts.sort_values(["patient_id", "n", "region"], ascending=[True, False, True])
    strata = counts.drop_duplicates("patient_id").set_index("patient_id")["region"]
    sizes = df.groupby("patient_id").size()
    return pd.DataFrame({"stratum": strata, "n": sizes})


def assign_splits(
    df: pd.DataFrame, fractions: Sequence[float] = STUDY_FRACTIONS, seed: int = 0
) -> pd.Series:
    """Return a train/val/test label per row; deterministic for (rows, fractions, seed).

    Within each stratum, patients are visited in a seeded random order (largest first, so big
    groups cannot overshoot late) and each goes to the split furthest below its target count.
    With one image per patient this gives every split within one image of its target share.
    """
    f = _check_fractions(fractions)
    patients = _patient_strata(df)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for stratum in sorted(patients["stratum"].unique()):
        group = patients[patients["stratum"] == stratum]
        order = rng.permutation(len(group))
        group = group.iloc[order].sort_values("n", ascending=False, kind="stable")
        target = f * group["n"].sum()
        filled = np.zeros(3)
        for pid, n in group["n"].items():
            k = int(np.argmax(target - filled))
            assignment[pid] = SPLITS[k]
            filled[k] += n
    return df["patient_id"].map(assignment).rename("split")


def kfold_splits(
    df: pd.DataFrame, folds: int, fold: int, val_fraction: float = 0.12, seed: int = 0
) -> pd.Series:
    """Fold `fold` of `folds` patient-grouped stratified folds as the test split.

    The folds are `sklearn.model_selection.StratifiedGroupKFold` (shuffled with `seed`, so
    deterministic for (rows, folds, seed)): no patient in two folds, each fold's region mix
    close to the whole set's. The remaining patients are split again into train and val
    (`val_fraction` of all images) by `assign_splits`.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(
            f"data.folds={folds}, data.fold={fold}: need folds >= 2, 0 <= fold < folds"
        )
    kfold = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        folds_rows = list(kfold.split(df, df["region"].astype(str), df["patient_id"]))
    except ValueError as e:  # more folds than patients, or than images of every region
        raise ValueError(f"data.folds={folds} does not fit the data: {e}") from e
    test_rows = folds_rows[fold][1]
    split = pd.Series("rest", index=df.index, dtype=object)
    split.iloc[test_rows] = "test"
    rest = df[split == "rest"]
    v = val_fraction / (1 - 1 / folds)
    inner = assign_splits(rest, (1 - v, v, 0.0), seed=seed + 1)
    split[split == "rest"] = inner
    return split.rename("split")


def read_split_file(path: str | Path, df: pd.DataFrame) -> pd.Series:
    """Splits from a previous run's `split.csv` (columns `path`, `split`), matched by path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file={str(path)!r} does not exist")
    saved = pd.read_csv(path, dtype=str, encoding="utf-8", encoding_errors="surrogateescape")
    if not {"path", "split"} <= set(saved.columns):
        raise ValueError(f"{path}: a split file needs 'path' and 'split' columns")
    lookup = dict(zip(saved["path"], saved["split"].str.lower(), strict=True))
    split = df["path"].map(lookup)
    missing = split.isna().sum()
    if missing:
        example = df.loc[split.isna(), "path"].iloc[0]
        raise ValueError(
            f"{path}: {missing} of {len(df)} records have no split there (e.g. {example}); "
            "was it written for the same data? Drop data.split_file to split afresh."
        )
    bad = sorted(set(split) - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split names {bad}; allowed {SPLITS}")
    return split.rename("split")


def check_no_patient_leak(df: pd.DataFrame) -> None:
    """Raise if any patient_id appears in more than one split."""
    per_patient = df.groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise ValueError(
            f"{len(leaked)} patients are in more than one split (e.g. {leaked.index[0]!r}); "
            "fix the manifest's split column or drop it to let regionnet split by patient"
        )
