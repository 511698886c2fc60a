"""Landmark metrics, report and overlay on hand-made predictions whose errors are known."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_landmark_geometry import C_SHAPE, KNOTS, spine, tilts_through

from regionnet.landmarks.geometry import VERTEBRAE
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.landmarks.overlay import draw_landmarks
from regionnet.landmarks.report import bootstrap_ci, landmark_report, plot_error_by_level

HAND = torch.tensor([[[0.0, 0.0], [100.0, 50.0], [50.0, 200.0], [20.0, 30.0]]])  # width 100


def hand_batch():
    """Two hand films (width 100 px): errors (3, 4) = 5 px, (1, 0) = 1 px, 0, and a hidden
    point 60 px off that must not count."""
    true = HAND.repeat(2, 1, 1)
    pred = true.clone()
    pred[0, 0] += torch.tensor([3.0, 4.0])
    pred[1, 1] += torch.tensor([1.0, 0.0])
    pred[1, 3] += torch.tensor([60.0, 0.0])
    visible = torch.tensor([[True, True, True, True], [True, True, True, False]])
    return pred, true, visible


def test_point_errors_on_a_hand_made_prediction():
    m = LandmarkMetrics("points")
    m.update(*hand_batch())
    out = m.compute_all("val")
    # 7 visible points: radial errors 5, 1 and five 0 px; hand width 100 -> the same in %
    assert out["val/films"] == 2
    assert out["val/mre_px"] == pytest.approx(6 / 7)
    assert out["val/mre_pct"] == pytest.approx(6 / 7)
    assert out["val/pck@2"] == pytest.approx(6 / 7)  # all but the 5 % one
    assert out["val/pck@5"] == pytest.approx(1.0)  # <= 5 % counts
    assert out["val/err_x_mean_pct"] == pytest.approx(4 / 7)
    assert out["val/err_y_mean_pct"] == pytest.approx(4 / 7)
    assert out["val/err_x_median_pct"] == 0.0
    assert "val/cobb_smape" not in out
    films = m.per_film()
    assert films["mre_px"] == pytest.approx([5 / 4, 1 / 3])
    assert np.isnan(films["radial_px"][1, 3]) and films["radial_px"][0, 0] == pytest.approx(5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # after reset, on purpose
def test_states_concatenate_batches_and_processes():
    pred, true, visible = hand_batch()
    whole = LandmarkMetrics("points")
    whole.update(pred, true, visible)
    # two "processes", one film each, merged through the states' own reduction (cat), as DDP
    # sync does: the numbers are those of the whole stage, not a mean of per-process means
    a, b = LandmarkMetrics("points"), LandmarkMetrics("points")
    a.update(pred[:1], true[:1], visible[:1])
    b.update(pred[1:], true[1:], visible[1:])
    a.merge_state(b)
    assert a.compute_all("val") == pytest.approx(whole.compute_all("val"))
    whole.reset()
    assert whole.compute_all("val") == {"val/films": 0.0}


def test_cobb_errors_against_labels_and_against_true_corners():
    true = torch.tensor(np.stack([spine(tilts_through(KNOTS), C_SHAPE)] * 2))  # 35, 15, 8 deg
    straight = torch.tensor(spine(np.zeros(17)))[None]  # 0, 0, 0
    m = LandmarkMetrics("vertebrae")
    labels = torch.tensor([[30.0, 15.0, 8.0], [np.nan, np.nan, np.nan]])  # film 2: from corners
    m.update(torch.cat([true[:1], straight]), true, torch.ones(2, 68, dtype=torch.bool), labels)
    out = m.compute_all("test")
    # film 1: |35-30|, 0, 0; film 2: 35, 15, 8 (straight prediction, angles of its corners)
    assert out["test/cobb_mae/pt"] == pytest.approx((5 + 35) / 2, abs=0.02)
    assert out["test/cobb_mae/mt"] == pytest.approx(15 / 2, abs=0.02)
    assert out["test/cobb_mae/tl"] == pytest.approx(8 / 2, abs=0.02)
    assert out["test/cobb_mae_mean"] == pytest.approx((20 + 7.5 + 4) / 3, abs=0.02)
    # SMAPE per film: 5 / (65 + 30 + 16) and 58 / 58
    assert out["test/cobb_smape"] == pytest.approx((5 / 111 + 1) / 2 * 100, abs=0.05)
    # film 1 is exact, so its points err 0; the vertebra size (40 + 24) / 2 = 32 is the reference
    films = m.per_film()
    assert films["mre_px"][0] == 0
    assert films["reference_px"][0] == pytest.approx(np.full(68, 32.0))
    assert films["cobb_true"][1] == pytest.approx([35.0, 15.0, 8.0], abs=0.02)


def test_bootstrap_and_report_reuse_the_film_resampling():
    rng = np.random.default_rng(1)
    per_film = {"err": rng.normal(10, 2, 50)}
    ci = bootstrap_ci(per_film, lambda f: float(f["err"].mean()), n=300, seed=0)
    lo, hi = ci
    assert lo < per_film["err"].mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 2 / np.sqrt(50), rel=0.3)  # SE of a mean of 50
    assert bootstrap_ci(per_film, lambda f: float(f["err"].mean()), n=300, seed=0) == ci
    m = LandmarkMetrics("points")
    m.update(*hand_batch())
    report = landmark_report(m, ["a", "b", "c", "d"], stage="test", resamples=50)
    assert report["test/mre_px"] == pytest.approx(6 / 7)
    assert report["test/mre_px_ci"][0] <= 6 / 7 <= report["test/mre_px_ci"][1]
    assert report["per_level"]["a"] == {"mre_px": 2.5, "mre_pct": 2.5, "points": 2}
    assert report["per_level"]["d"]["points"] == 1  # the hidden one is not counted


def test_error_plot_and_overlay_write_pngs(tmp_path):
    names = [f"{v}_{c}" for v in ("T1", "T2") for c in ("tl", "tr", "bl", "br")]
    errors = np.random.default_rng(0).gamma(2, 1, (5, 8))
    png = plot_error_by_level(errors, names, "vertebrae", tmp_path / "levels.png")
    assert Image.open(png).format == "PNG"
    image = np.random.default_rng(0).random((90, 60)).astype(np.float32)  # H 90, W 60
    corners = spine(np.zeros(17), pitch=4, w=20, h=3) * [0.25, 0.12]
    path = draw_landmarks(
        image, corners + 1, "vertebrae", true_points=corners, angles=[1.0, 2.0, 3.0],
        path=tmp_path / "o" / "film.png",
    )  # fmt: skip
    with Image.open(path) as im:
        assert im.size == (60, 90) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert (pixels == [230, 40, 40]).all(-1).any()  # predicted points drawn in red
    assert (pixels == [40, 200, 60]).all(-1).any()  # true points in green


def test_off_level_share_of_vertebrae_and_per_level():
    true = torch.tensor(spine(np.zeros(17)), dtype=torch.float32)[None].repeat(2, 1, 1)
    pred = true.clone()
    pred[0, 8:12, 1] += 40.0  # film 0: T3 placed on T4
    m = LandmarkMetrics("vertebrae")
    m.update(pred, true)
    out = m.compute_all("test")
    assert out["test/off_level_pct"] == pytest.approx(100 / 34)  # 1 of 2 x 17 vertebrae
    names = [f"{v}_{c}" for v in VERTEBRAE for c in ("tl", "tr", "bl", "br")]
    report = landmark_report(m, names, "test", resamples=20)
    assert report["per_level"]["T3"]["off_level_pct"] == pytest.approx(50.0)
    assert report["per_level"]["T4"]["off_level_pct"] == 0.0
    assert "test/off_level_pct_ci" in report
