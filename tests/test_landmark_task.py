"""The landmark task end to end through the real configs: `train(cfg)` with `task=landmarks`
on synthetic spines (phantoms with exact corners), the model learning, the Python API,
`regionnet-predict`, the two-step model, and wrong combinations of task, data and model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import regionnet
from regionnet.config import compose_config
from regionnet.data.dataset import loader_threads
from regionnet.landmarks.metrics import LandmarkMetrics
from regionnet.run import build_datamodule, build_model
from regionnet.train import train

VERTEBRAE = 4


def overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny landmark run: 64 synthetic 4-vertebra spines at 64 px, random resnet18."""
    return [
        "task=landmarks",
        "debug=tiny",
        "data.dataset=phantom",
        "data.phantom.n=64",
        "data.phantom.size=[128,64]",
        f"data.phantom.vertebrae={VERTEBRAE}",
        f"data.phantom.cache={cache}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.augment.rotation=5",
        "model.backbone=resnet18",
        "model.head_width=32",
        f"paths.output_dir={tmp}",
        *extra,
    ]


def mre_pct(model, dm) -> float:
    """Mean radial error in % of vertebra size of `model` on the test split."""
    metrics = LandmarkMetrics(dm.skeleton)
    model.eval()
    with torch.inference_mode():
        for batch in dm.test_dataloader():
            pred = model.to_original(model(batch["image"]), batch["scale"], batch["offset"])
            metrics.update(pred, batch["points_px"], batch["visible"])
    return metrics.compute_all("test")["test/mre_pct"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("landmarks")
    cache = tmp_path_factory.mktemp("phantoms")
    cfg = compose_config("train", overrides(tmp, cache, "trainer.max_epochs=8"))
    metrics = train(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    torch.manual_seed(0)
    untrained = mre_pct(build_model(cfg, dm), dm)
    return {"dir": tmp, "metrics": metrics, "untrained": untrained, "cache": cache, "dm": dm}


def test_training_writes_the_run_files_and_names_its_metrics(trained):
    out, metrics = trained["dir"], trained["metrics"]
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("mre_px", "mre_pct", "err_x_median_pct", "err_y_median_pct", "pck@2", "pck@5"):
        assert np.isfinite(saved[f"test/{name}"]), name
        assert f"val/{name}" in saved, name
    assert saved["val/mre_pct_best"] == pytest.approx(metrics["val/mre_pct_best"])
    assert (out / "checkpoints" / "best.ckpt").is_file()
    card = json.loads((out / "checkpoints" / "model_card.json").read_text())
    assert card["skeleton"] == "vertebrae" and len(card["landmarks"]) == 4 * VERTEBRAE
    with (out / "test_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(len(json.loads(r["landmarks"])) == 4 * VERTEBRAE for r in rows)
    assert {"path", "landmarks", "mre_px"} <= set(rows[0])


def test_the_model_learns_where_the_corners_are(trained):
    """A model that does not learn stays near its untrained error (about 200 % of the vertebra
    size on these phantoms); 8 tiny epochs bring it well below half of that."""
    untrained, learned = trained["untrained"], trained["metrics"]["test/mre_pct"]
    assert untrained > 100
    assert learned < 0.5 * untrained, (learned, untrained)


def test_python_api_returns_landmarks_in_the_films_pixels(trained, tmp_path):
    model = regionnet.load_model(trained["dir"] / "checkpoints" / "best.ckpt")
    assert type(model).__name__ == "LandmarkPredictor"
    dm = trained["dm"]
    path = dm.root / dm.split_frame("test")["path"].iloc[0]
    pixels = np.asarray(Image.open(path).convert("L"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    a, b, c = model.predict([path, pixels, broken])
    assert a.ok and a.landmarks is not None and len(a.landmarks) == 4 * VERTEBRAE
    assert np.allclose(a.landmarks, b.landmarks, atol=1e-3)  # a path and its pixels agree
    h, w = pixels.shape
    xy = np.asarray(a.landmarks)
    assert (xy[:, 0] > -0.25 * w).all() and (xy[:, 0] < 1.25 * w).all()
    assert (xy[:, 1] > -0.25 * h).all() and (xy[:, 1] < 1.25 * h).all()
    assert a.angles == {}  # Cobb angles need the whole 17-vertebra column
    assert not c.ok and c.status.startswith("error:") and c.landmarks is None
    with pytest.raises(ValueError, match="no thresholds"):
        regionnet.load_model(trained["dir"] / "checkpoints" / "best.ckpt", thresholds=0.5)


def test_two_step_model_trains_and_logs_step_one_apart(tmp_path):
    """Step 2 from the input itself (data.detail_size=null, as before detail images)."""
    cache = tmp_path / "phantoms"
    extra = ("model.refine=true", "model.refine_size=32", "data.detail_size=null")
    cfg = compose_config("train", overrides(tmp_path / "run", cache, *extra))
    metrics = train(cfg)
    assert np.isfinite(metrics["test/mre_pct"]) and np.isfinite(metrics["test/step1/mre_pct"])
    rows = list(csv.DictReader((tmp_path / "run" / "test_predictions.csv").open()))
    assert rows
    model = regionnet.load_model(tmp_path / "run" / "checkpoints" / "best.ckpt").model
    assert model.refiner is not None and model.detail_size is None


def test_two_step_model_starts_from_a_step_one_run(trained, tmp_path):
    """init_from=<step-1 best.ckpt>: the two-step run starts with step 1 trained (its network
    copied, step 2 fresh), so after one epoch its step 1 is far closer to the trained model's
    error than to an untrained one's; nothing fits -> refused; with ckpt_path -> refused."""
    from regionnet.model.checkpoint import init_from

    best = trained["dir"] / "checkpoints" / "best.ckpt"
    extra = ("model.refine=true", "model.refine_size=32", "data.detail_size=null")
    over = overrides(tmp_path / "run", trained["cache"], *extra)
    cfg = compose_config("train", over)
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg, dm)
    counts = init_from(model, best)
    assert counts["copied"] > 0 and counts["shape_differs"] == 0
    assert counts["not_in_checkpoint"] == len([k for k in model.state_dict() if "refiner" in k])
    step1 = regionnet.load_model(best).model
    own = model.state_dict()
    assert all(
        torch.equal(own[k], v) for k, v in step1.state_dict().items() if k.startswith("net.")
    )

    done = trained["metrics"]["test/mre_pct"]
    metrics = train(compose_config("train", [*over, f"init_from={best}"]))
    assert metrics["test/step1/mre_pct"] < (done + trained["untrained"]) / 2, (metrics, done)

    with pytest.raises(ValueError, match="none of its"):
        init_from(torch.nn.Linear(2, 2), best)
    with pytest.raises(FileNotFoundError, match="init_from="):
        init_from(model, tmp_path / "missing.ckpt")
    both = overrides(tmp_path / "both", trained["cache"], *extra)
    both = compose_config("train", [*both, f"init_from={best}", f"ckpt_path={best}"])
    with pytest.raises(ValueError, match="init_from= and ckpt_path="):
        train(both)


def test_two_step_model_with_detail_crops_end_to_end(tmp_path):
    """Step 2 crops from the 128 px detail image (the phantoms' own height; input 64 px):
    training, the checkpoint, the Python API and regionnet-predict (the same points as the
    data module's test batches, so inference makes the frame training saw), and an ONNX
    export whose parity check passes."""
    from regionnet.predict import predict

    cache = tmp_path / "phantoms"
    extra = ("model.refine=true", "model.refine_size=32", "data.detail_size=128")
    cfg = compose_config("train", overrides(tmp_path / "run", cache, *extra))
    assert cfg.data.detail is True and cfg.model.detail_size == 128
    metrics = train(cfg)
    assert np.isfinite(metrics["test/mre_pct"]) and np.isfinite(metrics["test/step1/mre_pct"])
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    api = regionnet.load_model(ckpt)
    assert api.model.detail_size == 128 and api.model.refiner is not None

    dm = build_datamodule(cfg)
    batch = next(iter(dm.test_dataloader()))
    assert batch["detail"].shape[-2:] == (128, 128)
    with torch.inference_mode():
        expected = api.model.predict_step(batch, 0)
    paths = [dm.root / p for p in batch["path"]]
    found = api.predict(paths)
    for k, film in enumerate(found):
        assert film.ok and np.allclose(film.landmarks, expected["points"][k], atol=1e-3)
    assert not torch.allclose(expected["points"], expected["step1_points"])

    output = tmp_path / "points.csv"
    summary = predict(compose_config("predict", [
        f"ckpt_path={ckpt}", f"input={paths[0].parent}", f"output={output}",
        f"paths.output_dir={tmp_path / 'predict'}", "accelerator=cpu",
    ]))  # fmt: skip
    assert summary["ok"] == len(list(paths[0].parent.glob("*.png")))
    # readers and threads by the region task's rule (num_workers/torch_threads null = auto)
    chosen = loader_threads(None, None)
    assert (summary["num_workers"], summary["torch_threads"]) == chosen
    rows = {Path(r["path"]).name: r for r in csv.DictReader(output.open())}
    assert {"landmarks", "step1_landmarks"} <= set(next(iter(rows.values())))
    for k, path in enumerate(paths):
        got = np.asarray(json.loads(rows[path.name]["landmarks"]))
        assert np.abs(got - expected["points"][k].numpy()).max() <= 0.06  # 0.1 px rounding

    pytest.importorskip("onnxruntime", reason="the ONNX parity check needs onnxruntime")
    from regionnet.export import export

    onnx_file = export(compose_config("export", [
        f"ckpt_path={ckpt}", f"output={tmp_path / 'm.onnx'}", f"paths.output_dir={tmp_path}",
    ]))  # fmt: skip
    meta = json.loads(onnx_file.with_name("m.onnx.json").read_text())
    assert meta["steps"] == 2 and meta["input_size"] == 128 and meta["check_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    "extra, match",
    [
        (["task=landmarks", "data=phantom"], "task=landmarks"),
        (["data=landmarks", "data.dataset=phantom"], "task=landmarks"),
    ],
)
def test_a_head_type_without_its_data_is_named(extra, match, tmp_path):
    cfg = compose_config("train", ["debug=tiny", f"paths.output_dir={tmp_path}", *extra])
    dm = build_datamodule(cfg)
    with pytest.raises(ValueError, match=match):
        build_model(cfg, dm)


def test_regionnet_predict_writes_points_per_film_and_overlays(trained, tmp_path):
    from regionnet.predict import predict

    dm = trained["dm"]
    films = tmp_path / "films"
    films.mkdir()
    for rel in dm.split_frame("test")["path"].iloc[:3]:
        (films / Path(rel).name).write_bytes((dm.root / rel).read_bytes())
    (films / "broken.png").write_bytes(b"\x89PNG but not really")
    output, maps = tmp_path / "points.csv", tmp_path / "maps"
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
    assert list(rows[0]) == ["path", "status", "landmarks", "model_id"]
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == 3 and all(len(json.loads(r["landmarks"])) == 16 for r in good)
    assert [r for r in rows if r["path"].endswith("broken.png")][0]["status"].startswith("error")
    assert len({r["model_id"] for r in rows}) == 1
    assert len(list(maps.glob("*.landmarks.png"))) == 3
