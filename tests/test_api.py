"""The Python API (regionnet.api): paths and arrays in, `Prediction`s out, same as the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_factory import make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image

import regionnet
from regionnet.api import Prediction, RegionPredictor, array_pixels, load_model
from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.predict import predict
from regionnet.regions import UNKNOWN


@pytest.fixture(scope="module")
def predictor(phantom_checkpoint) -> RegionPredictor:  # noqa: F811
    return regionnet.load_model(phantom_checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An 8-bit PNG, a 16-bit PNG and a MONOCHROME1 DICOM, with the pixels they hold."""
    root = tmp_path_factory.mktemp("api_files")
    hand = (render_phantom("hand", 8101, 80) * 255).round().astype(np.uint8)
    knee = (render_phantom("knee", 8102, 80) * 4095).round().astype(np.uint16)
    elbow = (render_phantom("elbow", 8103, 80) * 4095).round().astype(np.uint16)
    Image.fromarray(hand).save(root / "hand.png")
    Image.fromarray(knee).save(root / "knee16.png")
    make_dicom(root / "elbow_m1.dcm", 4095 - elbow, "MONOCHROME1")
    return {"hand.png": hand, "knee16.png": knee, "elbow_m1.dcm": elbow, "root": root}


def test_same_probabilities_as_the_cli(predictor, files, phantom_checkpoint, tmp_path):  # noqa: F811
    names = ["hand.png", "knee16.png", "elbow_m1.dcm"]
    paths = [str(files["root"] / n) for n in names]
    out = tmp_path / "preds.csv"
    cfg = compose_config(
        "predict",
        [f"ckpt_path={phantom_checkpoint}", f"input={files['root']}", f"output={out}",
         "accelerator=cpu", "num_workers=0", "batch_size=2"],
    )  # fmt: skip
    predict(cfg)
    cli = pd.read_csv(out, keep_default_na=False).set_index("path")
    for p in predictor.predict(paths, batch_size=2):
        row = cli.loc[p.path]
        assert p.ok and p.status == row["status"] == "ok"
        for region, prob in p.probabilities.items():
            assert prob == pytest.approx(row[f"p_{region}"], abs=1e-5)
        assert p.region == row["region"]
        assert ";".join(p.regions) == row["regions"]


def test_arrays_match_the_files_they_came_from(predictor, files):
    root = files["root"]
    from_files = predictor.predict([root / "hand.png", root / "knee16.png"])
    hand, knee16 = files["hand.png"], files["knee16.png"]
    # uint8 is /255 like an 8-bit PNG, uint16 by its bit depth like a 16-bit PNG, floats as given
    from_arrays = predictor.predict([hand, knee16, hand / 255.0, torch.from_numpy(hand / 255.0)])
    for a, b in zip(from_arrays, [*from_files, from_files[0], from_files[0]]):
        assert a.path is None and b.path is not None
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        assert (a.region, a.regions) == (b.region, b.regions)


def test_unreadable_inputs_give_error_predictions_and_the_rest_goes_on(predictor, files, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    inputs = [
        tmp_path / "notes.png",
        tmp_path / "missing.dcm",
        np.full((8, 8), 2.0),  # float outside [0, 1]
        np.zeros((8, 8, 3), np.uint8),  # colour
        files["hand.png"],
    ]
    preds = predictor.predict(inputs, batch_size=2)
    assert [p.ok for p in preds] == [False, False, False, False, True]
    for p, words in zip(preds, ["not an image", "not found", "[0, 1]", "(H, W)"]):
        assert p.status == f"error: {p.error}" and words in p.error
        assert p.region is None and p.probabilities == {} and p.regions == []
    assert preds[0].path == str(tmp_path / "notes.png") and preds[2].path is None
    assert preds[-1].status == "ok" and preds[-1].error is None


def test_predict_one_regions_thresholds_and_override(predictor, files, phantom_checkpoint):  # noqa: F811
    model = predictor.model
    assert predictor.regions == tuple(model.regions)
    assert predictor.thresholds == pytest.approx(
        dict(zip(model.regions, model.thresholds.tolist()))
    )
    one = predictor.predict_one(files["hand.png"])
    assert isinstance(one, Prediction) and set(one.probabilities) == set(predictor.regions)
    assert one == predictor.predict([files["hand.png"]], batch_size=1)[0]
    # a threshold of 1 (nothing passes) and of 0 (everything passes)
    never = load_model(phantom_checkpoint, thresholds=1.0).predict_one(files["hand.png"])
    assert (never.region, never.regions) == (UNKNOWN, [])
    every = load_model(phantom_checkpoint, thresholds={r: 0.0 for r in predictor.regions})
    p = every.predict_one(files["hand.png"])
    assert p.regions == list(predictor.regions)
    assert p.region == max(p.probabilities, key=p.probabilities.get)


def test_array_normalisation_rules():
    assert array_pixels(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    # deeper integers by their bit depth (the smallest of 8, 10, 12, ... holding the values, as
    # for a 16-bit PNG), never by their own min-max: 500 needs 10 bits
    got = array_pixels(np.array([[100, 300, 500]], np.uint16))
    np.testing.assert_allclose(got, [[100 / 1023, 300 / 1023, 500 / 1023]], rtol=1e-6)
    assert array_pixels(np.ones((1, 4, 4), np.float32)).shape == (4, 4)  # channel first
    # a constant image keeps its value (7 of 8 bits), not NaN
    assert array_pixels(np.full((3, 3), 7, np.int16)).max() == pytest.approx(7 / 255)
    with pytest.raises(ValueError, match="NaN"):
        array_pixels(np.full((2, 2), np.nan))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_model(tmp_path / "nope.ckpt")


def test_import_regionnet_stays_light():
    code = "import sys, regionnet; assert 'torch' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert regionnet.load_model is load_model  # resolved lazily, on first use
    with pytest.raises(AttributeError, match="no attribute"):
        regionnet.no_such_name  # noqa: B018
