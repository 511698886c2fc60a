"""Composed models (task=multi, regionnet/compose): region heads with landmark and vertebra box
parts on one timm backbone, one checkpoint, one forward pass per film, fed by region films and
a landmark set in one table with the absent targets masked. Unit checks of the seams (one
pass, pooled features unchanged, masked losses), then the task end to end on phantoms (region
phantoms + synthetic 4-vertebra spines): train(cfg) learns every head type, and the run's
checkpoint goes through the Python API, regionnet-predict and regionnet-eval; then the
refusals, and the real films where ../shared is present."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import regionnet
from regionnet.compose.data import MultiDataModule
from regionnet.compose.module import MultiNet
from regionnet.config import compose_config
from regionnet.run import build_datamodule, build_model
from regionnet.train import train

VERTEBRAE = 4
NAMES = [f"V{v}_{c}" for v in range(1, VERTEBRAE + 1)
         for c in ("top_left", "top_right", "bottom_left", "bottom_right")]  # fmt: skip
LEVELS = [f"V{v}" for v in range(1, VERTEBRAE + 1)]


def tiny_net(**extra) -> MultiNet:
    """A random resnet18 with region heads and both parts, 64 px input."""
    kwargs = {
        "backbone": "resnet18",
        "pretrained": False,
        "image_size": 64,
        "parts": {"landmarks": {"width": 32}, "boxes": {"width": 64}},
        "landmark_names": NAMES,
        "skeleton": "vertebrae",
        "box_names": LEVELS,
        **extra,
    }
    return MultiNet(**kwargs).eval()


def batch_of(n: int, with_points: list[bool]) -> dict:
    """A batch as MultiDataModule gives it: films with points (a box per vertebra) or none."""
    torch.manual_seed(0)
    k = len(NAMES)
    points = torch.rand(n, k, 2) * 1.6 - 0.8
    has = torch.tensor(with_points)
    boxes = [torch.tensor([[10.0 + 8 * v, 10, 20 + 8 * v, 30] for v in range(VERTEBRAE)])
             if h else torch.zeros(0, 4) for h in with_points]  # fmt: skip
    labels = [torch.arange(1, VERTEBRAE + 1) if h else torch.zeros(0, dtype=torch.long)
              for h in with_points]  # fmt: skip
    return {
        "image": torch.randn(n, 1, 64, 64),
        "labels": torch.zeros(n, 5),
        "points": points,
        "points_px": torch.where(has[:, None, None], (points + 1) * 32, torch.nan),
        "visible": has[:, None].expand(n, k).clone(),
        "has_points": has,
        "scale": torch.ones(n, 2),
        "offset": torch.zeros(n, 2),
        "size": torch.full((n, 2), 64),
        "cobb": torch.full((n, 3), torch.nan),
        "boxes": boxes,
        "box_labels": labels,
        "path": [f"film{i}" for i in range(n)],
    }


# -- the seams ---------------------------------------------------------------------------------
def test_one_backbone_pass_gives_the_region_logits_and_every_parts_output():
    net = tiny_net()
    calls = []
    stem = net.net.backbones["shared"].conv1  # every pass of the trunk goes through its stem
    stem.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, finding_logits, parts = net.forward_all(x)
        assert len(calls) == 1 and set(parts) == {"landmarks", "boxes"}
        # the pooled features of the one pass are the region task's own: same logits
        assert torch.allclose(logits, net.net.all_logits(x)[0], atol=1e-6)
        assert finding_logits.shape == (2, 0)
        calls.clear()
        found = net.predict_batch(batch_of(2, [True, False]))
    assert len(calls) == 1  # predict: one pass for regions, points and boxes
    assert found["probs"].shape == (2, 5) and found["points"].shape == (2, len(NAMES), 2)
    assert len(found["boxes"]) == 2 and found["has_points"].tolist() == [True, False]


def test_finding_heads_read_the_same_pass_as_the_region_heads_and_the_parts():
    knee_oa = {"region": "knee", "from": "finding", "positive": ["KL2", "KL3", "KL4"]}
    net = tiny_net(findings={"knee_oa": knee_oa}).train()
    batch = batch_of(3, [True, False, False])
    batch["finding_labels"] = torch.tensor([[0.0], [1.0], [0.0]])
    batch["finding_mask"] = torch.tensor([[False], [True], [False]])  # one knee film labelled
    loss, terms = net.training_loss(batch)
    assert {"finding_loss", "loss_regions", "loss_landmarks", "loss_boxes"} <= set(terms)
    with torch.no_grad():
        _, finding_logits, _ = net.eval().forward_all(batch["image"])
        assert finding_logits.shape == (3, 1)
        found = net.predict_batch(batch)
    assert found["finding_probs"].shape == (3, 1) and found["points"].shape[0] == 3


def test_a_film_without_points_gives_the_parts_no_loss_and_no_gradient():
    net = tiny_net().train()
    batch = batch_of(2, [False, False])
    loss, terms = net.training_loss(batch)
    assert float(terms["loss_landmarks"]) == 0.0 and "loss_boxes" not in terms
    loss.backward()
    for name, p in net.parts.named_parameters():
        assert p.grad is None or float(p.grad.abs().sum()) == 0.0, name
    assert any(float(p.grad.abs().sum()) > 0 for p in net.net.heads.parameters())
    # one film with points: the parts learn from it alone
    net.zero_grad()
    loss, terms = net.training_loss(batch_of(2, [True, False]))
    assert float(terms["loss_landmarks"]) > 0 and float(terms["loss_boxes"]) > 0
    loss.backward()
    head = net.parts["landmarks"].head.out[-1].weight
    assert float(head.grad.abs().sum()) > 0


def test_the_landmark_loss_of_a_mixed_batch_is_that_of_its_films_with_points():
    net = tiny_net()
    mixed = batch_of(3, [True, False, True])
    with torch.no_grad():
        _, _, outs = net.forward_all(mixed["image"])
        part = net.parts["landmarks"]
        mixed_loss, _ = part.loss(outs["landmarks"], mixed)
        keep = [0, 2]
        alone = {k: mixed[k][keep] for k in ("points", "visible", "has_points")}
        coords, heat = outs["landmarks"]
        alone_loss, _ = part.loss((coords[keep], heat[keep]), alone)
    assert float(mixed_loss) == pytest.approx(float(alone_loss), rel=1e-6)


def test_a_film_in_both_data_sets_is_joined_and_keeps_its_patients_region_split():
    import pandas as pd

    from regionnet.compose.data import join_same_films

    regions = pd.DataFrame({
        "path": ["/r/set/hand/1.png", "/r/set/hand/2.png", "/r/other/knee/1.png"],
        "region": ["hand", "hand", "knee"], "label_hand": [1, 1, 0], "label_knee": [0, 0, 1],
        "patient_id": ["p1", "p2", "k1"], "split": ["test", "train", "val"],
        "source": ["set", "set", "other"], "same_film": ["", "", ""],
    })  # fmt: skip
    lm = pd.DataFrame({
        "path": ["/l/set/1.jpg", "/l/set/9.jpg", "/l/set/5.jpg"],
        "region": ["hand"] * 3, "label_hand": [1] * 3, "label_knee": [0] * 3,
        "patient_id": ["p1", "p1", "p5"], "split": ["train", "val", "val"],
        "source": ["set"] * 3, "same_film": ["", "", ""],
    })  # fmt: skip
    r, l2 = join_same_films(regions, lm, "set", ["label_hand", "label_knee"])
    assert list(r["path"]) == ["/r/set/hand/2.png", "/r/other/knee/1.png"]  # 1.png joined
    assert list(l2["same_film"]) == ["/r/set/hand/1.png", "", ""]
    assert list(l2["split"]) == ["test", "test", "val"]  # p1's region split; p5 keeps its own


def test_landmark_repeat_shows_each_training_landmark_film_k_times(tmp_path):
    base = overrides(tmp_path, tmp_path / "ph")
    once = build_datamodule(compose_config("train", base))
    thrice = build_datamodule(compose_config("train", [*base, "data.landmark_repeat=3"]))
    n, m = (len(dm.train_dataloader().dataset) for dm in (once, thrice))
    spines = int((once.split_frame("train")["kind"] == "landmarks").sum())
    assert m == n + 2 * spines and spines > 0
    assert len(thrice.val_dataloader().dataset) == len(once.val_dataloader().dataset)
    with pytest.raises(ValueError, match="landmark_repeat"):
        build_datamodule(compose_config("train", [*base, "data.landmark_repeat=0"]))


def test_films_without_points_take_the_region_augmentation_with_its_flips(tmp_path):
    cfg = compose_config("train", overrides(tmp_path, tmp_path / "ph"))
    dm = build_datamodule(cfg)
    dm.setup()
    ds = dm.train_dataloader().dataset
    region = next(i for i in range(len(ds)) if not ds.has_points[i])
    spine = next(i for i in range(len(ds)) if ds.has_points[i])
    assert ds.augment_of(region) is ds.region_augment and ds.region_augment.hflip == 0.5
    assert ds.augment_of(spine) is ds.augment  # the spine set's own (flips with its pairs)
    assert dm.val_dataloader().dataset.augment_of(region) is None  # no augmentation in val


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"parts": {"wings": {}}}, "unknown part"),
        ({"parts": {"landmarks": {"widht": 32}}}, "unknown settings"),
        ({"parts": {"landmarks": {"weight": -1}}}, "weight"),
        ({"parts": {}}, "declares no part"),
        ({"shared_backbone": False}, "shared backbone"),
        ({"box_names": []}, "box names"),
        ({"landmark_region": "spine"}, "no head"),
    ],
)
def test_a_wrong_part_declaration_is_refused_with_the_key(extra, match):
    with pytest.raises(ValueError, match=match):
        tiny_net(**extra)


# -- the task end to end on phantoms -----------------------------------------------------------
def overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    """Region phantoms (12 per region and per other region) and 32 synthetic 4-vertebra spines
    (`other` for every region head) at 64 px, random resnet18, landmark and box parts."""
    return [
        "task=multi",
        "debug=tiny",
        "data@data.regions=phantom",
        "data.regions.phantom.per_region=12",
        "data.landmarks.dataset=phantom",
        "data.landmark_region=null",
        "data.landmarks.phantom.n=32",
        "data.landmarks.phantom.size=[128,64]",
        f"data.landmarks.phantom.vertebrae={VERTEBRAE}",
        f"data.landmarks.phantom.cache={cache}",
        "data.image_size=64",
        "data.batch_size=8",
        "model.backbone=resnet18",
        "model.parts.landmarks.width=32",
        "model.parts.boxes={width: 64}",
        "model.optimizer.lr=0.002",
        f"paths.output_dir={tmp}",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    cache = tmp_path_factory.mktemp("phantoms")
    cfg = compose_config("train", overrides(tmp, cache, "trainer.max_epochs=8"))
    metrics = train(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    return {"dir": tmp, "metrics": metrics, "dm": dm, "cfg": cfg}


def test_one_run_trains_region_heads_landmarks_and_boxes_on_one_backbone(trained):
    out, metrics, dm = trained["dir"], trained["metrics"], trained["dm"]
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"]
    # one backbone in the one checkpoint; the parts read it (no backbone of their own)
    assert {k.split(".")[2] for k in keys if k.startswith("net.backbones.")} == {"shared"}
    assert not [k for k in keys if k.startswith("parts.") and "conv1" in k]  # no stem there
    assert any(k.startswith("parts.landmarks.head.") for k in keys)
    assert any(k.startswith("parts.boxes.detector.head.") for k in keys)
    saved = json.loads((out / "metrics.json").read_text())
    # untrained: region AUROC ~0.5, landmark error ~140 % of a vertebra, box mAP@0.5 ~0;
    # these 8 tiny epochs reached 0.91, 27 % and 0.38
    assert saved["test/auroc_mean"] > 0.75, saved["test/auroc_mean"]
    assert saved["test/landmarks/mre_pct"] < 60, saved["test/landmarks/mre_pct"]
    assert saved["test/boxes/map_50"] > 0.1, saved["test/boxes/map_50"]
    assert saved["val/auroc_mean_best"] == pytest.approx(metrics["val/auroc_mean_best"])
    assert (out / "annotation_issues.csv").is_file()  # the landmark set's check, as its task
    split = list(csv.DictReader((out / "split.csv").open()))
    assert {r["kind"] for r in split} == {"regions", "landmarks"}
    spines = [r for r in split if r["kind"] == "landmarks"]
    assert len(spines) == 32 and {r["region"] for r in spines} == {"other"}
    card = json.loads((out / "checkpoints" / "model_card.json").read_text())
    assert set(card["parts"]) == {"landmarks", "boxes"}
    assert card["parts"]["boxes"]["classes"] == LEVELS and "not lesions" in card["parts"][
        "boxes"]["output"]  # fmt: skip
    assert card["parts"]["landmarks"]["metrics"]["test/landmarks/mre_pct"] == pytest.approx(
        saved["test/landmarks/mre_pct"]
    )
    rows = list(csv.DictReader((out / "test_predictions.csv").open()))
    assert len(rows) == len(dm.split_frame("test"))
    assert {"p_knee", "region", "landmarks", "boxes", "mre_px"} <= set(rows[0])
    for r in rows:  # the parts' cells on the spines (the films with truth) called unknown
        spine = r["path"].endswith(".png")  # region phantoms are phantom:// records
        assert bool(r["landmarks"]) == (spine and r["region"] == "unknown"), r
        assert bool(r["mre_px"]) == spine


def test_the_python_api_gives_regions_and_the_parts_from_one_model(trained, tmp_path):
    ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    model = regionnet.load_model(ckpt)
    assert type(model).__name__ == "MultiPredictor" and model.parts == ("landmarks", "boxes")
    spine = trained["dm"].split_frame("test").query("kind == 'landmarks'")["path"].iloc[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    from PIL import Image

    pixels = np.asarray(Image.open(spine).convert("L"))
    a, b, c = model.predict([spine, pixels, broken])
    assert a.ok and set(a.probabilities) == set(regionnet.REGIONS)
    assert a.probabilities == pytest.approx(b.probabilities)  # a path = its pixels
    assert not c.ok and c.status.startswith("error:") and c.landmarks is None
    # the parts apply to films no region head calls (a spine set has no region head)
    never = regionnet.load_model(ckpt, thresholds=1.0).predict_one(spine)
    assert never.region == "unknown" and len(never.landmarks) == len(NAMES) and never.boxes
    h, w = pixels.shape
    xy = np.array(never.landmarks)
    assert (xy[:, 0] > -0.1 * w).all() and (xy[:, 0] < 1.1 * w).all()
    assert (xy[:, 1] > -0.1 * h).all() and (xy[:, 1] < 1.1 * h).all()
    assert {d["label"] for d in never.boxes} <= set(LEVELS)
    called = regionnet.load_model(ckpt, thresholds=0.0).predict_one(spine)
    assert called.region in regionnet.REGIONS and called.landmarks is None and called.boxes == []
    assert called.probabilities == pytest.approx(never.probabilities)


def test_regionnet_predict_writes_region_and_part_columns_per_film(trained, tmp_path):
    from regionnet.predict import predict

    dm = trained["dm"]
    films = tmp_path / "films"
    films.mkdir()
    spines = dm.split_frame("test").query("kind == 'landmarks'")["path"].iloc[:3]
    for p in spines:
        (films / Path(p).name).write_bytes(Path(p).read_bytes())
    (films / "broken.png").write_bytes(b"\x89PNG but not really")
    output = tmp_path / "multi.csv"
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={trained['dir'] / 'checkpoints' / 'best.ckpt'}",
            f"input={films}",
            f"output={output}",
            "num_workers=0",
            "threshold_override=1.0",  # no head calls a film: the parts apply to every one
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    summary = predict(cfg)
    assert summary["ok"] == 3 and summary["errors"] == 1 and summary["unknown"] == 3
    rows = list(csv.DictReader(output.open()))
    cols = list(rows[0])
    assert cols[:7] == ["path", "p_shoulder", "p_elbow", "p_hand", "p_pelvis", "p_knee", "region"]
    assert cols[-6:] == ["landmarks", "pt", "mt", "tl", "boxes", "model_id"]  # spines: angles
    for r in rows:
        if r["status"] != "ok":
            assert r["path"].endswith("broken.png") and r["landmarks"] == ""
            continue
        assert r["region"] == "unknown" and len(json.loads(r["landmarks"])) == len(NAMES)
        assert {d["label"] for d in json.loads(r["boxes"])} <= set(LEVELS)
    # resume: the part columns are part of the file's header check
    cfg.resume = True
    assert predict(cfg)["resumed"] == 4


def test_regionnet_eval_reports_every_head_type_as_the_run_did(trained, tmp_path):
    from regionnet.evaluate import evaluate

    ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}",
                                  "num_workers=0", "trainer.accelerator=cpu",
                                  "bootstrap.resamples=50"])  # fmt: skip
    result = evaluate(cfg)
    reported = trained["metrics"]
    for key in ("test/auroc_mean", "test/landmarks/mre_pct", "test/boxes/map_50"):
        assert result[key] == pytest.approx(reported[key], rel=1e-4, abs=1e-6), key
    lo, hi = result["test/landmarks/mre_pct_ci"]
    assert lo <= result["test/landmarks/mre_pct"] <= hi
    assert "test/auroc_ci/knee" in result and set(result["landmarks_per_level"]) == set(LEVELS)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == "multi" and saved["parts"] == ["landmarks", "boxes"]
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == len(trained["dm"].split_frame("test"))
    val = evaluate(compose_config("eval", [f"ckpt_path={ckpt}", "split=val",
                                           f"paths.output_dir={tmp_path / 'val'}",
                                           "num_workers=0", "bootstrap.resamples=20"]))  # fmt: skip
    assert "val/auroc_mean" in val and "val/landmarks/mre_pct" in val
    assert not [k for k in val if k.startswith("test/")]


def test_the_region_loader_names_the_composed_checkpoint(trained):
    from regionnet.model.module import load_regionnet

    with pytest.raises(ValueError, match="task=multi"):
        load_regionnet(trained["dir"] / "checkpoints" / "best.ckpt")


# -- refusals ----------------------------------------------------------------------------------
def test_a_landmark_region_without_a_head_and_a_region_model_are_refused(tmp_path):
    base = overrides(tmp_path, tmp_path / "ph")
    cfg = compose_config("train", [*base, "data.landmark_region=spine"])
    with pytest.raises(ValueError, match="landmark_region"):
        build_datamodule(cfg)
    cfg = compose_config("train", [*base, "model._target_=regionnet.model.module.RegionNet"])
    with pytest.raises(ValueError, match="task=multi"):
        build_model(cfg, build_datamodule(cfg))


def test_region_and_landmark_films_must_share_one_input(tmp_path):
    cfg = compose_config(
        "train", [*overrides(tmp_path, tmp_path / "ph"), "data.landmarks.image_size=96"]
    )
    with pytest.raises(ValueError, match="one input"):
        build_datamodule(cfg)


# -- real films --------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_region_films_and_hand_landmarks_share_one_table(shared_data, tmp_path):
    root = shared_data / "landmarks"
    manifest = shared_data / "radiographs" / "manifest.csv"
    if not (root / "landmarks.json").is_file() or not manifest.is_file():
        pytest.skip(f"real radiographs not found under {shared_data} (../shared/data)")
    cfg = compose_config(
        "train",
        ["task=multi", "debug=tiny", "data.image_size=64", "data.batch_size=8",
         "data.landmarks.limit=24", f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    dm = build_datamodule(cfg)
    assert isinstance(dm, MultiDataModule)
    dm.setup()
    hands = dm.records[dm.records["kind"] == "landmarks"]
    assert len(hands) == 24 and set(hands["region"]) == {"hand"}
    others = hands[["label_knee", "label_elbow"]].to_numpy()
    assert (hands["label_hand"] == 1).all() and not others.any()
    # the radiographs hold PNG copies of the hand_dha films: each film once, as the landmark
    # film, in its patient's region split; the 85 other hand_dha copies stay region films
    assert all(Path(c).stem == Path(p).stem for p, c in zip(hands["path"], hands["same_film"]))
    copies = dm.records[(dm.records["source"] == "hand_dha") & (dm.records["kind"] == "regions")]
    assert len(copies) == 109 - 24
    assert not {Path(p).stem for p in copies["path"]} & {Path(p).stem for p in hands["path"]}
    assert (dm.records.groupby("patient_id")["split"].nunique() == 1).all()
    assert dm.landmark_names[:1] == ["p01"] and dm.box_names == []  # hands: points, no boxes
    batch = next(iter(dm.val_dataloader()))
    has = batch["has_points"]
    assert batch["image"].shape[1:] == (1, 64, 64) and batch["labels"].shape[1] == 5
    # every film with points is a hand; films without have no visible point
    assert (batch["labels"][has, 2] == 1).all() and not batch["visible"][~has].any()
    model = build_model(cfg, dm)
    assert model.landmark_region == "hand" and "boxes" not in model.parts


def test_export_writes_one_graph_of_region_probabilities_and_landmarks(trained, tmp_path):
    """regionnet-export of a composed checkpoint: one ONNX graph, one backbone pass, region
    probabilities and landmark coordinates, the batch axis dynamic; onnxruntime gives what
    MultiNet's own pass gives; the sidecar says how to decode the points and that the boxes
    are left out; TorchScript and int8 are refused with the fix."""
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (export extra)")
    import onnxruntime as ort

    from regionnet.compose.infer import load_multi_model
    from regionnet.export import export

    ckpt = trained["dir"] / "checkpoints" / "best.ckpt"
    out = tmp_path / "multi.onnx"
    export(compose_config("export", [f"ckpt_path={ckpt}", f"output={out}"]))
    meta = json.loads(out.with_name("multi.onnx.json").read_text())
    assert meta["outputs"] == ["probs", "landmarks"] and meta["parts"] == ["landmarks", "boxes"]
    assert meta["landmarks"]["names"] == NAMES and "boxes" in meta["not_exported"]
    model = load_multi_model(ckpt)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        logits, _, parts = model.forward_all(x)
    probs, coords = ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})
    assert np.abs(probs - torch.sigmoid(logits).numpy()).max() < 1e-4
    assert np.abs(coords - parts["landmarks"][0].numpy()).max() < 1e-4
    for bad in ("format=torchscript", "quantize=int8"):
        cfg = compose_config("export", [f"ckpt_path={ckpt}", f"output={tmp_path / 'x'}", bad])
        with pytest.raises(ValueError, match="format=onnx, quantize=null"):
            export(cfg)
