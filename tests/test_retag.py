"""Re-tagging safeguards (issue 16 part 4): which headers `dicom.write_body_part` may change
(`dicom.write_body_part_mode`), and the UIDs of the copies (regionnet.dicom_tags).

A hospital's BodyPartExamined is often right: `fill_empty` (the default) writes only empty or
generic tags, `mismatch_margin` also overwrites a disagreeing header when the prediction beats
the header region's head by the margin, `all` writes every prediction. Copies are new
instances that reference their source, so they cannot collide with it in a PACS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import make_dicom, strip_header
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from pydicom.uid import UID

from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.dicom_tags import (
    ALL,
    FILL_EMPTY,
    MISMATCH_MARGIN,
    body_part_decision,
    body_part_mode,
    derived_uid,
    generic_body_part,
    write_body_part,
)
from regionnet.predict import predict

PROBS = {"shoulder": 0.10, "elbow": 0.05, "hand": 0.90, "pelvis": 0.01, "knee": 0.02}


def u16(region: str, seed: int, size: int = 64) -> np.ndarray:
    return (render_phantom(region, seed, size) * 4095).round().astype(np.uint16)


# ----------------------------------------------------------------------- the decision
@pytest.mark.parametrize(
    "value", ["", "  ", "OTHER", "other", "Extremity", "LOW_EXM", "UP_EXM", "WHOLEBODY",
              "whole body", "XR", "UNKNOWN", "N/A"],
)  # fmt: skip
def test_generic_body_parts(value):
    assert generic_body_part(value)


@pytest.mark.parametrize("value", ["SHOULDER", "HAND", "CHEST", "ABDOMEN", "HIP", "PHANTOM"])
def test_specific_body_parts_are_not_generic(value):
    assert not generic_body_part(value)


def test_mode_parsing():
    assert body_part_mode(None) == (FILL_EMPTY, 0.5)
    assert body_part_mode("all") == (ALL, 0.5)
    assert body_part_mode("mismatch_margin", 0.2) == (MISMATCH_MARGIN, 0.2)
    assert body_part_mode("mismatch_margin:0.3") == (MISMATCH_MARGIN, 0.3)
    assert body_part_mode("mismatch_margin=0.3", 0.9) == (MISMATCH_MARGIN, 0.3)
    bad_modes = [
        ("always", "fill_empty"),
        ("fill_empty:0.2", "mismatch_margin"),
        ("mismatch_margin:x", "not a number"),
        ("mismatch_margin:1.5", r"\[0, 1\]"),
    ]
    for bad, words in bad_modes:
        with pytest.raises(ValueError, match=words):
            body_part_mode(bad)


def decide(mode: str, margin: float = 0.5, **header: str) -> tuple[bool, str]:
    return body_part_decision(header, "hand", PROBS, mode, margin)


def test_fill_empty_writes_only_empty_or_generic_tags():
    assert decide(FILL_EMPTY, BodyPartExamined="") == (True, "written: BodyPartExamined empty")
    assert decide(FILL_EMPTY)[0]  # the tag missing altogether
    assert decide(FILL_EMPTY, BodyPartExamined="EXTREMITY")[0]
    assert decide(FILL_EMPTY, BodyPartExamined="OTHER", SeriesDescription="Hand PA")[0]
    write, why = decide(FILL_EMPTY, BodyPartExamined="SHOULDER")  # the SHOULDER -> HAND case
    assert not write and why.startswith("kept: BodyPartExamined=SHOULDER names shoulder")
    write, why = decide(FILL_EMPTY, BodyPartExamined="HAND")
    assert (write, why) == (False, "kept: BodyPartExamined=HAND agrees")
    # an empty tag whose description names another region: the header is not empty
    write, why = decide(FILL_EMPTY, BodyPartExamined="", StudyDescription="XR KNEE 2 VIEWS")
    assert not write and "StudyDescription~XR KNEE 2 VIEWS names knee" in why
    write, why = decide(FILL_EMPTY, BodyPartExamined="PHANTOM")  # not generic, not a region
    assert not write and "names no region" in why


def test_mismatch_margin_overwrites_when_the_prediction_beats_the_header():
    write, why = decide(MISMATCH_MARGIN, 0.5, BodyPartExamined="SHOULDER")
    assert write and why.startswith("written:") and "hand 0.900 - shoulder 0.100" in why
    write, why = decide(MISMATCH_MARGIN, 0.85, BodyPartExamined="SHOULDER")  # 0.8 < 0.85
    assert not write and "< margin 0.85" in why
    assert decide(MISMATCH_MARGIN, 0.8, BodyPartExamined="SHOULDER")[0]  # >= margin
    # a description naming another region counts as the header's region
    assert decide(MISMATCH_MARGIN, 0.5, StudyDescription="XR KNEE")[0]
    # a header region the model has no head for is kept: nothing to compare
    write, why = decide(MISMATCH_MARGIN, 0.0, BodyPartExamined="CHEST")
    assert not write and "no head" in why
    assert decide(MISMATCH_MARGIN, 0.5, BodyPartExamined="")[0]  # still fills empty tags
    assert not decide(MISMATCH_MARGIN, 0.0, BodyPartExamined="HAND")[0]  # agrees: kept


def test_all_writes_every_prediction():
    for body in ("", "SHOULDER", "CHEST", "HAND", "PHANTOM"):
        write, why = decide(ALL, BodyPartExamined=body)
        assert write and why.startswith("written:") and "mode all" in why


# ----------------------------------------------------------------------- the copies
def test_copies_are_new_instances_that_reference_their_source(tmp_path):
    series = pydicom.uid.generate_uid()
    src = make_dicom(tmp_path / "a.dcm", u16("hand", 1), BodyPartExamined="SHOULDER",
                     SeriesInstanceUID=series)  # fmt: skip
    src2 = make_dicom(tmp_path / "b.dcm", u16("hand", 2), SeriesInstanceUID=series)
    before = src.read_bytes()
    source = pydicom.dcmread(src)
    copy = pydicom.dcmread(write_body_part(src, tmp_path / "out" / "a.dcm", "HAND"))
    assert src.read_bytes() == before
    assert copy.BodyPartExamined == "HAND"
    assert copy.SOPInstanceUID != source.SOPInstanceUID
    assert UID(copy.SOPInstanceUID).is_valid and len(copy.SOPInstanceUID) <= 64
    assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    (ref,) = copy.SourceImageSequence
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "was SHOULDER" in copy.DerivationDescription
    assert source.SOPInstanceUID in copy.DerivationDescription
    # the same study and (by default) series; pixels untouched
    assert (copy.StudyInstanceUID, copy.SeriesInstanceUID) == (source.StudyInstanceUID, series)
    np.testing.assert_array_equal(copy.pixel_array, source.pixel_array)
    # the same copy made again gets the same UID (a PACS replaces it); another term another
    again = pydicom.dcmread(write_body_part(src, tmp_path / "again.dcm", "HAND"))
    assert again.SOPInstanceUID == copy.SOPInstanceUID
    other = pydicom.dcmread(write_body_part(src, tmp_path / "other.dcm", "ELBOW"))
    assert other.SOPInstanceUID not in (copy.SOPInstanceUID, source.SOPInstanceUID)
    # new_series_uid: one new series for the copies of one source series
    a = pydicom.dcmread(write_body_part(src, tmp_path / "s" / "a.dcm", "HAND",
                                        new_series_uid=True))  # fmt: skip
    b = pydicom.dcmread(write_body_part(src2, tmp_path / "s" / "b.dcm", "KNEE",
                                        new_series_uid=True))  # fmt: skip
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != series
    assert UID(a.SeriesInstanceUID).is_valid
    assert a.StudyInstanceUID == source.StudyInstanceUID


def test_a_source_reference_already_there_is_kept(tmp_path):
    earlier = pydicom.Dataset()
    earlier.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    earlier.ReferencedSOPInstanceUID = "1.2.3.4"
    src = make_dicom(tmp_path / "d.dcm", u16("knee", 3), SourceImageSequence=[earlier])
    copy = pydicom.dcmread(write_body_part(src, tmp_path / "o.dcm", "KNEE", description="x"))
    refs = [r.ReferencedSOPInstanceUID for r in copy.SourceImageSequence]
    assert refs == ["1.2.3.4", pydicom.dcmread(src).SOPInstanceUID]
    assert copy.DerivationDescription.endswith(" x")


def test_a_source_without_preamble_is_copied_with_a_new_uid(tmp_path):
    src = strip_header(make_dicom(tmp_path / "full.dcm", u16("hand", 4)), tmp_path / "bare")
    copy = pydicom.dcmread(write_body_part(src, tmp_path / "o.dcm", "HAND"))
    source = pydicom.dcmread(src, force=True)
    assert copy.BodyPartExamined == "HAND" and copy.SOPInstanceUID != source.SOPInstanceUID
    assert copy.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_derived_uids_are_valid_and_stable():
    uid = derived_uid("1.2.840.113619.2.55.3.604688119", "BodyPartExamined", "HAND")
    assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64
    assert uid == derived_uid("1.2.840.113619.2.55.3.604688119", "BodyPartExamined", "HAND")
    assert uid != derived_uid("1.2.840.113619.2.55.3.604688119", "BodyPartExamined", "KNEE")


# ------------------------------------------------------------------- regionnet-predict
@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> Path:
    """Hand pixels under four headers."""
    root = tmp_path_factory.mktemp("retag_in")
    make_dicom(root / "empty.dcm", u16("hand", 11), BodyPartExamined="")
    make_dicom(root / "generic.dcm", u16("hand", 12), BodyPartExamined="EXTREMITY")
    make_dicom(root / "shoulder.dcm", u16("hand", 13), BodyPartExamined="SHOULDER")
    make_dicom(root / "chest.dcm", u16("hand", 14), BodyPartExamined="CHEST")
    return root


# mode -> the files whose copy is written (every head passes threshold 0: no unknown)
EXPECTED = {
    "fill_empty": {"empty.dcm", "generic.dcm"},
    "mismatch_margin:0.0": {"empty.dcm", "generic.dcm", "shoulder.dcm"},
    "mismatch_margin:1.0": {"empty.dcm", "generic.dcm"},
    "all": {"empty.dcm", "generic.dcm", "shoulder.dcm", "chest.dcm"},
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_predict_writes_the_copies_its_mode_allows(phantom_checkpoint, headers, tmp_path, mode):  # noqa: F811
    out = tmp_path / "tagged"
    overrides = [f"ckpt_path={phantom_checkpoint}", f"input={headers}",
                 f"output={tmp_path / 'p.csv'}", "accelerator=cpu", "num_workers=0",
                 "threshold_override=0.0", f"dicom.write_body_part={out}",
                 f"dicom.write_body_part_mode={mode}", "dicom.new_series_uid=true"]  # fmt: skip
    summary = predict(compose_config("predict", overrides))
    df = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    df["name"] = df["path"].map(lambda p: Path(p).name)
    status = dict(zip(df["name"], df["body_part_status"]))
    written = {n for n, s in status.items() if s.startswith("written:")}
    shoulder_region = df.set_index("name").loc["shoulder.dcm", "region"]
    expected = set(EXPECTED[mode])
    if shoulder_region == "shoulder":  # the phantom model agrees with the header: kept
        expected.discard("shoulder.dcm")
    assert written == expected, status
    assert {p.name for p in out.iterdir()} == written
    assert all(s.startswith("kept:") for n, s in status.items() if n not in written)
    assert summary["body_part_written"] == len(written)
    assert summary["body_part_kept"] == 4 - len(written)
    for name in written:
        copy, source = pydicom.dcmread(out / name), pydicom.dcmread(headers / name)
        assert copy.SOPInstanceUID != source.SOPInstanceUID
        assert copy.SeriesInstanceUID != source.SeriesInstanceUID  # dicom.new_series_uid=true
        assert copy.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert summary["model_id"] in copy.DerivationDescription
    if mode == "fill_empty":
        assert "names shoulder" in status["shoulder.dcm"]
    if mode.startswith("mismatch_margin"):
        assert "no head" in status["chest.dcm"]
