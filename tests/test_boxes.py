"""Box heads (task=boxes, regionnet/boxes): vertebra boxes from corners, their augmentation,
the mAP metric on hand-made cases, FCOS on a timm backbone, and the task end to end on
synthetic spines (phantoms with exact corners, so exact boxes): train(cfg), the Python API and
regionnet-predict. The boxes are vertebrae, not lesions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import regionnet
from regionnet.boxes.data import (
    BoxDataModule,
    boxes_from_corners,
    clamp_and_sanitize,
    vertebra_groups,
)
from regionnet.boxes.model import build_box_network
from regionnet.boxes.module import box_metric, boxes_to_original, map_values
from regionnet.config import compose_config
from regionnet.landmarks.coords import letterbox_params, to_input
from regionnet.landmarks.data import LandmarkAugment
from regionnet.run import build_datamodule, build_model
from regionnet.train import train

VERTEBRAE = 4
NAMES = [
    f"V{i}_{c}" for i in (1, 2) for c in ("top_left", "top_right", "bottom_left", "bottom_right")
]


# -- boxes from corners --------------------------------------------------------------------
def test_a_vertebras_box_is_the_min_and_max_of_its_corners():
    names, groups = vertebra_groups(NAMES)
    assert names == ["V1", "V2"] and groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    tilted = [[10, 12], [30, 8], [12, 30], [33, 26]]  # TL, TR, BL, BR of a tilted vertebra
    missing = [[10, 40], [float("nan"), 40], [10, 60], [30, 60]]
    points = torch.tensor(tilted + missing, dtype=torch.float32)
    boxes, labels = boxes_from_corners(points, groups)
    assert boxes.tolist() == [[10, 8, 33, 30]] and labels.tolist() == [1]  # V2 has a NaN
    boxes, labels = boxes_from_corners(points.nan_to_num(30), groups, torch.tensor([False, True]))
    assert boxes.tolist() == [[10, 40, 30, 60]] and labels.tolist() == [2]  # label 2 = V2
    with pytest.raises(ValueError, match="vertebra corners"):
        vertebra_groups(["thumb_tip", "wrist"])


def test_boxes_are_clamped_to_the_input_and_slivers_dropped():
    boxes = torch.tensor([[-5.0, 10, 20, 30], [62, 0, 70, 10], [10, 10, 50, 20]])
    out, labels = clamp_and_sanitize(boxes, torch.tensor([1, 2, 3]), size=64)
    assert out.tolist() == [[0, 10, 20, 30], [62, 0, 64, 10], [10, 10, 50, 20]]
    out, labels = clamp_and_sanitize(torch.tensor([[63.5, 0, 80, 10.0]]), torch.tensor([4]), 64)
    assert len(out) == 0 and len(labels) == 0  # 0.5 px left on the input: dropped


def _quad_image(size: int, quad: np.ndarray) -> torch.Tensor:
    img = Image.new("L", (size * 4, size * 4), 0)  # drawn 4x, averaged down: anti-aliased
    ImageDraw.Draw(img).polygon([(x * 4, y * 4) for x, y in quad], fill=255)
    a = np.asarray(img, np.float32).reshape(size, 4, size, 4).mean((1, 3)) / 255
    return torch.from_numpy(a)[None]


@pytest.mark.parametrize("seed", range(4))
def test_augmentation_keeps_each_box_on_its_vertebra(seed):
    """A bright tilted quad (a vertebra) and its corners go through the landmark task's
    augmentation (rotation, shift, scale, flip); the box of the augmented corners is the
    bounding box of the quad's pixels afterwards, within a pixel."""
    torch.manual_seed(seed)
    s = 96
    quad = np.array([[30, 30], [62, 24], [34, 58], [66, 52]], np.float32)  # TL, TR, BL, BR
    ring = quad[[0, 1, 3, 2]]
    augment = LandmarkAugment(s, {"rotation": 25, "translate": 0.1, "scale": [0.8, 1.2],
                                  "hflip": 0.5, "brightness": 0, "contrast": 0},
                              perm=np.array([1, 0, 3, 2]))  # fmt: skip
    image, points, visible = augment(_quad_image(s, ring), torch.from_numpy(quad), torch.ones(4))
    boxes, _ = boxes_from_corners(points, torch.tensor([[0, 1, 2, 3]]))
    ys, xs = np.nonzero(image[0].numpy() > 0.5)
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel edges
    assert np.allclose(boxes[0].numpy(), seen, atol=1.0), (boxes, seen)


def test_batches_carry_boxes_in_input_and_film_pixels(tmp_path):
    dm = BoxDataModule(dataset="phantom", image_size=64, batch_size=4, num_workers=0,
                       phantom={"n": 12, "size": [128, 64], "vertebrae": VERTEBRAE,
                                "cache": str(tmp_path)})  # fmt: skip
    dm.setup()
    assert dm.box_names == [f"V{i}" for i in range(1, VERTEBRAE + 1)]
    batch = next(iter(dm.val_dataloader()))
    for k in range(len(batch["path"])):
        assert batch["box_labels"][k].tolist() == list(range(1, VERTEBRAE + 1))
        assert batch["box_labels_px"][k].tolist() == list(range(1, VERTEBRAE + 1))
        # no augmentation in validation: input boxes are the film's boxes through the letterbox
        corners = to_input(batch["boxes_px"][k].reshape(-1, 2), batch["scale"][k],
                           batch["offset"][k]).reshape(-1, 4)  # fmt: skip
        assert torch.allclose(batch["boxes"][k], corners, atol=1e-4)
        back = boxes_to_original(batch["boxes"][k], batch["scale"][k], batch["offset"][k])
        assert torch.allclose(back, batch["boxes_px"][k], atol=1e-3)
    with pytest.raises(ValueError, match="no vertebrae"):
        BoxDataModule(root=str(tmp_path), dataset="hand_dha")


# -- the metric ----------------------------------------------------------------------------
def test_map_is_one_for_perfect_boxes_and_lower_for_a_shifted_one():
    truth = [{"boxes": torch.tensor([[10.0, 10, 30, 25], [12, 30, 32, 46]]),
              "labels": torch.tensor([1, 2])}]  # fmt: skip
    perfect = [{**truth[0], "scores": torch.tensor([0.9, 0.8])}]
    names = ["T1", "T2"]
    m, m50 = box_metric(), box_metric([0.5])
    m.update(perfect, truth)
    m50.update(perfect, truth)
    v = map_values(m.compute(), m50.compute(), names, "test")
    assert v["test/map"] == pytest.approx(1.0) and v["test/map_50"] == pytest.approx(1.0)
    assert v["test/ap/T2"] == pytest.approx(1.0) and v["test/ap_50/T1"] == pytest.approx(1.0)
    # T2 shifted by 5 px of its 16: IoU 220 / 420 = 0.52, found at 0.5 only (1 of 10 IoUs)
    shifted = [{"boxes": torch.tensor([[10.0, 10, 30, 25], [12, 35, 32, 51]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]  # fmt: skip
    m, m50 = box_metric(), box_metric([0.5])
    m.update(shifted, truth)
    m50.update(shifted, truth)
    v = map_values(m.compute(), m50.compute(), names, "val")
    assert v["val/ap_50/T2"] == pytest.approx(1.0) and v["val/ap/T2"] == pytest.approx(0.1)
    assert v["val/ap/T1"] == pytest.approx(1.0) and v["val/map_50"] == pytest.approx(1.0)


# -- the network ---------------------------------------------------------------------------
def test_fcos_on_a_timm_backbone_trains_and_detects_on_grey_input():
    net, source = build_box_network("resnet18", 3, image_size=64, width=64)
    assert source["kind"] == "random"
    x = torch.randn(2, 1, 64, 64)  # one channel: the backbone takes it (in_chans=1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 25]]), "labels": torch.tensor([2])}, empty]
    losses = net.train()(x, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    found = net.eval()(x)
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4
    assert (found[0]["boxes"] >= 0).all() and (found[0]["boxes"] <= 64).all()
    with pytest.raises(ValueError, match="strides"):
        build_box_network("vit_tiny_patch16_224", 3, image_size=64)


# -- the task end to end -------------------------------------------------------------------
def overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny box run: 64 synthetic 4-vertebra spines at 96 px, random resnet18."""
    return [
        "task=boxes",
        "debug=tiny",
        "data.dataset=phantom",
        "data.phantom.n=64",
        "data.phantom.size=[128,64]",
        f"data.phantom.vertebrae={VERTEBRAE}",
        f"data.phantom.cache={cache}",
        "data.image_size=96",
        "data.batch_size=8",
        "data.augment.rotation=5",
        "model.backbone=resnet18",
        "model.fpn_width=64",
        "model.optimizer.lr=0.001",
        f"paths.output_dir={tmp}",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("boxes")
    cache = tmp_path_factory.mktemp("phantoms")
    cfg = compose_config("train", overrides(tmp, cache, "trainer.max_epochs=12"))
    metrics = train(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    return {"dir": tmp, "metrics": metrics, "dm": dm}


def test_training_writes_the_run_files_and_learns_the_boxes(trained):
    out, metrics = trained["dir"], trained["metrics"]
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("map", "map_50", "map_75", "ap_50/V1", "ap/V4"):
        assert np.isfinite(saved[f"test/{name}"]), name
        assert f"val/{name}" in saved, name
    assert saved["val/map_50_best"] == pytest.approx(metrics["val/map_50_best"])
    # untrained FCOS scores about 0 here; these 12 tiny epochs reached 1.00 (mAP@[.5:.95] 0.56)
    assert saved["test/map_50"] > 0.8, saved["test/map_50"]
    card = json.loads((out / "checkpoints" / "model_card.json").read_text())
    assert card["box_names"] == [f"V{i}" for i in range(1, VERTEBRAE + 1)]
    assert "not lesions" in card["task"]
    rows = list(csv.DictReader((out / "test_predictions.csv").open()))
    assert rows and {"path", "boxes", "true_boxes", "found_50", "n_true"} <= set(rows[0])
    assert all(int(r["n_true"]) == VERTEBRAE for r in rows)


def test_python_api_returns_boxes_in_the_films_pixels(trained, tmp_path):
    model = regionnet.load_model(trained["dir"] / "checkpoints" / "best.ckpt")
    assert type(model).__name__ == "BoxPredictor" and model.box_names[0] == "V1"
    dm = trained["dm"]
    path = dm.root / dm.split_frame("test")["path"].iloc[0]
    pixels = np.asarray(Image.open(path).convert("L"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    a, b, c = model.predict([path, pixels, broken])
    assert a.ok and a.boxes and a.probabilities == {} and a.landmarks is None
    assert [d["box"] for d in a.boxes] == [d["box"] for d in b.boxes]  # a path = its pixels
    h, w = pixels.shape
    for d in a.boxes:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert d["label"] in model.box_names and 0 <= d["score"] <= 1
    assert [d["score"] for d in a.boxes] == sorted((d["score"] for d in a.boxes), reverse=True)
    assert not c.ok and c.status.startswith("error:") and c.boxes == []
    with pytest.raises(ValueError, match="no thresholds"):
        regionnet.load_model(trained["dir"] / "checkpoints" / "best.ckpt", thresholds=0.5)


def test_regionnet_predict_writes_boxes_per_film_and_overlays(trained, tmp_path):
    from regionnet.predict import predict

    dm = trained["dm"]
    films = tmp_path / "films"
    films.mkdir()
    for rel in dm.split_frame("test")["path"].iloc[:3]:
        (films / Path(rel).name).write_bytes((dm.root / rel).read_bytes())
    (films / "broken.png").write_bytes(b"\x89PNG but not really")
    output, maps = tmp_path / "boxes.csv", tmp_path / "maps"
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={trained['dir'] / 'checkpoints' / 'best.ckpt'}",
            f"input={films}",
            f"output={output}",
            "cam=true",
            f"cam_dir={maps}",
            "num_workers=0",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    summary = predict(cfg)
    assert summary["ok"] == 3 and summary["errors"] == 1 and summary["overlays"] == 3
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0]) == ["path", "status", "boxes", "model_id"]
    good = [r for r in rows if r["status"] == "ok"]
    for r in good:
        boxes = json.loads(r["boxes"])
        assert boxes and set(boxes[0]) == {"label", "score", "box"} and len(boxes[0]["box"]) == 4
    assert [r for r in rows if r["path"].endswith("broken.png")][0]["status"].startswith("error")
    assert len(list(maps.glob("*.boxes.png"))) == 3


@pytest.mark.parametrize(
    "extra",
    [
        ["task=boxes", "model=dsnt"],  # box data, landmark heads
        ["task=landmarks", "model=fcos"],  # landmark data, box heads
    ],
)
def test_a_box_model_without_box_data_is_named(extra, tmp_path):
    cfg = compose_config(
        "train",
        ["debug=tiny", "data.dataset=phantom", f"data.phantom.cache={tmp_path}",
         "data.phantom.n=8", f"paths.output_dir={tmp_path}", *extra],
    )  # fmt: skip
    dm = build_datamodule(cfg)
    with pytest.raises(ValueError, match="task=boxes"):
        build_model(cfg, dm)


# -- real films ----------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_spine_films_give_17_vertebra_boxes_on_the_film(shared_data):
    root = shared_data / "landmarks"
    if not (root / "landmarks.json").is_file():
        pytest.skip(f"real radiographs not found at {root} (../shared/data/landmarks)")
    dm = BoxDataModule(root=str(root), dataset="spine_aasce", limit=24, image_size=128,
                       batch_size=8, num_workers=0)  # fmt: skip
    dm.setup()
    assert dm.box_names == [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
    batch = next(iter(dm.val_dataloader()))
    rows = dm.split_frame("val").index[batch["index"].numpy()]
    for k, row in enumerate(rows):
        hidden = {i for i in range(17) if dm.hidden[row, 4 * i : 4 * i + 4].all()}
        labels = batch["box_labels_px"][k].tolist()
        assert labels == [i + 1 for i in range(17) if i not in hidden]  # 17 but the hidden
        assert batch["box_labels"][k].tolist() == labels
        w, h = batch["size"][k].tolist()
        b = batch["boxes_px"][k]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all()
        assert (b[:, 3] <= h).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        # head to foot: box centres go down the film
        assert (b[:, 1:4:2].mean(1).diff() > 0).all()
        scale, ox, oy = letterbox_params(w, h, 128)
        assert torch.allclose(
            batch["boxes"][k],
            to_input(b.reshape(-1, 2), torch.tensor(scale), torch.tensor([ox, oy])).reshape(-1, 4),
            atol=1e-3,
        )
    train_batch = next(iter(dm.train_dataloader()))  # augmented: boxes on the input
    for b in train_batch["boxes"]:
        assert len(b) and (b >= 0).all() and (b <= 128).all()


def test_box_evaluation_reports_map_per_level_and_time_per_film(trained, tmp_path):
    from regionnet.evaluate import evaluate

    ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}",
                                  "num_workers=0", "trainer.accelerator=cpu"])  # fmt: skip
    result = evaluate(cfg)  # regionnet-eval hands box checkpoints to evaluate_boxes
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/map_50"] == pytest.approx(trained["metrics"]["test/map_50"], abs=1e-6)
    assert set(saved["per_level"]) == {f"V{i}" for i in range(1, VERTEBRAE + 1)}
    assert saved["test/films"] == len(trained["dm"].split_frame("test"))
    assert saved["test/seconds_per_film"] > 0 and "not lesions" in result["task"]
    assert (tmp_path / "ap_by_level.png").is_file()
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == saved["test/films"] and rows[0]["split"] == "test"


def test_box_model_exports_to_onnx_with_its_post_processing(trained, tmp_path):
    """regionnet-export on a box checkpoint: one ONNX graph with decoding, threshold and NMS;
    onnxruntime gives PyTorch's detections on a held-out phantom film; the sidecar names the
    classes and the letterbox; other formats and int8 are refused with the fix."""
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (export extra)")
    import onnxruntime as ort

    from regionnet.export import export

    ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    out = tmp_path / "boxes.onnx"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output={out}"]))
    meta = json.loads(out.with_name("boxes.onnx.json").read_text())
    assert meta["task"] == "boxes" and meta["box_names"] == [f"V{i}" for i in range(1, 5)]
    assert sum(meta["check_detections"]) > 0 and meta["check_max_abs_diff"] <= 1e-4
    assert "not lesions" in meta["note"] and meta["input"]["shape"] == [1, 1, 96, 96]
    # an unseen phantom spine through the file: the detections BoxNet.forward gives
    from regionnet.data.transforms import eval_transform
    from regionnet.landmarks.infer import prepare
    from regionnet.landmarks.phantom import render_spine

    model = regionnet.load_model(ckpt).model
    pixels, _ = render_spine(seed=123, size=(128, 64), vertebrae=VERTEBRAE)
    x = prepare(pixels, eval_transform(model), 96)["image"][None]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)[0]
    assert len(boxes) == len(want["boxes"]) >= VERTEBRAE - 1
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, want["scores"].numpy(), atol=1e-5)
    assert labels.tolist() == want["labels"].tolist()
    for bad, match in (("format=torchscript", "ONNX only"), ("quantize=int8", "region models")):
        with pytest.raises(ValueError, match=match):
            export(compose_config("export", [f"ckpt_path={ckpt}", f"output={tmp_path / 'b.onnx'}",
                                             bad]))  # fmt: skip
    assert not (tmp_path / "b.onnx").exists()


def test_a_two_step_landmark_model_takes_step_2_crops_from_the_box_model(trained, tmp_path):
    """refine_detector=<box checkpoint> through the API, regionnet-predict and regionnet-eval:
    a tiny two-step landmark model on the same phantoms and input size crops around the
    detector's vertebra boxes; rows name both models."""
    from regionnet.evaluate import evaluate
    from regionnet.landmarks.phantom import render_spine
    from regionnet.predict import predict

    box_ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    run = tmp_path / "landmarks"
    train(compose_config("train", [
        "task=landmarks", "debug=tiny", "data.dataset=phantom", "data.phantom.n=24",
        "data.phantom.size=[128,64]", f"data.phantom.vertebrae={VERTEBRAE}",
        f"data.phantom.cache={tmp_path / 'phantoms'}", "data.image_size=96",
        "data.batch_size=8", "model.backbone=resnet18", "model.head_width=32",
        "model.refine=true", "model.refine_size=32", "data.detail_size=null",
        f"paths.output_dir={run}",
    ]))  # fmt: skip
    ckpt = run / "checkpoints" / "best.ckpt"
    film = tmp_path / "film.png"
    pixels, _ = render_spine(seed=99, size=(128, 64), vertebrae=VERTEBRAE)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(film)

    plain = regionnet.load_model(ckpt).predict(film)[0]
    guided = regionnet.load_model(ckpt, refine_detector=box_ckpt)
    assert guided.model.detector is not None
    got = guided.predict(film)[0]
    assert len(got.landmarks) == len(plain.landmarks) == 4 * VERTEBRAE
    assert got.landmarks != plain.landmarks  # other crops, other step-2 points
    with pytest.raises(ValueError, match="refine_detector is for two-step landmark"):
        regionnet.load_model(box_ckpt, refine_detector=box_ckpt)

    out = tmp_path / "rows.csv"
    summary = predict(compose_config("predict", [
        f"ckpt_path={ckpt}", f"input={film}", f"output={out}", f"refine_detector={box_ckpt}",
        "num_workers=0", "accelerator=cpu",
    ]))  # fmt: skip
    assert summary["ok"] == 1 and "+" in summary["model_id"]
    result = evaluate(compose_config("eval", [
        f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'eval'}", "num_workers=0",
        "trainer.accelerator=cpu", "bootstrap.resamples=20", f"refine_detector={box_ckpt}",
    ]))  # fmt: skip
    assert result["refine_detector"] == str(box_ckpt) and result["test/films"] > 0
