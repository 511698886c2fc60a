"""One folder walk and one DICOM header parser (issue 13).

Every folder input (training `data=folder`, `regionnet-predict input=DIR`, pretraining
`unlabeled=folder`, `regionnet-data index`) lists files with
`regionnet.data.files.list_radiographs`, and every DICOM header is read into a region by
`regionnet.dicom_tags.header_evidence`; these tests check that the callers agree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_factory import make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.dataset import RadiographDataset
from regionnet.data.files import is_radiograph_file, list_radiographs
from regionnet.data.sources import folder_records
from regionnet.datasets import index_dataset
from regionnet.datasets.manifest import find_images
from regionnet.dicom_tags import audit, header_evidence, header_region
from regionnet.io import RadiographReadError, read_radiograph
from regionnet.predict import collect_inputs, predict
from regionnet.regions import REGIONS, UNKNOWN
from regionnet.ssl.data import UnlabeledDataModule, folder_images

PIXELS = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 80).astype(np.uint16)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 6), 128, np.uint8)).save(path)
    return path


def _dicom(path: Path, **tags) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_dicom(path, PIXELS, suffix="", **tags)  # a PACS export: no suffix


def _tree(tmp_path: Path) -> tuple[Path, set[Path]]:
    """A region-folder tree of PNGs and suffix-less PACS DICOMs, with files that every
    listing must skip; returns (root, the radiographs, resolved)."""
    root = tmp_path / "films"
    knee = root / "knee"
    (knee / "sub").mkdir(parents=True)
    keep = {
        _png(knee / "a.png"),
        _dicom(knee / "IM0001", BodyPartExamined="KNEE"),
        _dicom(knee / "sub" / "IM0002", SeriesDescription="XR KNEE"),
        make_dicom(knee / "b.dcm", PIXELS, BodyPartExamined="KNEE"),
        _png(root / "hip" / "c.png"),
    }
    # skipped: not a radiograph format, hidden files, files in hidden folders
    Image.fromarray(np.full((8, 6), 128, np.uint8)).save(knee / "d.gif")
    (knee / "notes.txt").write_text("not an image")
    (knee / "README").write_text("no suffix and no DICM magic")
    _dicom(knee / ".IM0003", BodyPartExamined="KNEE")
    _dicom(knee / ".cache" / "IM0004", BodyPartExamined="KNEE")
    _png(knee / ".cache" / "e.png")
    # symlinks: a linked file is listed; linked folders are not entered (loop, elsewhere)
    elsewhere = tmp_path / "elsewhere"
    keep.add(_png(elsewhere / "linked.png"))
    os.symlink(elsewhere / "linked.png", knee / "linked.png")
    _png(tmp_path / "other_archive" / "f.png")
    os.symlink(tmp_path / "other_archive", knee / "archive_link", target_is_directory=True)
    os.symlink(root, knee / "loop", target_is_directory=True)
    return root, {p.resolve() for p in keep}


def _resolved(paths) -> set[Path]:
    return {Path(p).resolve() for p in paths}


def test_every_folder_input_lists_the_same_radiographs(tmp_path, caplog):
    root, expected = _tree(tmp_path)
    dicoms = {p for p in expected if p.suffix in ("", ".dcm")}
    with caplog.at_level(logging.INFO, logger="regionnet.data.files"):
        listed = list_radiographs(root)
    assert _resolved(listed) == expected and listed == sorted(listed)
    assert "skipped 3 files that are not radiographs" in caplog.text  # gif, txt, README
    assert "2 symlinked folders (not followed)" in caplog.text

    records = folder_records(root, REGIONS)  # regionnet-train data=folder
    assert _resolved(records["path"]) == expected
    assert records.loc[records["folder"] == "hip", "region"].tolist() == ["pelvis"]
    assert _resolved(collect_inputs(root)[0]) == expected  # regionnet-predict input=DIR
    assert _resolved(folder_images(root)["path"]) == expected  # regionnet-pretrain
    assert _resolved(find_images(root)) == expected  # dataset adapters
    assert _resolved(find_images(root, (".png",))) == {p for p in expected if p.suffix == ".png"}
    indexed = index_dataset("dicom", root)  # regionnet-data index --dataset dicom
    assert _resolved(indexed["path"]) == dicoms
    assert set(indexed["region"]) == {"knee"}


def test_a_gif_is_refused_in_a_folder_and_in_a_csv(tmp_path):
    gif = tmp_path / "films" / "knee" / "x.gif"
    gif.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 6), 128, np.uint8)).save(gif)
    png = _png(tmp_path / "films" / "knee" / "y.png")
    assert not is_radiograph_file(gif) and is_radiograph_file(png)
    assert list_radiographs(tmp_path / "films") == [png]
    assert collect_inputs(tmp_path / "films")[0] == [str(png)]
    # listed in a CSV, the gif is an input; reading it fails with the supported formats ...
    pd.DataFrame({"path": ["films/knee/x.gif", "films/knee/y.png"]}).to_csv(tmp_path / "l.csv")
    paths, _ = collect_inputs(tmp_path / "l.csv")
    assert paths == [str(gif), str(png)]
    with pytest.raises(RadiographReadError, match=r"x\.gif: file type '\.gif' is not a radio"):
        read_radiograph(gif)
    # ... so prediction writes it an error row (the dataset's error is the row's status)
    dataset = RadiographDataset(pd.DataFrame({"path": paths}), REGIONS, lambda x: x)
    error = dataset[0]["error"]
    assert "'.gif' is not a radiograph format" in error and ".png, .jpg" in error
    assert "error" not in dataset[1]


def test_a_gif_listed_in_a_csv_gets_an_error_row(phantom_checkpoint, tmp_path):  # noqa: F811
    _png(tmp_path / "films" / "y.png")
    Image.fromarray(np.full((8, 6), 128, np.uint8)).save(tmp_path / "films" / "x.gif")
    pd.DataFrame({"path": ["films/x.gif", "films/y.png"]}).to_csv(tmp_path / "l.csv")
    overrides = ["accelerator=cpu", "num_workers=0", f"ckpt_path={phantom_checkpoint}"]
    for name in ("l.csv", "films"):
        out = tmp_path / f"{name}.preds.csv"
        cfg = compose_config("predict", [*overrides, f"input={tmp_path / name}", f"output={out}"])
        predict(cfg)
        rows = pd.read_csv(out, keep_default_na=False).set_index("path")["status"].to_dict()
        png, gif = str(tmp_path / "films" / "y.png"), str(tmp_path / "films" / "x.gif")
        assert rows[png] == "ok"
        if name == "films":  # a folder input lists radiographs only
            assert list(rows) == [png]
        else:  # a CSV's rows are all answered: the gif with the rule and the formats
            assert rows[gif].startswith("error: file type '.gif' is not a radiograph format")
            assert "Supported formats: .png, .jpg" in rows[gif]


def test_pretraining_on_a_folder_without_radiographs_names_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data.root=.*docs.* holds no radiographs.*data.csv="):
        folder_images(tmp_path / "docs")
    with pytest.raises(ValueError, match="holds no radiographs"):
        UnlabeledDataModule(root=str(tmp_path / "docs"), batch_size=2).setup()


def test_the_listed_folder_itself_may_be_a_link_or_hidden(tmp_path):
    real = tmp_path / ".archive"
    film = _dicom(real / "IM0001")
    os.symlink(real, tmp_path / "link", target_is_directory=True)
    assert list_radiographs(real) == [film]
    assert list_radiographs(tmp_path / "link") == [tmp_path / "link" / "IM0001"]
    with pytest.raises(NotADirectoryError):
        list_radiographs(film)


# ------------------------------------------------------------------- DICOM header -> region

DESCRIPTIONS = {"SCAPHOID SERIES": "wrist", "XR PATELLA 2 VIEWS": "knee", "TIB FIB AP": "leg"}
BODY_PARTS = {"SCAPHOID": "wrist", "PATELLA": "knee", "TIB FIB": "leg"}  # coded, not free text


@pytest.mark.parametrize(
    "tag, texts",
    [
        ("SeriesDescription", DESCRIPTIONS),
        ("StudyDescription", DESCRIPTIONS),
        ("BodyPartExamined", BODY_PARTS),
    ],
)
def test_one_header_parser_for_audit_and_index(tmp_path, tag, texts):
    root = tmp_path / "pacs"
    for i, text in enumerate(texts):
        _dicom(root / f"IM{i}", **{tag: text})
    indexed = index_dataset("dicom", root)
    by_text = dict(zip(indexed["original_label"], indexed["region"], strict=True))
    assert by_text == texts  # regionnet-data index --dataset dicom
    sep = "=" if tag == "BodyPartExamined" else "~"
    for i, (text, region) in enumerate(texts.items()):
        assert header_region({tag: text}) == region
        assert header_evidence({tag: text}) == (region, f"{tag}{sep}{text}", text)
        row = indexed[indexed["original_label"] == text].iloc[0]
        assert row["evidence"] == f"{tag}{sep}{text}"
        # the prediction audit (and so the study view) reads the same region; wrist and leg
        # are outside the five heads, so only `unknown` agrees with them
        found = audit(str(root / f"IM{i}"), UNKNOWN, REGIONS)
        assert found["header_region"] == region
        assert found["mismatch"] is (region in REGIONS)
    assert audit(str(root / "IM1"), "hand", REGIONS)["mismatch"] is True  # header says knee


def test_header_parser_keeps_both_old_behaviours():
    assert header_region({"BodyPartExamined": "HIP"}) == "pelvis"
    assert header_region({"BodyPartExamined": "EXTREMITY", "SeriesDescription": "Hand PA"}) == (
        "hand"
    )
    assert header_region({"BodyPartExamined": "OTHER", "StudyDescription": "XR KNEE"}) == "knee"
    assert header_region({"StudyDescription": "HIP AND KNEE"}) is None  # ambiguous
    assert header_region({"StudyDescription": "HIP AND KNEE", "ProtocolName": "L-SPINE"}) == (
        "spine"
    )
    assert header_region({"StudyDescription": "CHEST AND RIBS"}) == "chest"  # ribs: ignored
    assert header_region({"SeriesDescription": "genou face"}, {"genou": "knee"}) == "knee"
