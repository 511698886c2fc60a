"""Dataset adapters (`regionnet.datasets`) on tiny fake trees in each publisher's exact layout,
on the real radiographs in ../shared/data, and a short training on a produced manifest."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_factory import make_dicom
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.sources import csv_records
from regionnet.datasets import ADAPTERS, LayoutError, index_dataset
from regionnet.datasets.cli import main
from regionnet.datasets.manifest import (
    MANIFEST_COLUMNS,
    balance_patients,
    merge_manifests,
    read_manifest,
    stats_frame,
    write_manifest,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RADIOGRAPHS = SHARED / "radiographs"
needs_shared = pytest.mark.skipif(
    not (RADIOGRAPHS / "manifest.csv").is_file(),
    reason=f"real radiographs not found at {SHARED} (../shared/data beside the repo)",
)


def png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def excluded(df: pd.DataFrame) -> dict[str, int]:
    return df.attrs["excluded"]


def n_excluded(df: pd.DataFrame, word: str) -> int:
    return sum(n for reason, n in excluded(df).items() if word in reason)


# ------------------------------------------------------------------------------------- MURA


def make_mura(tmp_path: Path) -> Path:
    root = tmp_path / "MURA-v1.1"
    train = [
        "train/XR_WRIST/patient00001/study1_positive/image1.png",
        "train/XR_WRIST/patient00001/study1_positive/image2.png",
        "train/XR_WRIST/patient00001/study1_positive/image3.png",
        "train/XR_SHOULDER/patient00001/study1_negative/image1.png",  # same patient, 2nd part
        "train/XR_HUMERUS/patient00002/study2_negative/image1.png",
    ]
    valid = ["valid/XR_ELBOW/patient11185/study1_positive/image1.png"]
    for rel in train + valid:
        png(root / rel)
    missing = "train/XR_HAND/patient00003/study1_negative/image1.png"  # listed, not on disk
    (root / "train_image_paths.csv").write_text(
        "".join(f"MURA-v1.1/{r}\n" for r in [*train, missing])
    )
    (root / "valid_image_paths.csv").write_text("".join(f"MURA-v1.1/{r}\n" for r in valid))
    return root


def test_mura_groups_studies_by_patient_and_reports_missing_listed_files(tmp_path, caplog):
    root = make_mura(tmp_path)
    with caplog.at_level(logging.WARNING):
        df = index_dataset("mura", root)
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert len(df) == 6
    assert df["region"].value_counts().to_dict() == {
        "wrist": 3,
        "shoulder": 1,
        "humerus": 1,
        "elbow": 1,
    }  # anatomy kept, not collapsed to "other"
    p1 = df[df["patient_id"] == "mura-patient00001"]
    assert len(p1) == 4 and set(p1["region"]) == {"wrist", "shoulder"}
    assert set(df["original_label"]) == {"XR_WRIST", "XR_SHOULDER", "XR_HUMERUS", "XR_ELBOW"}
    assert df.loc[df["region"] == "elbow", "original_split"].item() == "valid"
    assert df.loc[df["region"] == "shoulder", "finding"].item() == "normal"
    assert set(df["label_source"]) == {"dataset"} and set(df["source"]) == {"mura"}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert n_excluded(df, "missing") == 1
    assert "image1.png" in caplog.text and "missing" in caplog.text


def test_mura_without_path_listings_walks_the_folders(tmp_path):
    root = make_mura(tmp_path)
    for f in root.glob("*_image_paths.csv"):
        f.unlink()
    png(root / "train/XR_WRIST/patient00001/study1_positive/._image1.png")  # macOS debris
    df = index_dataset("mura", root)
    assert len(df) == 6 and excluded(df) == {}


def test_mura_wrong_root_names_the_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="train_image_paths.csv"):
        index_dataset("mura", tmp_path / "empty")
    with pytest.raises(LayoutError, match="not a folder"):
        index_dataset("mura", tmp_path / "nowhere")


# -------------------------------------------------------------------------------- FracAtlas

FRACATLAS_HEADER = (
    "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,"
    "frontal,lateral,oblique"
)


def test_fracatlas_maps_flags_and_never_gives_mixed_images_a_region(tmp_path):
    root = tmp_path / "FracAtlas"
    rows = [
        "IMG0000001.jpg,1,0,0,0,0,0,0,1,1,1,0,0",  # hand, fractured
        "IMG0000002.jpg,0,0,1,0,0,1,0,0,0,1,0,0",  # hip -> pelvis
        "IMG0000003.jpg,0,1,0,0,0,0,0,0,0,0,1,0",  # leg
        "IMG0000004.jpg,0,0,0,1,0,0,1,0,0,1,1,0",  # shoulder, multiscan frontal+lateral
        "IMG0000005.jpg,1,1,0,0,1,0,0,0,0,1,0,0",  # mixed
        "IMG0000006.jpg,0,0,0,0,0,0,0,0,0,1,0,0",  # no body-part flag
        "IMG0000007.jpg,0,0,0,1,0,0,0,0,0,1,0,0",  # listed but missing
    ]
    write_csv(root / "dataset.csv", FRACATLAS_HEADER, rows)
    for r in rows[:6]:
        image, fractured = r.split(",")[0], r.split(",")[8] == "1"
        png(root / "images" / ("Fractured" if fractured else "Non_fractured") / image)
    df = index_dataset("fracatlas", root)
    got = dict(zip(df["original_label"], df["region"], strict=True))
    assert got == {"hand": "hand", "hip": "pelvis", "leg": "leg", "shoulder": "shoulder"}
    assert df.loc[df["region"] == "shoulder", "view"].item() == "frontal+lateral"
    assert df.loc[df["region"] == "hand", "finding"].item() == "fractured"
    assert "/Fractured/" in df.loc[df["region"] == "hand", "path"].item()
    assert df["patient_id"].tolist()[0] == "fracatlas-IMG0000001"
    assert n_excluded(df, "mixed") == 1
    assert n_excluded(df, "no body-part flag") == 1
    assert n_excluded(df, "missing") == 1


def test_fracatlas_wrong_root_and_wrong_columns(tmp_path):
    (tmp_path / "FracAtlas" / "images").mkdir(parents=True)
    with pytest.raises(LayoutError, match="dataset.csv"):
        index_dataset("fracatlas", tmp_path / "FracAtlas")
    write_csv(tmp_path / "FracAtlas" / "dataset.csv", "image_id,hand", ["a.jpg,1"])
    with pytest.raises(ValueError, match="missing columns"):
        index_dataset("fracatlas", tmp_path / "FracAtlas")


# ---------------------------------------------------------------------------------- UNIFESP

PIXELS = np.arange(16, dtype=np.uint16).reshape(4, 4) * 200


def make_unifesp(tmp_path: Path) -> Path:
    root = tmp_path / "unifesp"
    targets = {
        "1.2.3.1": ("3", "P1"),  # chest
        "1.2.3.2": ("3 0", "P1"),  # chest + abdomen: multi-label
        "1.2.3.3": ("10 15", "P2"),  # hip + pelvis: one regionnet region
        "1.2.3.4": ("14", "P3"),  # Others
        "1.2.3.5": ("4", "P4"),  # Clavicles
        "1.2.3.6": ("17", ""),  # Sinus; no PatientID -> StudyInstanceUID
    }
    for k, (uid, (_, patient)) in enumerate(targets.items()):
        folder = root / "train" / "train" / f"study{k}" / f"series{k}"
        folder.mkdir(parents=True)
        make_dicom(folder / f"{uid}-c.dcm", PIXELS, PatientID=patient, StudyInstanceUID=f"9.{k}")
    rows = [f"{uid},{t}" for uid, (t, _) in targets.items()]
    rows += ["1.2.3.7,11", "1.2.3.8,99"]  # no file; unknown class id
    write_csv(root / "train.csv", "SOPInstanceUID,Target", rows)
    return root


def test_unifesp_single_label_excludes_multi_label_rows(tmp_path):
    df = index_dataset("unifesp", make_unifesp(tmp_path))
    assert df.set_index("original_label")["region"].to_dict() == {
        "3": "chest",
        "10 15": "pelvis",
        "14": "other",
        "4": "other",
        "17": "skull",
    }
    assert n_excluded(df, "multi-label") == 1
    assert n_excluded(df, "no <uid>.dcm") == 1
    assert n_excluded(df, "class ids") == 1
    assert df.loc[df["region"] == "pelvis", "patient_id"].item() == "unifesp-P2"
    assert df.loc[df["region"] == "skull", "patient_id"].item() == "unifesp-9.5"
    assert df.loc[df["region"] == "pelvis", "original_classes"].item() == "Hip+Pelvis"


def test_unifesp_multilabel_writes_region_columns_that_train(tmp_path):
    df = index_dataset("unifesp", make_unifesp(tmp_path), multilabel=True)
    assert "region" not in df and len(df) == 6
    multi = df[df["original_label"] == "3 0"].iloc[0]
    assert multi["chest"] == 1 and multi["abdomen"] == 1 and multi["knee"] == 0
    assert df.loc[df["original_label"] == "14", ["chest", "pelvis", "skull"]].sum().sum() == 0
    out = write_manifest(df, tmp_path / "unifesp_ml.csv")
    records = csv_records(out, ("chest", "abdomen", "pelvis"))
    row = records[records["path"].str.contains("1.2.3.2-c")].iloc[0]
    assert (row["label_chest"], row["label_abdomen"], row["label_pelvis"]) == (1, 1, 0)
    assert stats_frame(read_manifest(out)).loc["chest", "total"] == 2


def test_unifesp_without_csv_or_dicoms(tmp_path):
    (tmp_path / "u").mkdir()
    with pytest.raises(LayoutError, match="train.csv"):
        index_dataset("unifesp", tmp_path / "u")
    write_csv(tmp_path / "u" / "train.csv", "SOPInstanceUID,Target", ["1.2,3"])
    with pytest.raises(FileNotFoundError, match=r"no \.dcm files"):
        index_dataset("unifesp", tmp_path / "u")


# ----------------------------------------------------------------------------------- KneeOA


def test_kneeoa_grades_and_groups_both_knees_of_a_subject(tmp_path):
    root = tmp_path / "kneeKL224"
    for rel in ["train/0/9003175L.png", "train/2/9003175R.png", "val/3/9012867L.png"]:
        png(root / rel)
    png(root / "test/4/odd_name.png")
    df = index_dataset("kneeoa", root)
    assert set(df["region"]) == {"knee"} and set(df["view"]) == {"PA"}
    assert df.groupby("patient_id").size().to_dict() == {
        "kneeoa-9003175": 2,
        "kneeoa-9012867": 1,
        "kneeoa-odd_name": 1,
    }
    assert sorted(df["original_label"]) == ["KL0", "KL2", "KL3", "KL4"]
    assert set(df["original_split"]) == {"train", "val", "test"}
    with pytest.raises(LayoutError, match="train, val, test"):
        index_dataset("kneeoa", tmp_path)


# ------------------------------------------------------------------ RSNA bone age, DDH, Graz


def test_rsna_boneage_nested_kaggle_folder_and_missing_ids(tmp_path):
    root = tmp_path / "rsna"
    write_csv(
        root / "boneage-training-dataset.csv", "id,boneage,male", ["1377,180,False", "1378,12,True",
                                                                   "1379,94,False"]
    )  # fmt: skip
    images = root / "boneage-training-dataset" / "boneage-training-dataset"
    png(images / "1377.png")
    png(images / "1378.png")
    df = index_dataset("rsna_boneage", root)
    assert df["patient_id"].tolist() == ["rsna_boneage-1377", "rsna_boneage-1378"]
    assert set(df["region"]) == {"hand"} and set(df["age_group"]) == {"pediatric"}
    assert df["boneage_months"].tolist() == ["180", "12"]
    assert n_excluded(df, "missing") == 1
    with pytest.raises(LayoutError, match="boneage-training-dataset.csv"):
        index_dataset("rsna_boneage", tmp_path / "rsna" / "boneage-training-dataset")


def test_ddh_class_folders_all_pelvis(tmp_path):
    root = tmp_path / "ddh"
    png(root / "DDH" / "331_DDH_10.png")
    png(root / "Normal" / "n1.jpg")
    df = index_dataset("ddh", root, source="ddh_jordan")
    assert set(df["region"]) == {"pelvis"} and set(df["view"]) == {"AP"}
    assert sorted(df["finding"]) == ["ddh", "normal"]
    assert set(df["patient_id"]) == {"ddh_jordan-331_DDH_10", "ddh_jordan-n1"}
    (tmp_path / "none").mkdir()
    with pytest.raises(LayoutError, match="no images"):
        index_dataset("ddh", tmp_path / "none")


def test_grazpedwri_patient_ids_and_projection(tmp_path):
    root = tmp_path / "graz"
    header = "filestem,patient_id,gender,age,laterality,projection,fracture_visible"
    rows = [
        "0001_1297860395_01_WRI-L1_M014,1,M,14.2,L,1,1",
        "0001_1297860395_02_WRI-L2_M014,1,M,14.2,L,2,",
        "0002_0354485735_01_WRI-R1_F012,2,F,12.1,R,1,",
        "0003_0000000000_01_WRI-R1_F010,3,F,10.0,R,1,",  # listed, no PNG
    ]
    write_csv(root / "dataset.csv", header, rows)
    for r in rows[:3]:
        png(root / "images_part1" / f"{r.split(',')[0]}.png")
    df = index_dataset("grazpedwri", root)
    assert df.groupby("patient_id").size().to_dict() == {"grazpedwri-1": 2, "grazpedwri-2": 1}
    assert df["view"].tolist() == ["AP", "lateral", "AP"]
    assert df["finding"].tolist() == ["fracture", "", ""]
    assert set(df["region"]) == {"wrist"}
    assert n_excluded(df, "no 0003") == 1


# ---------------------------------------------------------------------------------- MedNIST


def test_mednist_keeps_hand_and_cxr_and_rejects_ct_mr(tmp_path, caplog):
    root = tmp_path / "MedNIST"
    for cls in ("Hand", "CXR", "HeadCT", "BreastMRI"):
        png(root / cls / "000000.jpeg")
        png(root / cls / "000001.jpeg")
    with caplog.at_level(logging.INFO):
        df = index_dataset("mednist", root)
    assert df["region"].value_counts().to_dict() == {"hand": 2, "chest": 2}
    assert set(df["original_label"]) == {"Hand", "CXR"}
    assert df["patient_id"].nunique() == 4  # class + stem: Hand/000000 is not CXR/000000
    assert "HeadCT" in caplog.text and "not radiographs" in caplog.text
    with pytest.raises(ValueError, match="CT/MR slices, not radiographs"):
        index_dataset("mednist", root, classes=["Hand", "HeadCT"])
    with pytest.raises(LayoutError, match="AbdomenCT"):
        index_dataset("mednist", tmp_path)


# ---------------------------------------------------------------------------------- generic


def test_generic_folder_tree_with_label_map(tmp_path):
    root = tmp_path / "xr"
    png(root / "Knie" / "a.png")
    png(root / "hip" / "sub" / "b.png")
    png(root / "scout" / "c.png")
    png(root / "loose.png")
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Knie: knee\nscout: null\n")
    df = index_dataset("generic", root, label_map=str(label_map))
    assert dict(zip(df["original_label"], df["region"], strict=True)) == {
        "Knie": "knee",
        "hip": "pelvis",
    }
    assert set(df["source"]) == {"xr"} and set(df["patient_id"]) == {"xr-a", "xr-b"}
    assert n_excluded(df, "null") == 1 and n_excluded(df, "no label folder") == 1
    with pytest.raises(ValueError, match=r"\['Knie', 'scout'\].*label map"):
        index_dataset("generic", root)


def test_generic_csv_with_patient_column_and_missing_rows(tmp_path):
    root = tmp_path / "site"
    png(root / "img" / "1.png")
    png(root / "img" / "2.png")
    csv = write_csv(
        tmp_path / "labels.csv",
        "path,label,patient_id,view",
        ["img/1.png,Shoulder,p9,AP", "img/2.png,clavicle,p9,AP", "img/3.png,elbow,p8,"],
    )
    df = index_dataset(
        "generic", root, csv=str(csv), label_map={"clavicle": "clavicle"}, source="site"
    )
    assert df["region"].tolist() == ["shoulder", "clavicle"]  # a user-defined region
    assert set(df["patient_id"]) == {"site-p9"} and set(df["view"]) == {"AP"}
    assert n_excluded(df, "missing") == 1
    with pytest.raises(ValueError, match="does not take"):
        index_dataset("generic", root, multilabel=True)


# ------------------------------------------------------------------------------------ DICOM


def test_dicom_index_from_body_part_then_descriptions(tmp_path, caplog):
    root = tmp_path / "pacs"
    (root / "c").mkdir(parents=True)
    make_dicom(root / "a.dcm", PIXELS, BodyPartExamined="KNEE", PatientID="A")
    make_dicom(root / "b.dcm", PIXELS, BodyPartExamined="EXTREMITY", StudyDescription="XR HIP 2V")
    make_dicom(root / "c" / "noext", PIXELS, suffix="", SeriesDescription="genou face")
    make_dicom(root / "d.dcm", PIXELS, StudyDescription="HIP AND KNEE", PatientID="D")
    make_dicom(root / "e.dcm", PIXELS, Modality="CT", BodyPartExamined="CHEST")
    make_dicom(root / "f.dcm", PIXELS, StudyDescription="XR FOREARM", PatientID="")
    with caplog.at_level(logging.WARNING):
        df = index_dataset("dicom", root, keywords={"genou": "knee"})
    by_name = {Path(p).name: r for p, r in zip(df["path"], df["region"], strict=True)}
    assert by_name == {"a.dcm": "knee", "b.dcm": "pelvis", "noext": "knee", "f.dcm": "forearm"}
    assert set(df["label_source"]) == {"dicom_metadata"}
    assert df.loc[df["region"] == "pelvis", "evidence"].item() == "StudyDescription~XR HIP 2V"
    assert df["patient_id"].iloc[0] == "dicom-A"
    assert df.loc[df["original_label"] == "XR FOREARM", "patient_id"].item().startswith("dicom-1.")
    assert n_excluded(df, "modality CT") == 1 and n_excluded(df, "no region") == 1
    assert "HIP AND KNEE" in caplog.text


# ------------------------------------------------------------------- manifests: merge, stats


def frame(source: str, regions: dict[str, int], patients_per_region: int = 0) -> pd.DataFrame:
    rows = []
    for region, n in regions.items():
        for i in range(n):
            pid = f"{region}{i // 2}" if patients_per_region else f"{region}{i}"
            rows.append(
                {
                    "path": f"/x/{source}/{region}/{i}.png",
                    "region": region,
                    "source": source,
                    "patient_id": f"{source}-{pid}",
                    "view": "",
                    "original_label": region,
                    "label_source": "dataset",
                }
            )
    return pd.DataFrame(rows)


def test_merge_balances_by_whole_patients_with_a_seed():
    a = frame("a", {"knee": 40, "wrist": 10}, patients_per_region=2)
    b = frame("b", {"elbow": 12})
    merged = merge_manifests([a, b])
    assert len(merged) == 62
    bal = merge_manifests([a, b], balance=True, seed=3)
    counts = bal["region"].value_counts()
    assert counts.max() <= 10 and counts["wrist"] == 10
    # a patient is kept whole or not at all
    full = a.groupby("patient_id").size()
    kept = bal[bal["source"] == "a"].groupby("patient_id").size()
    assert (kept == full[kept.index]).all()
    again = merge_manifests([a, b], balance=True, seed=3)
    assert again["path"].tolist() == bal["path"].tolist()
    other = balance_patients(merged, per_region=6, seed=4)
    assert other["region"].value_counts().max() <= 6
    assert other["path"].tolist() != balance_patients(merged, per_region=6, seed=5)["path"].tolist()


def test_merge_single_with_multilabel_and_duplicate_paths(tmp_path):
    single = frame("mura", {"wrist": 2, "elbow": 1})
    multi = frame("unifesp", {"chest": 2}).drop(columns="region")
    multi["chest"], multi["abdomen"] = [1, 1], [1, 0]
    merged = merge_manifests([single, multi, single.iloc[:1]])
    assert "region" not in merged and len(merged) == 5
    assert merged.loc[merged["source"] == "mura", "wrist"].sum() == 2
    assert merged.loc[merged["source"] == "mura", "chest"].sum() == 0
    assert stats_frame(merged).loc["chest", "unifesp"] == 2


def test_manifest_validation_names_the_problem(tmp_path):
    bad = frame("a", {"knee": 2})
    with pytest.raises(ValueError, match="missing columns"):
        write_manifest(bad.drop(columns="patient_id"), tmp_path / "m.csv")
    bad.loc[0, "region"] = "Knee Joint"
    with pytest.raises(ValueError, match="not region names"):
        write_manifest(bad, tmp_path / "m.csv")
    dup = frame("a", {"knee": 1})
    with pytest.raises(ValueError, match="listed twice"):
        write_manifest(pd.concat([dup, dup]), tmp_path / "m.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_original_label_and_label_source_are_optional(tmp_path, capsys):
    """A manifest made elsewhere (the shared radiographs' manifest.csv) has neither column: it
    reads, counts and merges with an adapter's manifest (label_source '' = not stated)."""
    bare = frame("a", {"knee": 2, "hand": 1}).drop(columns=["original_label", "label_source"])
    path = tmp_path / "bare.csv"
    bare.to_csv(path, index=False)
    df = read_manifest(path)
    assert "label_source" not in df and stats_frame(df).loc["knee", "a"] == 2
    assert main(["stats", str(path)]) == 0
    assert "total" in capsys.readouterr().out
    merged = merge_manifests([df, frame("b", {"elbow": 1})])
    assert merged["label_source"].tolist() == ["", "", "", "dataset"]
    write_manifest(merged, tmp_path / "merged.csv")
    wrong = frame("a", {"knee": 1})
    wrong["label_source"] = "guess"
    with pytest.raises(ValueError, match="label_source"):
        write_manifest(wrong, tmp_path / "wrong.csv")
    with pytest.raises(ValueError, match=r"missing columns \['source'\]"):
        write_manifest(bare.drop(columns="source"), tmp_path / "m.csv")


@needs_shared
@pytest.mark.shared_data
def test_cli_stats_on_the_shared_manifest(capsys):
    assert main(["stats", str(RADIOGRAPHS / "manifest.csv")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "pelvis" in out


def test_same_raw_patient_id_in_two_sources_never_collides(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    png(a / "knee" / "p1.png")
    png(b / "elbow" / "p1.png")
    merged = merge_manifests([index_dataset("generic", a), index_dataset("generic", b)])
    assert merged["patient_id"].tolist() == ["a-p1", "b-p1"]


# ---------------------------------------------------------------------------------------- CLI


def test_cli_index_merge_stats(tmp_path, capsys):
    knee = tmp_path / "kneeKL224"
    png(knee / "train" / "1" / "9000001L.png")
    png(knee / "val" / "2" / "9000002R.png")
    mura = make_mura(tmp_path)
    k_csv, m_csv, all_csv = (str(tmp_path / n) for n in ("k.csv", "m.csv", "all.csv"))
    assert main(["index", "--dataset", "kneeoa", "--root", str(knee), "--out", k_csv]) == 0
    assert main(["-q", "index", "--dataset", "mura", "--root", str(mura), "--out", m_csv]) == 0
    out = capsys.readouterr().out
    assert "kneeoa" in out and "excluded: 1" in out
    assert main(["merge", k_csv, m_csv, "--out", all_csv, "--per-region", "1", "--seed", "1"]) == 0
    merged = read_manifest(all_csv)
    assert set(merged["source"]) == {"kneeoa", "mura"}
    assert main(["stats", str(all_csv)]) == 0
    assert "total" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["index", "--dataset", "fracatlas", "--root", str(knee), "--out", "x.csv"])
    assert exit_info.value.code == 2
    assert "dataset.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "--dataset", "kneeoa", "--root", str(knee), "--out", k_csv, "--multilabel"])
    assert "does not take ['multilabel']" in capsys.readouterr().err


def test_cli_as_a_subprocess(tmp_path):
    root = tmp_path / "MedNIST"
    png(root / "Hand" / "0.jpeg")
    png(root / "AbdomenCT" / "0.jpeg")
    out = tmp_path / "mednist.csv"
    cmd = [sys.executable, "-m", "regionnet.datasets.cli", "index", "--dataset", "mednist"]
    proc = subprocess.run(
        [*cmd, "--root", str(root), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "AbdomenCT" in proc.stderr and read_manifest(out)["region"].tolist() == ["hand"]
    proc = subprocess.run([*cmd, "--root", str(tmp_path), "--out", str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "none of Hand, CXR" in proc.stderr


def test_every_adapter_documents_its_layout():
    undocumented = [
        name
        for name, adapter in ADAPTERS.items()
        if "Layout" not in (sys.modules[adapter.__module__].__doc__ or "")
    ]
    assert undocumented == []


def test_preset_reads_the_merged_manifest(tmp_path):
    cfg = compose_config(
        "train", ["data=mura_knee_pelvis", f"paths.output_dir={tmp_path}", "paths.data_dir=/d"]
    )
    assert cfg.data.source == "csv"
    assert cfg.data.csv == "/d/manifests/mura_knee_pelvis.csv"


# ----------------------------------------------------------- real radiographs in ../shared/data


@pytest.fixture(scope="module")
def real_manifests(tmp_path_factory) -> dict[str, Path]:
    """Index the shared knees (as the publisher's tree) and the fracture films (generic)."""
    if not (RADIOGRAPHS / "manifest.csv").is_file():
        pytest.skip(f"real radiographs not found at {SHARED}")
    tmp = tmp_path_factory.mktemp("real")
    shared = pd.read_csv(RADIOGRAPHS / "manifest.csv", dtype=str, keep_default_na=False)
    knees = shared[shared["source"] == "kneeoa_rohan145"]
    tree = tmp / "kneeKL224"
    for _, r in knees.iterrows():
        # shared names are <split>__<grade>__<OAI id><side>.png; rebuild <split>/<grade>/<name>
        name = Path(r["path"]).name.split("__")[-1]
        link = tree / r["original_split"] / r["finding"].removeprefix("KL") / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(RADIOGRAPHS / r["path"])
    out = {"kneeoa": tmp / "kneeoa.csv", "generic": tmp / "fractures.csv"}
    films = RADIOGRAPHS / "bonefracture_veda_osteoai"
    for name, root in (("kneeoa", tree), ("generic", films)):
        assert (
            main(["-q", "index", "--dataset", name, "--root", str(root), "--out", str(out[name])])
            == 0
        )
    out["shared"] = shared
    return out


@needs_shared
@pytest.mark.shared_data
def test_kneeoa_on_real_knees_matches_the_shared_patients(real_manifests):
    df = read_manifest(real_manifests["kneeoa"])
    shared = real_manifests["shared"]
    knees = shared[shared["source"] == "kneeoa_rohan145"]
    assert len(df) == len(knees) and set(df["region"]) == {"knee"}
    # both knees of an OAI subject share one patient id, as in the shared manifest
    assert df["patient_id"].nunique() == knees["patient_id"].nunique()
    assert (
        df["original_label"].value_counts().to_dict() == knees["finding"].value_counts().to_dict()
    )


@needs_shared
@pytest.mark.shared_data
def test_generic_on_real_fracture_films_and_csv(real_manifests, tmp_path):
    df = read_manifest(real_manifests["generic"])
    shared = real_manifests["shared"]
    films = shared[shared["source"] == "bonefracture_veda_osteoai"]
    assert df["region"].value_counts().to_dict() == films["region"].value_counts().to_dict()
    # the shared manifest itself as a generic CSV: its region/patient_id/view columns
    by_csv = index_dataset("generic", RADIOGRAPHS, csv=RADIOGRAPHS / "manifest.csv")
    assert len(by_csv) == len(shared)
    assert by_csv["patient_id"].nunique() == shared["patient_id"].nunique()
    assert (by_csv["region"].to_numpy() == shared["region"].to_numpy()).all()


@needs_shared
@pytest.mark.shared_data
@pytest.mark.slow
def test_training_on_a_merged_two_source_manifest(real_manifests, tmp_path):
    from regionnet.train import train

    merged = tmp_path / "merged.csv"
    k, g = str(real_manifests["kneeoa"]), str(real_manifests["generic"])
    assert main(["-q", "merge", k, g, "--out", str(merged), "--per-region", "8"]) == 0
    manifest = read_manifest(merged)
    assert set(manifest["source"]) == {"kneeoa", "bonefracture_veda_osteoai"}
    assert 30 <= len(manifest) <= 80
    cfg = compose_config(
        "train",
        [
            "data=csv",
            f"data.csv={merged}",
            "data.regions=[shoulder,elbow,knee]",
            f"paths.output_dir={tmp_path / 'run'}",
            "logger=csv",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "data.image_size=32",
            "data.num_workers=0",
            "data.batch_size=16",
            "model.pretrained=false",
        ],
    )
    metrics = train(cfg)
    assert "test/loss" in metrics and np.isfinite(metrics["test/loss"])
    split = pd.read_csv(tmp_path / "run" / "split.csv", dtype=str, keep_default_na=False)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()  # no patient leak
    assert set(split["source"]) == {"kneeoa", "bonefracture_veda_osteoai"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    # evaluation reports metrics per source, since source and region are confounded here
    from regionnet.evaluate import evaluate

    ecfg = compose_config(
        "eval",
        [
            f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}",
            f"paths.output_dir={tmp_path / 'eval'}",
            "split=all",
            "bootstrap.resamples=50",
            "num_workers=0",
        ],
    )
    result = evaluate(ecfg)
    for source in ("kneeoa", "bonefracture_veda_osteoai"):
        assert result[f"all/source/{source}/images"] > 0
    assert "all/source/bonefracture_veda_osteoai/auroc/shoulder" in result
