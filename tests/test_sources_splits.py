"""Data sources (folder tree, CSV manifest, phantoms) and patient-grouped stratified splits."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from regionnet.data.sources import csv_records, folder_records, phantom_records
from regionnet.data.splits import (
    assign_splits,
    check_no_patient_leak,
    kfold_splits,
    read_split_file,
)
from regionnet.regions import REGIONS


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 6), value, np.uint8)).save(path)


def test_folder_tree_maps_aliases_other_and_nested_files(tmp_path):
    _png(tmp_path / "knee" / "a.png")
    _png(tmp_path / "hip" / "sub" / "b.png")
    _png(tmp_path / "chest" / "c.png")
    (tmp_path / "knee" / "notes.txt").write_text("not an image")
    df = folder_records(tmp_path, REGIONS)
    assert sorted(df["region"]) == ["knee", "other", "pelvis"]
    row = df[df["region"] == "pelvis"].iloc[0]
    assert row["label_pelvis"] == 1 and row[[f"label_{r}" for r in REGIONS]].sum() == 1
    other = df[df["region"] == "other"].iloc[0]
    assert other[[f"label_{r}" for r in REGIONS]].sum() == 0
    assert len(df) == 3  # the .txt file is skipped


def test_unknown_folder_fails_with_valid_names_unless_configured(tmp_path):
    _png(tmp_path / "knee" / "a.png")
    _png(tmp_path / "misc" / "b.png")
    with pytest.raises(ValueError, match="misc.*Valid names.*shoulder"):
        folder_records(tmp_path, REGIONS)
    df = folder_records(tmp_path, REGIONS, unknown_as_other=True)
    assert set(df["region"]) == {"knee", "other"}


def test_missing_root_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root="):
        folder_records(tmp_path / "nope", REGIONS)


def test_csv_with_region_column_resolves_relative_paths(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    pd.DataFrame(
        {
            "path": ["imgs/a.png", "/abs/b.png"],
            "region": ["HIP", "wrist"],
            "patient_id": ["p1", None],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    df = csv_records(tmp_path / "m.csv", REGIONS)
    assert df["path"][0] == str(tmp_path / "imgs" / "a.png")
    assert df["path"][1] == "/abs/b.png"
    assert list(df["region"]) == ["pelvis", "other"]
    assert df["patient_id"][1] == "/abs/b.png"  # no id: its own patient


def test_csv_with_one_column_per_region(tmp_path):
    rows = [
        {"path": f"{i}.png", **{r: int(r == reg) for r in REGIONS}} for i, reg in enumerate(REGIONS)
    ]
    rows.append({"path": "x.png", **{r: 0 for r in REGIONS}})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    df = csv_records(tmp_path / "m.csv", REGIONS)
    assert list(df["region"]) == [*REGIONS, "other"]


def test_csv_errors_name_the_file(tmp_path):
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv.*'path' column"):
        csv_records(tmp_path / "bad.csv", REGIONS)
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(ValueError, match="nolabel.csv.*'region' column"):
        csv_records(tmp_path / "nolabel.csv", REGIONS)
    pd.DataFrame({"path": ["a.png"], "region": ["knee"], "split": ["holdout"]}).to_csv(
        tmp_path / "split.csv", index=False
    )
    with pytest.raises(ValueError, match="holdout"):
        csv_records(tmp_path / "split.csv", REGIONS)


def _records(n_per_region=50, images_per_patient=1):
    rows = []
    for region in (*REGIONS, "other"):
        for i in range(n_per_region):
            rows.append(
                {
                    "path": f"{region}/{i}.png",
                    "region": region,
                    "patient_id": f"{region}-{i // images_per_patient}",
                }
            )
    return pd.DataFrame(rows)


def test_split_proportions_within_one_image_per_region():
    df = _records(50)
    df["split"] = assign_splits(df, seed=3)
    for region, group in df.groupby("region"):
        counts = group["split"].value_counts()
        for split, share in zip(("train", "val", "test"), (0.64, 0.12, 0.24), strict=True):
            assert abs(counts.get(split, 0) - share * len(group)) <= 1, (region, split, counts)


def test_split_is_deterministic_and_seeded():
    df = _records(30)
    a, b, c = (assign_splits(df, seed=s) for s in (1, 1, 2))
    assert a.equals(b)
    assert not a.equals(c)


def test_patients_never_cross_splits_even_with_mixed_regions():
    df = _records(40, images_per_patient=3)
    # some patients hold films of two regions, as in the fracture-film source
    mixed = df.index % 7 == 0
    df.loc[mixed, "patient_id"] = [f"shared-{i // 14}" for i in df.index[mixed]]
    df["split"] = assign_splits(df, seed=0)
    check_no_patient_leak(df)
    assert df.groupby("patient_id")["split"].nunique().max() == 1


def test_leak_in_a_given_split_is_reported():
    df = pd.DataFrame({"path": ["a", "b"], "patient_id": ["p", "p"], "split": ["train", "test"]})
    with pytest.raises(ValueError, match="more than one split"):
        check_no_patient_leak(df)


def test_bad_fractions_name_the_key():
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits(_records(5), fractions=(0.5, 0.5, 0.5))


def test_kfold_test_folds_partition_the_patients():
    df = _records(20, images_per_patient=2)
    tests = []
    for fold in range(4):
        split = kfold_splits(df, folds=4, fold=fold, seed=0)
        d = df.assign(split=split)
        check_no_patient_leak(d)
        assert {"train", "val", "test"} <= set(split)
        tests.append(set(d.loc[d["split"] == "test", "path"]))
    assert set().union(*tests) == set(df["path"])
    assert sum(len(t) for t in tests) == len(df)


def test_split_file_round_trip(tmp_path):
    df = _records(10)
    df["split"] = assign_splits(df, seed=0)
    df[["path", "split"]].to_csv(tmp_path / "split.csv", index=False)
    assert read_split_file(tmp_path / "split.csv", df).equals(df["split"])
    with pytest.raises(ValueError, match="have no split there"):
        read_split_file(tmp_path / "split.csv", pd.concat([df, df.assign(path="new")]))


def test_phantom_records_are_balanced_with_other_regions():
    df = phantom_records(REGIONS, per_region=4, other_regions=("chest",), seed=0)
    assert df["region"].value_counts().to_dict() == {**dict.fromkeys(REGIONS, 4), "other": 4}
    assert df["path"].str.startswith("phantom://").all()
    with pytest.raises(ValueError, match="cannot draw"):
        phantom_records(("knee", "wrist"), per_region=1)
