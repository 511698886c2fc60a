"""Landmark data: coordinate frames, augmentation that moves points with pixels, flips that swap
left/right corners, patient-grouped splits, phantoms, batches, unreadable files, real films."""

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from regionnet.data.transforms import resize_pad
from regionnet.io import read_radiograph
from regionnet.landmarks.coords import (
    from_normalised,
    letterbox_params,
    to_input,
    to_normalised,
    to_original,
)
from regionnet.landmarks.data import (
    LandmarkAugment,
    LandmarkDataModule,
    LandmarkDataset,
    _out_of_order,
    annotation_issues,
    collate,
    flip_pairs_for,
    flip_permutation,
    hidden_points,
    issues_table,
    load_table,
)
from regionnet.landmarks.phantom import landmark_names, phantom_folder, render_spine

NO_LIGHT = {"brightness": 0, "contrast": 0}  # geometry only


def blob(height: int, width: int, x: float, y: float, sigma: float) -> np.ndarray:
    """A Gaussian dot centred at continuous (x, y) (pixel centres at k + 0.5)."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def centroid(image) -> np.ndarray:
    """(x, y) of a dot image in the continuous pixel convention."""
    a = np.clip(np.asarray(image, np.float64), 0, None)
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]] + 0.5
    return np.array([(a * xx).sum(), (a * yy).sum()]) / a.sum()


# -- coordinate frames -------------------------------------------------------------------------
@pytest.mark.parametrize("width, height, size", [(381, 1024, 64), (150, 97, 64), (80, 80, 48)])
def test_a_dot_lands_where_the_letterbox_says(width, height, size):
    """torchvision's Resize(max_size) floors the short side, so the two axes scale differently
    (381 x 1024 -> 23 x 64 px at 64: 0.0604 vs 0.0625); per-axis scale finds the dot exactly."""
    x, y = 0.37 * width, 0.61 * height
    dot = blob(height, width, x, y, sigma=2.5 * max(width, height) / size)
    out = resize_pad(size)(torch.from_numpy(dot)[None])[0].numpy()
    scale, ox, oy = letterbox_params(width, height, size)
    expected = to_input(np.array([[x, y]]), scale, (ox, oy))[0]
    assert np.abs(centroid(out) - expected).max() < 0.05
    n = to_normalised(expected, size)
    assert np.allclose(n, 2 * centroid(out) / size - 1, atol=0.01)
    back = to_original(from_normalised(n, size), scale, (ox, oy))
    assert np.abs(back - [x, y]).max() < 0.5


def test_letterbox_params_follow_torchvision_rounding():
    assert letterbox_params(381, 1024, 256) == ((95 / 381, 0.25), 80.0, 0.0)  # 95.25 -> 95
    assert letterbox_params(1024, 381, 255) == ((0.2490234375, 94 / 381), 0.0, 80.0)  # pad 80|81
    assert letterbox_params(300, 300, 256) == ((256 / 300, 256 / 300), 0.0, 0.0)
    for w, h in [(381, 1024), (1024, 381), (17, 33)]:
        (sx, sy), ox, oy = letterbox_params(w, h, 64)
        out = resize_pad(64)(torch.zeros(1, h, w) + 1)[0]
        cols, rows = out.sum(0) > 0, out.sum(1) > 0
        assert (int(cols.nonzero()[0]), int(cols.sum())) == (ox, round(w * sx))
        assert (int(rows.nonzero()[0]), int(rows.sum())) == (oy, round(h * sy))


def test_frames_round_trip_for_batches_in_torch_and_numpy():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 900, (3, 5, 2)).astype(np.float32)
    params = [letterbox_params(w, h, 128) for w, h in [(400, 1000), (1000, 700), (512, 512)]]
    scale = np.array([p[0] for p in params], np.float32)  # (B, 2)
    offset = np.array([p[1:] for p in params], np.float32)  # (B, 2)
    for kind in (np.asarray, torch.as_tensor):
        p, s, o = kind(pts), kind(scale), kind(offset)
        n = to_normalised(to_input(p, s, o), 128)
        assert type(n) is type(p) and tuple(n.shape) == (3, 5, 2)
        back = to_original(from_normalised(n, 128), s, o)
        assert np.abs(np.asarray(back) - pts).max() < 1e-3
        iso = to_original(to_input(p, s[:, 0], o), s[:, 0], o)  # one scale per film: (B,)
        assert np.abs(np.asarray(iso) - pts).max() < 1e-3
    assert np.allclose(to_normalised(np.array([[0.0, 128.0]]), 128), [[-1, 1]])


# -- augmentation ------------------------------------------------------------------------------
def test_augmented_points_follow_the_pixels():
    """A dot rendered at a point, augmented together (affine, crop, flip), is found at the
    augmented point: KeyPoints and the image agree, and the own flip is x -> S - x."""
    size, compared = 64, 0
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = 26.3 + seed, 38.6 - seed
        image = torch.from_numpy(blob(size, size, x, y, sigma=1.5))[None]
        a = {"rotation": 25, "translate": 0.1, "scale": [0.8, 1.2], "hflip": 0.5, **NO_LIGHT}
        if seed % 2:
            a["crop_scale"] = [0.5, 1.0]
        aug = LandmarkAugment(size, a, perm=np.array([0]))
        out, pts, _ = aug(image, torch.tensor([[x, y]]), torch.tensor([True]))
        assert out.shape == (1, size, size)
        if not ((pts > 6) & (pts < size - 6)).all():  # the dot (partly) left the image
            continue
        assert np.abs(centroid(out[0]) - pts[0].numpy()).max() < 0.25, seed  # measured <= 0.04
        compared += 1
    assert compared >= 8


def test_flip_mirrors_the_image_and_swaps_spine_corners():
    names = landmark_names(17)
    pairs = flip_pairs_for(names, "vertebrae")
    assert len(pairs) == 34 and (0, 1) in pairs and (2, 3) in pairs and (66, 67) in pairs
    assert flip_pairs_for(["p01", "p02"], "points") == []
    perm = flip_permutation(len(names), pairs)
    assert [names[i] for i in perm[:4]] == [
        "T1_top_right", "T1_top_left", "T1_bottom_right", "T1_bottom_left",
    ]  # fmt: skip
    pixels, corners = render_spine(seed=3, index=0, size=(64, 32))
    size = 64  # already square after a letterbox: pad the 64 x 32 film
    image = resize_pad(size)(torch.from_numpy(pixels)[None])
    scale, ox, oy = letterbox_params(32, 64, size)
    pts = to_input(torch.as_tensor(corners), scale, (ox, oy)).float()
    a = {"rotation": 0, "translate": 0, "scale": [1, 1], "hflip": 1.0, **NO_LIGHT}
    out, flipped, vis = LandmarkAugment(size, a, perm)(image, pts, torch.ones(68, dtype=bool))
    assert torch.equal(out, image.flip(-1))
    assert torch.allclose(flipped[0], torch.stack([size - pts[1, 0], pts[1, 1]]))  # TL <- TR
    tl, tr = flipped[0::4], flipped[1::4]
    assert (tl[:, 0] < tr[:, 0]).all()  # top-left is still left of top-right after the swap


# -- the detail image (step 2's crops) ---------------------------------------------------------
def _dot_film(tmp_path, width: int, height: int, x: float, y: float, sigma: float):
    """A landmark folder holding one 16-bit PNG film with a Gaussian dot at film pixel (x, y)
    (pixel centres at k + 0.5), the dot's centre its one landmark; (records, points, root)."""
    root = tmp_path / "dot"
    (root / "spine_aasce").mkdir(parents=True)
    dot = blob(height, width, x, y, sigma)
    Image.fromarray(np.round(dot * 65535).astype(np.uint16)).save(root / "spine_aasce/d.png")
    records = pd.DataFrame({"path": ["spine_aasce/d.png"], "cobb_pt": [np.nan],
                            "cobb_mt": [np.nan], "cobb_tl": [np.nan]})  # fmt: skip
    return records, np.array([[[x, y]]], np.float32), root


def _pixels(image: torch.Tensor) -> np.ndarray:
    """A normalised (1, N, N) sample image back in [0, 1] (GRAY_MEAN / GRAY_STD)."""
    from regionnet.data.transforms import GRAY_MEAN, GRAY_STD

    return image[0].numpy() * GRAY_STD + GRAY_MEAN


def test_detail_and_input_share_one_frame_through_augmentation(tmp_path):
    """A dot at a known film pixel goes through letterbox, crop, affine and flip at D = 128
    (`detail`) and is pooled to S = 32 (`image`): its centroid in each, as a normalised
    coordinate, is the sample's augmented point; and with no augmentation the point maps back
    to the film pixel through `scale`/`offset` (the input's letterbox, detail x S/D)."""
    from regionnet.landmarks.coords import detail_to_input, input_letterbox

    s, d, compared = 32, 128, 0
    width, height, x, y = 150, 380, 75.3, 207.8  # letterboxed at 128: 50 x 128, offset 39
    # sigma 1.5 input px (6 detail px); compared where the dot is >= 4 sigma from the edges
    records, points, root = _dot_film(tmp_path, width, height, x, y, sigma=1.5 * height / s)
    plain = LandmarkDataset(records, points, root, s, detail_size=d)[0]
    assert plain["detail"].shape == (1, d, d) and plain["image"].shape == (1, s, s)
    assert torch.allclose(plain["image"], detail_to_input(plain["detail"], s), atol=1e-6)
    (sx, sy), ox, oy = input_letterbox(width, height, s, d)
    assert np.allclose(plain["scale"], [sx, sy]) and np.allclose(plain["offset"], [ox, oy])
    assert (oy, ox) == (0.0, 39 / 4)  # (128 - 50) // 2 detail px = 9.75 input px
    back = to_original(from_normalised(plain["points"], s), plain["scale"], plain["offset"])
    assert np.abs(back.numpy() - [[x, y]]).max() < 1e-3
    worst = {"image": 0.0, "detail": 0.0}
    for seed in range(12):
        torch.manual_seed(seed)
        a = {"rotation": 25, "translate": 0.1, "scale": [0.8, 1.2], "hflip": 0.5, "noise": 0,
             **NO_LIGHT, **({"crop_scale": [0.5, 1.0]} if seed % 2 else {})}  # fmt: skip
        aug = LandmarkAugment(d, a, perm=np.array([0]))
        sample = LandmarkDataset(records, points, root, s, augment=aug, detail_size=d)[0]
        n = sample["points"][0].numpy()
        if not ((n > -0.6) & (n < 0.6)).all():  # the dot (partly) left the image
            continue
        for key, size in (("image", s), ("detail", d)):
            found = to_normalised(centroid(_pixels(sample[key])), size)
            # the error in input pixels of the S x S image
            worst[key] = max(worst[key], float(np.abs(found - n).max() * s / 2))
        compared += 1
    assert compared >= 8
    assert worst["image"] < 0.04 and worst["detail"] < 0.04, worst  # measured <= 0.004


# -- phantoms ----------------------------------------------------------------------------------
def test_phantom_corners_outline_the_bright_vertebrae():
    pixels, corners = render_spine(seed=0, index=5, size=(256, 128), vertebrae=17)
    assert pixels.shape == (256, 128) and corners.shape == (68, 2)
    quads = corners.reshape(17, 4, 2)
    assert (quads[:, 0, 0] < quads[:, 1, 0]).all() and (quads[:, 0, 1] < quads[:, 2, 1]).all()
    assert (np.diff(quads[:, 0, 1]) > 0).all()  # head to foot

    def at(p):
        return pixels[int(p[1]), int(p[0])]

    for q in quads:
        c = q.mean(0)
        inner = [c + 0.7 * (p - c) for p in q]  # well inside the quad
        outer = [c + 1.6 * (q[1] - c + q[3] - c) / 2, c + 1.6 * (q[0] - c + q[2] - c) / 2]
        assert min(at(p) for p in [c, *inner]) > 0.5
        assert max(at(p) for p in outer) < 0.45  # beyond the left and right sides: background
    again, same = render_spine(seed=0, index=5, size=(256, 128), vertebrae=17)
    assert np.array_equal(again, pixels) and np.array_equal(same, corners)


def test_phantom_quads_cover_exactly_their_area():
    """Area and centroid of the drawn quads match the corners (no rasteriser offset)."""
    from regionnet.landmarks.phantom import _fill_quad

    image = np.zeros((40, 40), np.float32)
    ring = np.array([[10.3, 7.6], [20.55, 9.1], [19.4, 17.2], [9.7, 15.2]])
    _fill_quad(image, ring)
    x, y = ring[:, 0], ring[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    cx = ((x + np.roll(x, -1)) * cross).sum() / (6 * area)
    cy = ((y + np.roll(y, -1)) * cross).sum() / (6 * area)
    assert abs(image.sum() - area) < 0.2
    assert np.abs(centroid(image) - [cx, cy]).max() < 0.02


def test_phantom_folder_is_cached_and_reads_back(tmp_path):
    folder = phantom_folder(tmp_path, n=3, size=(64, 32), vertebrae=5, seed=1)
    assert phantom_folder(tmp_path, n=3, size=(64, 32), vertebrae=5, seed=1) == folder
    manifest = pd.read_csv(folder / "manifest.csv")
    table = json.loads((folder / "landmarks.json").read_text())
    assert list(manifest["patient_id"]) == ["spine_00000", "spine_00001", "spine_00002"]
    assert table["landmark_names"]["phantom"][:2] == ["V1_top_left", "V1_top_right"]
    pixels, corners = render_spine(1, 2, (64, 32), 5)
    stored = read_radiograph(folder / manifest["path"][2])
    assert np.abs(stored - pixels).max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    assert np.allclose(table["points"][manifest["path"][2]], corners, atol=1e-4)


# -- data module -------------------------------------------------------------------------------
def _module(tmp_path, **kw) -> LandmarkDataModule:
    phantom = {"n": 12, "size": [64, 32], "vertebrae": 17, "cache": str(tmp_path / "cache")}
    args = {"dataset": "phantom", "image_size": 32, "batch_size": 4, "num_workers": 0}
    return LandmarkDataModule(**{**args, "phantom": phantom, **kw})


def test_phantom_batches_have_the_documented_shapes(tmp_path):
    dm = _module(tmp_path, augment={"rotation": 10, "hflip": 0.5, "noise": 0.02})
    dm.setup()
    assert dm.skeleton == "vertebrae" and dm.dataset == "phantom" and len(dm.flip_pairs) == 34
    assert len(dm.landmark_names) == 68 and dm.train_size() + 2 <= 12
    assert dm.test_stage_names() == ["test"]
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        b = len(batch["path"])
        assert batch["image"].shape == (b, 1, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["points"].shape == batch["points_px"].shape == (b, 68, 2)
        assert batch["visible"].shape == (b, 68) and batch["visible"].dtype == torch.bool
        assert batch["scale"].shape == batch["offset"].shape == batch["size"].shape == (b, 2)
        assert batch["size"].tolist() == [[32, 64]] * b and batch["cobb"].isnan().all()
        assert batch["errors"] == [] and torch.isfinite(batch["points"]).all()
    # val: letterbox only, so the points are the annotation moved into the input frame
    p = to_normalised(to_input(batch["points_px"], batch["scale"], batch["offset"]), 32)
    assert torch.allclose(batch["points"], p, atol=1e-5) and batch["visible"].all()
    back = to_original(from_normalised(batch["points"], 32), batch["scale"], batch["offset"])
    assert (back - batch["points_px"]).abs().max() < 1e-3


def test_detail_batches_carry_the_film_at_the_detail_size(tmp_path):
    """`detail` only where asked (`detail` and `detail_size`): the film at D, and `image` its
    pool in validation; in training both come out of one augmentation (same points, same
    frame); a detail size that is no multiple of the input's is refused, naming the keys."""
    from regionnet.landmarks.coords import detail_to_input

    assert "detail" not in next(iter(_module(tmp_path, detail_size=128).val_dataloader()))
    dm = _module(tmp_path, detail_size=128, detail=True, augment={"rotation": 10, "noise": 0})
    val = next(iter(dm.val_dataloader()))
    b = len(val["path"])
    assert val["detail"].shape == (b, 1, 128, 128) and val["image"].shape == (b, 1, 32, 32)
    assert torch.allclose(val["image"], detail_to_input(val["detail"], 32), atol=1e-6)
    back = to_original(from_normalised(val["points"], 32), val["scale"], val["offset"])
    assert (back - val["points_px"]).abs().max() < 1e-3
    train = next(iter(dm.train_dataloader()))
    assert train["detail"].shape[1:] == (1, 128, 128) and dm._augment().size == 128
    # geometry, brightness and contrast happen at D before the pool; only noise is per image
    assert torch.allclose(train["image"], detail_to_input(train["detail"], 32), atol=1e-5)
    with pytest.raises(ValueError, match=r"data\.detail_size=100 must be a multiple of "
                                         r"data\.image_size=32"):  # fmt: skip
        _module(tmp_path, detail_size=100, detail=True)
    assert _module(tmp_path, detail_size=32, detail=True).detail_size is None  # the input


def test_points_pushed_off_the_image_are_not_visible(tmp_path):
    dm = _module(tmp_path, augment={"rotation": 0, "translate": 0.4, "scale": [1.4, 1.5]})
    batch = next(iter(dm.train_dataloader()))
    on_input = ((batch["points"] >= -1) & (batch["points"] < 1)).all(-1)
    assert torch.equal(batch["visible"], on_input) and not on_input.all()


def _landmark_folder(tmp_path, patients: int, films_each: int, dataset="spine_aasce") -> tuple:
    """A tiny landmark folder of phantom films named as `dataset`, several per patient."""
    rows, points = [], {}
    names = landmark_names(17)
    (tmp_path / dataset).mkdir(parents=True)
    for p in range(patients):
        for f in range(films_each):
            rel = f"{dataset}/p{p}_{f}.png"
            pixels, corners = render_spine(p, f, (80, 40))
            Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / rel)
            points[rel] = corners.tolist()
            rows.append({"path": rel, "dataset": dataset, "patient_id": f"pat{p}",
                         "width": 40, "height": 80, "cobb_pt": 10.0, "cobb_mt": 20.0,
                         "cobb_tl": 5.0})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    table = {"landmark_names": {dataset: names}, "points": points}
    (tmp_path / "landmarks.json").write_text(json.dumps(table))
    return tmp_path, rows


def test_split_keeps_each_patient_in_one_split(tmp_path):
    root, _ = _landmark_folder(tmp_path / "lm", patients=10, films_each=3)
    dm = LandmarkDataModule(root=str(root), image_size=32, num_workers=0, seed=3)
    dm.setup()
    assert dm.records.groupby("patient_id")["split"].nunique().max() == 1
    assert set(dm.records["split"]) == {"train", "val", "test"}
    written = pd.read_csv(dm.write_split(tmp_path / "out" / "split.csv"))
    assert list(written.columns[:3]) == ["path", "patient_id", "split"] and len(written) == 30
    again = LandmarkDataModule(root=str(root), image_size=32, num_workers=0, seed=3)
    again.setup()
    assert again.records["split"].tolist() == dm.records["split"].tolist()


def test_a_corrupt_film_is_reported_and_skipped(tmp_path):
    root, rows = _landmark_folder(tmp_path / "lm", patients=4, films_each=1)
    (root / rows[1]["path"]).write_bytes(b"not a png")
    records, points, _ = load_table(root, "spine_aasce")
    loader = DataLoader(
        LandmarkDataset(records, points, root, 32), batch_size=4, collate_fn=collate
    )
    batch = next(iter(loader))
    assert [p for p, _ in batch["errors"]] == [rows[1]["path"]] and batch["errors"][0][1]
    assert batch["path"] == [rows[i]["path"] for i in (0, 2, 3)]
    assert batch["image"].shape == (3, 1, 32, 32) and batch["index"].tolist() == [0, 2, 3]
    assert torch.allclose(batch["cobb"], torch.tensor([[10.0, 20.0, 5.0]] * 3))
    only_bad = collate([LandmarkDataset(records, points, root, 32)[1]])
    assert "image" not in only_bad and len(only_bad["errors"]) == 1


def test_hands_are_flipped_only_when_asked(tmp_path):
    """Every hand_dha film is a left hand: a flip would make right hands (names unchanged)."""
    root, _ = _landmark_folder(tmp_path / "lm", patients=3, films_each=1, dataset="hand_dha")
    for extra, p in [({}, 0.0), ({"hflip_hands": True}, 1.0)]:
        dm = LandmarkDataModule(root=str(root), dataset="hand_dha", augment={"hflip": 1, **extra})
        assert dm.skeleton == "points" and dm.flip_pairs == []
        aug = dm._augment()
        assert aug.hflip == p and (p == 0 or aug.perm.tolist() == list(range(68)))


def test_missing_root_or_files_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.root="):
        LandmarkDataModule(root=str(tmp_path / "nowhere")).setup()
    (tmp_path / "lm").mkdir()
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv.*data\.root="):
        LandmarkDataModule(root=str(tmp_path / "lm")).setup()
    with pytest.raises(ValueError, match="data.dataset"):
        LandmarkDataModule(root=str(tmp_path), dataset="knee")


# -- annotation check --------------------------------------------------------------------------
NAMES = landmark_names(17)
VERT = [n.split("_")[0] for n in NAMES[::4]]


def _spine(seed: int = 0) -> np.ndarray:
    """A clean phantom spine (68, 2) on a 512 x 256 (height x width) film."""
    return render_spine(seed, 0, (512, 256))[1].astype(np.float64)


def _corners(points: np.ndarray, vertebra: str) -> slice:
    k = VERT.index(vertebra)
    return slice(4 * k, 4 * k + 4)


def test_annotation_check_finds_each_broken_rule():
    films = {f"clean{i}": _spine(i) for i in range(3)}
    top = _spine(3)  # the L5 slot at the top of the film beside T1 (the AASCE error)
    top[_corners(top, "L5")] -= [0, top[_corners(top, "L5")][:, 1].min() - 5]
    twice = _spine(4)  # L5 annotated on L4 again
    twice[_corners(twice, "L5")] = twice[_corners(twice, "L4")] + 1.0
    upside = _spine(5)  # T8's top and bottom corners swapped
    upside[_corners(upside, "T8")] = upside[_corners(upside, "T8")][[2, 3, 0, 1]]
    mirrored = _spine(6)  # L2's left and right corners swapped
    mirrored[_corners(mirrored, "L2")] = mirrored[_corners(mirrored, "L2")][[1, 0, 3, 2]]
    off = _spine(7)  # one corner left of the film
    off[NAMES.index("T3_top_left"), 0] = -2.0
    missing = _spine(8)  # a missing point is no issue
    missing[NAMES.index("T5_top_left")] = np.nan
    films |= {"top": top, "twice": twice, "upside": upside, "mirrored": mirrored,
              "off": off, "missing": missing}  # fmt: skip
    sizes = dict.fromkeys(films, (256, 512))
    found = annotation_issues(films, NAMES, sizes)
    assert set(found) == {"top", "twice", "upside", "mirrored", "off"}
    assert list(found["top"]) == ["L5"] and "head-to-foot" in found["top"]["L5"]
    assert sorted(found["twice"]) == ["L4", "L5"]  # either could be the wrong one
    assert list(found["upside"]) == ["T8"] and "top_left" in found["upside"]["T8"]
    assert list(found["mirrored"]) == ["L2"] and "not left of" in found["mirrored"]["L2"]
    assert list(found["off"]) == ["T3"] and found["off"]["T3"].startswith("top_left (-2, ")
    assert found["off"]["T3"].endswith(") off the 256 x 512 film")
    assert "off" not in annotation_issues(films, NAMES)  # no sizes: no on-film test
    paths = list(films)
    hide = hidden_points(found, paths, NAMES)
    assert hide.shape == (len(films), 68) and hide.sum() == 4 * 6
    assert hide[paths.index("top"), _corners(top, "L5")].all()
    assert hide[paths.index("twice")].sum() == 8 and not hide[paths.index("clean0")].any()
    table = issues_table(found)
    assert list(table.columns) == ["path", "vertebra", "reason"] and len(table) == 6


def test_out_of_order_flags_the_misplaced_vertebra_or_both_of_a_tie():
    y = np.arange(10.0) * 10
    assert not _out_of_order(y, 2).any()
    late = y.copy()
    late[-1] = 5  # the last one at the top
    assert _out_of_order(late, 2).tolist() == [False] * 9 + [True]
    tie = y.copy()
    tie[4] = tie[3] + 1  # two centres 1 apart, margin 2: one of them is wrong
    assert np.flatnonzero(_out_of_order(tie, 2)).tolist() == [3, 4]
    gap = y.copy()
    gap[2] = np.nan  # never flagged, and no break in the chain
    assert not _out_of_order(gap, 2).any()


def test_points_skeletons_check_only_that_points_lie_on_the_film():
    names = ["p01", "p02", "p03"]
    pts = {"a": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
           "b": np.array([[1.0, 2.0], [-3.0, 4.0], [5.0, 6.0]])}  # fmt: skip
    found = annotation_issues(pts, names, {"a": (10, 10), "b": (10, 10)})
    assert found == {"b": {"p02": "point (-3, 4) off the 10 x 10 film"}}
    assert hidden_points(found, ["a", "b"], names).tolist() == [[0, 0, 0], [0, 1, 0]]


def test_flagged_vertebrae_are_hidden_in_every_split_and_listed(tmp_path, caplog):
    root, rows = _landmark_folder(tmp_path / "lm", patients=8, films_each=1)
    table = json.loads((root / "landmarks.json").read_text())
    before = json.dumps(table)
    bad = rows[5]["path"]
    pts = np.array(table["points"][bad])
    pts[_corners(pts, "L5")] -= [0, pts[_corners(pts, "L5")][:, 1].min() - 1]
    table["points"][bad] = pts.tolist()
    (root / "landmarks.json").write_text(json.dumps(table))
    assert before != json.dumps(table)
    before = (root / "landmarks.json").read_text()
    with caplog.at_level(logging.WARNING, logger="regionnet.landmarks.data"):
        still = {"rotation": 0, "translate": 0, "scale": [1, 1]}
        dm = LandmarkDataModule(root=str(root), image_size=32, num_workers=0, batch_size=8,
                                augment=still)  # fmt: skip
        dm.setup()
    lines = [r.getMessage() for r in caplog.records if "annotation check" in r.getMessage()]
    assert len(lines) == 1 and "1 of 8 films have 1 vertebrae" in lines[0]
    assert (root / "landmarks.json").read_text() == before  # the data are never edited
    split = dm.records.set_index("path").loc[bad, "split"]
    loaders = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}
    seen = False
    for name, loader in loaders.items():
        for batch in loader():
            for k, path in enumerate(batch["path"]):
                vis = batch["visible"][k]
                if path == bad:
                    assert name == split and not vis[_corners(pts, "L5")].any()
                    assert vis[: 4 * 16].all()  # T1..L4 still train and score
                    seen = True
                elif name != "train":
                    assert vis.all()
    assert seen or split == "train"  # train drops its last partial batch
    written = dm.write_split(tmp_path / "run" / "split.csv")
    issues = pd.read_csv(written.with_name("annotation_issues.csv"))
    assert issues[["path", "vertebra"]].values.tolist() == [[bad, "L5"]]
    clean = LandmarkDataModule(root=str(root), dataset="spine_aasce", limit=3, num_workers=0)
    written = clean.write_split(tmp_path / "clean" / "split.csv")
    assert pd.read_csv(written.with_name("annotation_issues.csv")).empty


def test_split_file_gives_back_a_runs_split(tmp_path):
    root, _ = _landmark_folder(tmp_path / "lm", patients=10, films_each=2)
    dm = LandmarkDataModule(root=str(root), image_size=32, num_workers=0, seed=5)
    written = dm.write_split(tmp_path / "run" / "split.csv")
    again = LandmarkDataModule(root=str(root), image_size=32, num_workers=0, seed=99,
                               split_file=str(written))  # fmt: skip
    again.setup()
    assert again.records["split"].tolist() == dm.records["split"].tolist()
    with pytest.raises(FileNotFoundError, match="split_file"):
        LandmarkDataModule(root=str(root), split_file=str(tmp_path / "no.csv")).setup()


# -- real films --------------------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.parametrize("dataset, k", [("spine_aasce", 68), ("hand_dha", 37)])
def test_real_landmark_films_load(shared_data, dataset, k):
    root = shared_data / "landmarks"
    if not (root / "landmarks.json").is_file():
        pytest.skip(f"real radiographs not found at {root} (../shared/data/landmarks)")
    dm = LandmarkDataModule(root=str(root), dataset=dataset, limit=12, image_size=128,
                            batch_size=4, num_workers=0)  # fmt: skip
    dm.setup()
    assert len(dm.landmark_names) == k and dm.skeleton == ("vertebrae" if k == 68 else "points")
    assert len(dm.flip_pairs) == (34 if k == 68 else 0)
    batch = next(iter(dm.val_dataloader()))
    b = len(batch["path"])
    assert batch["errors"] == [] and batch["image"].shape == (b, 1, 128, 128)
    rows = dm.split_frame("val").index[batch["index"].numpy()]
    assert batch["points"].shape == (b, k, 2)  # hidden: only the annotation check's finds
    assert batch["visible"].numpy().tolist() == (~dm.hidden[rows]).tolist()
    assert (batch["points"].abs() < 1).all()  # every annotated point is on the input
    w, h = batch["size"][:, None, 0], batch["size"][:, None, 1]
    px = batch["points_px"]
    assert ((px >= 0).all(-1) & (px[..., 0] < w) & (px[..., 1] < h)).all()
    assert all(p.startswith(f"{dataset}/") for p in batch["path"])
    cobb = batch["cobb"]
    assert cobb.isnan().all() if dataset == "hand_dha" else torch.isfinite(cobb).all()
    train = next(iter(dm.train_dataloader()))  # augmented: shapes unchanged, points finite
    assert train["points"].shape[1:] == (k, 2) and torch.isfinite(train["points"]).all()


@pytest.mark.shared_data
def test_letterbox_of_a_real_film_puts_a_dot_where_coords_say(shared_data):
    """A dot added to a real 467 x 1024 spine film is found after `resize_pad(256)` at
    `to_input` of its original position within 0.05 input px. One scale for both axes
    (256 / 1024) would be 0.46 px off at x = 285: the width goes to int(116.75) = 116 px."""
    path = shared_data / "landmarks" / "spine_aasce" / "sunhl_1th_02_Jan_2017_162_B_AP.jpg"
    if not path.is_file():
        pytest.skip(f"real radiographs not found at {path}")
    film = read_radiograph(path)
    h, w = film.shape
    letterbox = resize_pad(256)
    base = letterbox(torch.from_numpy(film)[None])[0].numpy()
    for x, y in [(100.5, 200.5), (0.61 * w, 0.83 * h), (w / 2, h / 2)]:
        dotted = film + 4 * blob(h, w, x, y, sigma=8)
        found = centroid(letterbox(torch.from_numpy(dotted)[None])[0].numpy() - base)
        scale, ox, oy = letterbox_params(w, h, 256)
        where = to_input(np.array([[x, y]]), scale, (ox, oy))[0]
        assert np.abs(found - where).max() < 0.05
        back = to_original(from_normalised(to_normalised(found, 256), 256), scale, (ox, oy))
        assert np.abs(back - [x, y]).max() < 0.5


@pytest.mark.shared_data
def test_real_spine_annotation_issues(shared_data):
    """The AASCE annotations that break the anatomy (the data stay as they are): 38 vertebrae
    on 30 films, 18 of them with the L5 slot at the top of the film beside T1; none on hands."""
    root = shared_data / "landmarks"
    if not (root / "landmarks.json").is_file():
        pytest.skip(f"real radiographs not found at {root} (../shared/data/landmarks)")
    found = {}
    for dataset, films, parts in [("hand_dha", 0, 0), ("spine_aasce", 30, 38)]:
        df, points, names = load_table(root, dataset)
        sizes = dict(zip(df["path"], zip(df["width"], df["height"], strict=True), strict=True))
        found = annotation_issues(dict(zip(df["path"], points, strict=True)), names, sizes)
        assert (len(found), sum(map(len, found.values()))) == (films, parts)
    centre = {p: re.search(r"centre y=(\d+)", v.get("L5", "")) for p, v in found.items()}
    l5_top = [p for p, m in centre.items() if m and int(m.group(1)) < 100]  # beside T1
    for film in ("05_Jan_2017_169_A", "06_Jan_2017_182_A", "10_Jan_2017_228_B",
                 "25_Jan_2017_279_B"):  # fmt: skip
        path = f"spine_aasce/sunhl_1th_{film}_AP.jpg"
        assert "out of head-to-foot order" in found[path]["L5"]
    assert len(l5_top) == 18
