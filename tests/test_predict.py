"""Batch prediction (regionnet.predict, regionnet.writer, regionnet.dicom_tags).

The phantom model is trained once per session (tests/phantom_model.py). One module-scoped
run predicts a folder that mixes good PNGs, a 16-bit PNG, DICOMs (MONOCHROME1, a PACS export
without suffix, one whose header says KNEE over hand pixels), out-of-set chest phantoms and
unreadable files; most tests read its output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from dicom_factory import make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image

from regionnet.api import load_checkpoint
from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.decision import decide, resolve_thresholds
from regionnet.dicom_tags import header_region, mirrored_path, mismatch, text_region
from regionnet.predict import collect_inputs, model_id, predict
from regionnet.regions import REGIONS, UNKNOWN, region_info
from regionnet.writer import OtherModelError, prediction_columns, read_done

SIZE = 96  # pixels of the test files; the model resizes them to its 32 px
CHESTS = tuple(f"chest_{i}.png" for i in range(5))  # out-of-set anatomy
ERRORS = {  # file -> words its status must contain
    "corrupt.png": "not an image",
    "notes.png": "not an image",
    "empty.png": "empty",
    "no_pixels.dcm": "no pixel data",
}


def phantom_u8(region: str, seed: int) -> np.ndarray:
    return (render_phantom(region, seed, SIZE) * 255).round().astype(np.uint8)


def phantom_u16(region: str, seed: int) -> np.ndarray:
    return (render_phantom(region, seed, SIZE) * 4095).round().astype(np.uint16)


def write_mixed_folder(root: Path) -> dict[str, str]:
    """Radiographs and broken files under `root`; returns relative path -> expected status."""
    (root / "sub").mkdir(parents=True)
    expected = {}
    for name, region, seed in [("hand.png", "hand", 7101), ("knee.png", "knee", 7102)]:
        Image.fromarray(phantom_u8(region, seed)).save(root / name)
        expected[name] = "ok"
    Image.fromarray(phantom_u16("elbow", 7103)).save(root / "elbow16.png")  # 16-bit grey
    expected["elbow16.png"] = "ok"
    for i, name in enumerate(CHESTS):
        Image.fromarray(phantom_u8("chest", 7200 + i)).save(root / name)
        expected[name] = "ok"
    # MONOCHROME1 stores bone dark: the reader inverts it back
    inverted = (4095 - phantom_u16("shoulder", 7104)).astype(np.uint16)
    make_dicom(root / "sub" / "shoulder_m1.dcm", inverted, "MONOCHROME1", BodyPartExamined="")
    expected["sub/shoulder_m1.dcm"] = "ok"
    make_dicom(root / "sub" / "IM0001.dcm", phantom_u16("pelvis", 7105), suffix="")  # PACS
    expected["sub/IM0001"] = "ok"
    make_dicom(root / "hand_says_knee.dcm", phantom_u16("hand", 7106), BodyPartExamined="KNEE")
    expected["hand_says_knee.dcm"] = "ok"
    make_dicom(root / "no_pixels.dcm", None, BodyPartExamined="CHEST")
    good = (root / "hand.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "notes.png").write_text("not a radiograph\n")
    (root / "empty.png").write_bytes(b"")
    expected.update(dict.fromkeys(ERRORS, "error"))
    (root / "readme.txt").write_text("not an input: no image suffix, no DICOM magic\n")
    return expected


def predict_config(ckpt: Path, input_path: Path, output: Path, *overrides: str):
    return compose_config(
        "predict",
        [
            f"ckpt_path={ckpt}",
            f"input={input_path}",
            f"output={output}",
            "accelerator=cpu",
            "num_workers=0",
            "batch_size=4",
            *overrides,
        ],
    )


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".jsonl":
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("mixed")
    return root, write_mixed_folder(root)


@pytest.fixture(scope="module")
def mixed_run(phantom_checkpoint, mixed_folder, tmp_path_factory):  # noqa: F811
    """One audited run over the mixed folder that also writes corrected DICOM copies."""
    root, expected = mixed_folder
    out = tmp_path_factory.mktemp("mixed_out")
    before = {f: sha256(f) for f in root.rglob("*") if f.is_file()}
    cfg = predict_config(
        phantom_checkpoint,
        root,
        out / "preds.csv",
        "audit=true",
        f"dicom.write_body_part={out / 'fixed'}",
    )
    summary = predict(cfg)
    df = read_output(out / "preds.csv").set_index("path")
    return {"summary": summary, "df": df, "root": root, "expected": expected, "out": out,
            "before": before}  # fmt: skip


@pytest.fixture(scope="module")
def thresholds(phantom_checkpoint):  # noqa: F811
    model = load_checkpoint(phantom_checkpoint)
    return list(model.regions), model.thresholds.tolist()


def row(run, rel: str) -> pd.Series:
    return run["df"].loc[str(run["root"] / rel)]


# ------------------------------------------------------------------------ the mixed folder
def test_one_row_per_file_with_its_status(mixed_run):
    df, root, expected = mixed_run["df"], mixed_run["root"], mixed_run["expected"]
    columns = prediction_columns(REGIONS, audit=True, body_part=True)
    assert list(df.reset_index().columns) == columns
    assert columns[-2:] == ["body_part_status", "model_id"]  # added at the end
    assert set(df["model_id"]) == {mixed_run["summary"]["model_id"]}  # error rows too
    assert len(mixed_run["summary"]["model_id"]) == 12
    assert sorted(df.index) == sorted(str(root / rel) for rel in expected)  # no readme.txt
    for rel, status in expected.items():
        got = row(mixed_run, rel)["status"]
        assert got.split(":")[0] == status, (rel, got)
    for name, words in ERRORS.items():
        r = row(mixed_run, name)
        assert words in r["status"], r["status"]
        assert r["region"] == "" and r["p_hand"] == "" and r["snomed"] == ""
    s = mixed_run["summary"]
    assert (s["ok"], s["errors"]) == (len(expected) - len(ERRORS), len(ERRORS))
    assert sum(s["regions"].values()) == s["ok"] and s["unknown"] == s["regions"].get(UNKNOWN, 0)
    assert s["per_second"] > 0


def test_regions_and_codes_follow_the_saved_thresholds(mixed_run, thresholds):
    regions, saved = thresholds
    ok = mixed_run["df"][mixed_run["df"]["status"] == "ok"]
    for _, r in ok.iterrows():
        probs = [float(r[f"p_{h}"]) for h in regions]
        assert all(0.0 <= p <= 1.0 for p in probs)
        region, above = decide(probs, saved, regions)
        assert (r["region"], r["regions"]) == (region, ";".join(above))
        info = region_info(region)
        codes = (info.snomed, info.radlex, info.dicom) if info else ("", "", "")
        assert (r["snomed"], r["radlex"], r["dicom_body_part"]) == codes


def test_out_of_set_chest_phantoms_are_unknown(mixed_run, thresholds):
    regions, saved = thresholds
    chests = [row(mixed_run, name) for name in CHESTS]
    unknown = [r for r in chests if r["region"] == UNKNOWN]
    # A few phantoms are ambiguous (a collimated chest can look like a limb): the majority
    # must come out unknown, each with every probability below its head's threshold.
    assert len(unknown) > len(chests) / 2, [(r["region"], r["regions"]) for r in chests]
    for r in unknown:
        assert r["regions"] == "" and r["snomed"] == r["radlex"] == r["dicom_body_part"] == ""
        assert all(float(r[f"p_{h}"]) < t for h, t in zip(regions, saved))


def test_audit_flags_a_knee_header_over_hand_pixels(mixed_run):
    r = row(mixed_run, "hand_says_knee.dcm")
    assert r["header_region"] == "knee"
    assert r["region"] != "knee" and r["mismatch"] == "true"
    assert r["study_uid"] and r["series_uid"] and r["sop_uid"]
    # no BodyPartExamined and no descriptions: nothing to compare
    assert row(mixed_run, "sub/shoulder_m1.dcm")[["header_region", "mismatch"]].tolist() == ["", ""]
    # unreadable pixels still have a header; not comparable without a prediction
    no_pixels = row(mixed_run, "no_pixels.dcm")
    assert (no_pixels["header_region"], no_pixels["mismatch"]) == ("chest", "")
    assert no_pixels["sop_uid"]
    png = row(mixed_run, "hand.png")
    assert png[["header_region", "mismatch", "study_uid"]].tolist() == ["", "", ""]


def test_write_body_part_copies_dicoms_and_keeps_inputs(mixed_run):
    """fill_empty (the default): empty headers get the prediction, the KNEE header stays."""
    root, fixed = mixed_run["root"], mixed_run["out"] / "fixed"
    for f, digest in mixed_run["before"].items():
        assert sha256(f) == digest, f"input {f} was modified"
    for rel in ("sub/shoulder_m1.dcm", "sub/IM0001"):  # BodyPartExamined empty or missing
        r, copy = row(mixed_run, rel), fixed / rel
        if r["region"] == UNKNOWN:
            assert not copy.exists() and r["body_part_status"].startswith("skipped:")
            continue
        assert r["body_part_status"].startswith("written:"), r["body_part_status"]
        ds, source = pydicom.dcmread(copy), pydicom.dcmread(root / rel)
        assert ds.BodyPartExamined == region_info(r["region"]).dicom
        assert ds.SOPInstanceUID != source.SOPInstanceUID  # a new instance
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert ds.SeriesInstanceUID == source.SeriesInstanceUID  # new_series_uid=false
        assert ds.StudyInstanceUID == source.StudyInstanceUID
    knee = row(mixed_run, "hand_says_knee.dcm")
    if knee["region"] not in ("knee", UNKNOWN):
        assert knee["body_part_status"].startswith("kept: BodyPartExamined=KNEE names knee")
        assert not (fixed / "hand_says_knee.dcm").exists()
    assert row(mixed_run, "hand.png")["body_part_status"] == "skipped: not a DICOM file"
    assert row(mixed_run, "no_pixels.dcm")["body_part_status"] == ""  # an error row
    written = sorted(p.relative_to(fixed).as_posix() for p in fixed.rglob("*") if p.is_file())
    assert all(p.endswith(".dcm") or p.endswith("IM0001") for p in written)  # no PNG copies
    assert "no_pixels.dcm" not in written
    s, df = mixed_run["summary"], mixed_run["df"]
    assert s["body_part_written"] == len(written)
    for outcome in ("written", "kept", "skipped", "failed"):
        assert s[f"body_part_{outcome}"] == df["body_part_status"].str.startswith(outcome).sum()


# ---------------------------------------------------------------------------- other runs
def test_resume_after_an_interruption_predicts_each_path_once(
    phantom_checkpoint,  # noqa: F811
    mixed_folder,
    tmp_path,
):
    root, expected = mixed_folder
    rels = sorted(expected)
    half = tmp_path / "half.csv"
    pd.DataFrame({"path": [str(root / r) for r in rels[: len(rels) // 2]]}).to_csv(half)
    out = tmp_path / "preds.csv"
    predict(predict_config(phantom_checkpoint, half, out))
    first = read_output(out)
    assert len(first) == len(rels) // 2
    # an interruption in the middle of a line: that row is lost and predicted again
    text = out.read_text()
    out.write_text(text[: len(text) - 10])
    summary = predict(predict_config(phantom_checkpoint, root, out, "resume=true"))
    df = read_output(out)
    assert sorted(df["path"]) == sorted(str(root / r) for r in rels)  # each exactly once
    assert summary["resumed"] == len(rels) // 2 - 1
    assert summary["ok"] + summary["errors"] == len(rels) - summary["resumed"]
    pd.testing.assert_frame_equal(df.iloc[: len(first) - 1], first.iloc[:-1])
    # without resume the output is rewritten from scratch
    predict(predict_config(phantom_checkpoint, root / "hand.png", out))
    assert read_output(out)["path"].tolist() == [str(root / "hand.png")]


def test_jsonl_from_a_csv_with_relative_paths_and_a_threshold_override(
    phantom_checkpoint,  # noqa: F811
    mixed_folder,
    tmp_path,
):
    root, _ = mixed_folder
    listing = root.parent / f"{root.name}_list.csv"
    pd.DataFrame({"path": [f"{root.name}/hand.png", f"{root.name}/notes.png"]}).to_csv(listing)
    out = tmp_path / "preds.jsonl"
    predict(predict_config(phantom_checkpoint, listing, out, "threshold_override=0.0"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [prediction_columns(REGIONS)] * 2
    ok, bad = sorted(rows, key=lambda r: r["status"] != "ok")
    assert ok["path"] == str(root / "hand.png") and bad["path"] == str(root / "notes.png")
    assert ok["regions"] == ";".join(REGIONS)  # every head passes a threshold of 0
    assert ok["region"] == max(REGIONS, key=lambda r: ok[f"p_{r}"])
    assert bad["status"].startswith("error:") and bad["p_knee"] is None


def test_console_script_runs_with_workers_and_exits_0(
    phantom_checkpoint,  # noqa: F811
    mixed_folder,
    tmp_path,
):
    root, expected = mixed_folder
    exe = shutil.which("regionnet-predict")
    cmd = (
        [exe] if exe else [sys.executable, "-c", "from regionnet.cli import predict_main as m; m()"]
    )
    args = [
        f"ckpt_path={phantom_checkpoint}",
        f"input={root}",
        "output=preds.csv",  # relative: the working directory, not Hydra's run dir
        "num_workers=2",
        "accelerator=cpu",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(
        cmd + args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    df = read_output(tmp_path / "preds.csv")
    assert len(df) == len(expected)
    assert (df["status"] != "ok").sum() == len(ERRORS)
    assert "radiographs/s" in done.stdout


def test_cam_maps_for_readable_radiographs(phantom_checkpoint, tmp_path):  # noqa: F811
    from regionnet.cam import strip_height  # a broken module must fail here, not skip

    (tmp_path / "in").mkdir()
    Image.fromarray(phantom_u8("knee", 7301)).save(tmp_path / "in" / "knee.png")
    (tmp_path / "in" / "broken.png").write_text("no pixels here")
    out = tmp_path / "preds.csv"
    cfg = predict_config(phantom_checkpoint, tmp_path / "in", out, "cam=true",
                         f"cam_dir={tmp_path / 'cams'}")  # fmt: skip
    predict(cfg)
    region = read_output(out).set_index("path").loc[str(tmp_path / "in" / "knee.png"), "region"]
    cams = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert cams == [f"knee_{region}.png"]
    overlay = np.asarray(Image.open(tmp_path / "cams" / cams[0]))
    # the overlay keeps the radiograph's size; the label strip is added below it
    assert overlay.shape == (SIZE + strip_height(SIZE), SIZE, 3) and overlay.dtype == np.uint8


@pytest.mark.shared_data
def test_a_real_radiograph_is_read_and_decided(phantom_checkpoint, shared_data, tmp_path):  # noqa: F811
    """Phantom heads on a real chest film: only the plumbing is asserted, not the region."""
    chest = sorted((shared_data / "radiographs" / "actualmed_covid_cxr" / "chest").glob("*.png"))
    if not chest:
        pytest.skip("no actualmed_covid_cxr chest radiographs in the shared data")
    out = tmp_path / "preds.csv"
    predict(predict_config(phantom_checkpoint, chest[0], out))
    (r,) = read_output(out).to_dict("records")
    model = load_checkpoint(phantom_checkpoint)
    probs = [float(r[f"p_{h}"]) for h in model.regions]
    assert r["status"] == "ok"
    assert r["region"] == decide(probs, model.thresholds.tolist(), model.regions)[0]


# ----------------------------------------------------------------------------- the parts
def test_decide_takes_the_most_probable_passing_head():
    regions = ("hand", "knee", "elbow")
    assert decide([0.9, 0.2, 0.95], [0.5, 0.5, 0.99], regions) == ("hand", ["hand"])
    # hand is the most probable head but fails its threshold; knee passes
    assert decide([0.6, 0.55, 0.1], [0.7, 0.5, 0.5], regions) == ("knee", ["knee"])
    assert decide([0.1, 0.2, 0.3], [0.5] * 3, regions) == (UNKNOWN, [])
    assert decide([0.5, 0.8, 0.7], [0.5] * 3, regions) == ("knee", ["hand", "knee", "elbow"])


def test_threshold_overrides():
    saved, regions = [0.3, 0.6], ("hand", "knee")
    assert resolve_thresholds(saved, regions) == saved
    assert resolve_thresholds(saved, regions, 0.5) == [0.5, 0.5]
    assert resolve_thresholds(saved, regions, {"knee": 0.9}) == [0.3, 0.9]
    assert resolve_thresholds(saved, regions, [0.1, 0.2]) == [0.1, 0.2]
    for bad, words in [({"chest": 0.5}, "chest"), ([0.1], "2 heads"), (1.5, "[0, 1]")]:
        with pytest.raises(ValueError, match=words):
            resolve_thresholds(saved, regions, bad)


def test_header_region_from_body_part_or_descriptions():
    assert header_region({"BodyPartExamined": "HIP"}) == "pelvis"
    assert header_region({"BodyPartExamined": "", "StudyDescription": "XR KNEE 2 VIEWS"}) == "knee"
    assert header_region({"BodyPartExamined": "EXTREMITY", "SeriesDescription": "Hand PA"}) == (
        "hand"
    )
    assert text_region("L-SPINE AP/LAT") == "spine"
    assert text_region("FOOT AND ANKLE") is None  # two regions: ambiguous
    assert header_region({"ProtocolName": "DX 2 views"}) is None
    regions = ("hand", "knee")
    assert mismatch("hand", "knee", regions) is True
    assert mismatch("knee", "knee", regions) is False
    assert mismatch(UNKNOWN, "chest", regions) is False  # out-of-set header, out-of-set film
    assert mismatch("hand", "chest", regions) is True
    assert mismatch("hand", None, regions) is None


def test_inputs_missing_empty_or_bad_csv_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_inputs(tmp_path / "nowhere")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no radiographs"):
        collect_inputs(tmp_path / "docs")
    (tmp_path / "list.csv").write_text("file\na.png\n")
    with pytest.raises(ValueError, match="'path' column"):
        collect_inputs(tmp_path / "list.csv")


def test_write_body_part_into_the_input_folder_is_refused(phantom_checkpoint, mixed_folder):  # noqa: F811
    root, _ = mixed_folder
    cfg = predict_config(
        phantom_checkpoint, root, root.parent / "p.csv", f"dicom.write_body_part={root}"
    )
    with pytest.raises(ValueError, match="input folder"):
        predict(cfg)


def test_read_done_checks_columns_and_mirrored_paths_keep_layout(tmp_path):
    out = tmp_path / "p.csv"
    with out.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path", "p_hand"], ["/x/a.png", "0.5"]])
    with pytest.raises(ValueError, match="columns"):
        read_done(out, prediction_columns(("hand",)))
    assert read_done(out, ["path", "p_hand"]) == {"/x/a.png"}
    root = tmp_path / "in"
    assert mirrored_path(root / "a" / "b.dcm", root, tmp_path / "o") == tmp_path / "o/a/b.dcm"
    outside = mirrored_path("/elsewhere/c.dcm", root, tmp_path / "o")
    assert outside == tmp_path / "o" / "elsewhere" / "c.dcm"


# ------------------------------------------------- class activation maps batch by batch
class StopAfter(L.Callback):
    """Raises after the writer has finished batch `n` (an interruption mid-run)."""

    def __init__(self, n: int):
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if batch_idx == self.n:
            raise RuntimeError("interrupted")


def cam_folder(root: Path, n: int = 10) -> Path:
    root.mkdir()
    for i in range(n):
        region = REGIONS[i % len(REGIONS)]
        Image.fromarray(phantom_u8(region, 7400 + i)).save(root / f"{i:02d}_{region}.png")
    return root


def test_an_interrupted_cam_run_keeps_its_maps_and_resume_makes_the_rest(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
):
    folder, cams, out = cam_folder(tmp_path / "in"), tmp_path / "cams", tmp_path / "p.csv"
    args = (phantom_checkpoint, folder, out, "cam=true", f"cam_dir={cams}")
    with pytest.raises(RuntimeError, match="interrupted"):  # after batch 0 (4 files)
        predict(predict_config(*args), callbacks=[StopAfter(0)])
    first = read_output(out)
    maps = sorted(cams.iterdir())
    assert len(first) == 4 and len(maps) == 4  # the maps of the finished batch are kept
    for path, region in zip(first["path"], first["region"]):
        assert (cams / f"{Path(path).stem}_{region}.png").is_file()
    maps[0].unlink()  # as if interrupted between a batch's rows and its maps
    summary = predict(predict_config(*args, "resume=true"))
    assert (summary["resumed"], summary["ok"]) == (4, 6)
    assert (summary["cam_written"], summary["cam_resumed"], summary["cam_failed"]) == (7, 1, 0)
    df = read_output(out)
    assert len(df) == 10 and df["path"].is_unique  # map-only files got no second row
    names = sorted(p.name for p in cams.iterdir())
    assert names == sorted(f"{Path(p).stem}_{r}.png" for p, r in zip(df["path"], df["region"]))
    again = predict(predict_config(*args, "resume=true"))
    assert (again["resumed"], again["ok"], again["cam_written"]) == (10, 0, 0)


def test_cam_overlays_are_labelled_and_their_time_is_in_the_rate(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import regionnet.predict as predict_module
    from regionnet.cam import strip_height

    folder = cam_folder(tmp_path / "in", 6)
    make = predict_module.CamMaker.make

    def slow_make(self, *args):  # 0.5 s of map making per batch
        time.sleep(0.5)
        return make(self, *args)

    monkeypatch.setattr(predict_module.CamMaker, "make", slow_make)
    summary = predict(predict_config(phantom_checkpoint, folder, tmp_path / "p.csv", "cam=true",
                                     f"cam_dir={tmp_path / 'cams'}"))  # fmt: skip
    assert summary["seconds"] >= 1.0  # two batches of 4: the map time is inside the loop
    assert summary["per_second"] == pytest.approx(6 / summary["seconds"])
    df = read_output(tmp_path / "p.csv").set_index("path")
    for path, r in df.iterrows():  # the strip is black with white text and the colour bar
        png = np.asarray(Image.open(tmp_path / "cams" / f"{Path(path).stem}_{r['region']}.png"))
        assert png.shape == (SIZE + strip_height(SIZE), SIZE, 3)
        strip = png[SIZE:]
        assert strip.max() == 255 and (strip == 0).all(axis=2).mean() > 0.3
        bar = strip[strip.shape[0] // 2, SIZE * 2 // 3 :]  # jet: blue at 0, red at 1
        assert (bar[:, 2] > bar[:, 0] + 100).any() and (bar[:, 0] > bar[:, 2] + 100).any()


def test_uid_named_dicoms_keep_distinct_map_names(tmp_path):
    from regionnet.predict import CamMaker

    cams = CamMaker(tmp_path / "cams", tmp_path, 32)
    a = cams.path_for(str(tmp_path / "1.2.840.5.320"), "knee")
    b = cams.path_for(str(tmp_path / "1.2.840.5.321"), "knee")
    assert (a.name, b.name) == ("1.2.840.5.320_knee.png", "1.2.840.5.321_knee.png")
    assert cams.path_for(str(tmp_path / "sub" / "x.dcm"), "hand") == (
        tmp_path / "cams" / "sub" / "x_hand.png"
    )


# --------------------------------------------------------------------- the model's id
def rewritten_checkpoint(src: Path, dst: Path, change_weights: bool) -> Path:
    """`src` saved again with other metadata (as Lightning does); `change_weights`: one
    weight nudged, i.e. another model."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt.update(epoch=99, global_step=1234, callbacks={}, extra_note="rewritten")
    if change_weights:
        name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
        ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    torch.save(ckpt, dst)
    return dst


def test_model_id_names_the_model_not_the_file(phantom_checkpoint, tmp_path):  # noqa: F811
    mid = model_id(load_checkpoint(phantom_checkpoint))
    assert len(mid) == 12 and int(mid, 16) >= 0
    same = rewritten_checkpoint(phantom_checkpoint, tmp_path / "same.ckpt", False)
    assert sha256(same) != sha256(phantom_checkpoint)
    assert model_id(load_checkpoint(same)) == mid
    other = rewritten_checkpoint(phantom_checkpoint, tmp_path / "other.ckpt", True)
    assert model_id(load_checkpoint(other)) != mid


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_with_another_model_is_refused_unless_asked(
    phantom_checkpoint,  # noqa: F811
    mixed_folder,
    tmp_path,
    suffix,
):
    root, _ = mixed_folder
    out = tmp_path / f"p{suffix}"
    first = predict(predict_config(phantom_checkpoint, root / "hand.png", out))
    other = rewritten_checkpoint(phantom_checkpoint, tmp_path / "other.ckpt", True)
    other_id = model_id(load_checkpoint(other))
    before = out.read_bytes()
    with pytest.raises(OtherModelError) as err:
        predict(predict_config(other, root / "knee.png", out, "resume=true"))
    for words in (first["model_id"], other_id, "resume_other_model=true", str(other)):
        assert words in str(err.value)
    assert out.read_bytes() == before  # nothing changed
    # the same model from a rewritten file resumes
    same = rewritten_checkpoint(phantom_checkpoint, tmp_path / "same.ckpt", False)
    predict(predict_config(same, root / "knee.png", out, "resume=true"))
    mixed = predict(predict_config(other, root / "elbow16.png", out, "resume=true",
                                   "resume_other_model=true"))  # fmt: skip
    assert mixed["ok"] == 1
    ids = read_output(out)["model_id"].tolist()
    assert ids == [first["model_id"], first["model_id"], other_id]


def test_an_output_without_model_ids_is_not_resumed(phantom_checkpoint, mixed_folder, tmp_path):  # noqa: F811
    root, _ = mixed_folder
    out = tmp_path / "old.csv"
    predict(predict_config(phantom_checkpoint, root / "hand.png", out))
    old = read_output(out).drop(columns=["model_id"])  # as written before model ids
    old.to_csv(out, index=False)
    with pytest.raises(ValueError, match="before regionnet recorded the model"):
        predict(predict_config(phantom_checkpoint, root / "knee.png", out, "resume=true"))
    jsonl = tmp_path / "old.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in old.to_dict("records")))
    with pytest.raises(OtherModelError, match="no recorded model"):
        predict(predict_config(phantom_checkpoint, root / "knee.png", jsonl, "resume=true"))


# ------------------------------------------------ output folders inside the input folder
def test_output_folders_inside_the_input_are_not_predicted(
    phantom_checkpoint,  # noqa: F811
    tmp_path,
    caplog,
):
    caplog.set_level(logging.INFO, logger="regionnet.predict")
    folder = cam_folder(tmp_path / "in", 3)
    make_dicom(folder / "empty.dcm", phantom_u16("hand", 7501), BodyPartExamined="")
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    outs = ("cam=true", f"cam_dir={folder / 'cam'}",
            f"dicom.write_body_part={tmp_path / 'link' / 'tagged'}",  # the same, via a link
            "threshold_override=0.0")  # fmt: skip
    for _ in range(2):  # the second run finds the first run's maps and copies in the input
        summary = predict(predict_config(phantom_checkpoint, folder, tmp_path / "p.csv", *outs))
        assert summary["ok"] == 4 and summary["cam_written"] == 4
        assert summary["body_part_written"] == 1
    assert len(list((folder / "cam").iterdir())) == 4
    assert (folder / "tagged" / "empty.dcm").is_file()
    assert not list((folder / "cam").glob("cam")) and not (folder / "tagged" / "tagged").exists()
    assert sorted(read_output(tmp_path / "p.csv")["path"]) == sorted(
        str(p) for p in folder.iterdir() if p.is_file()
    )
    said = [r.getMessage() for r in caplog.records if "inside the input folder" in r.message]
    assert any("cam_dir" in m and "4 files" in m for m in said), said
    assert any("dicom.write_body_part" in m and "1 files" in m for m in said), said
    with pytest.raises(ValueError, match="is the input folder"):
        predict(predict_config(phantom_checkpoint, folder, tmp_path / "q.csv", "cam=true",
                               f"cam_dir={folder}"))  # fmt: skip
