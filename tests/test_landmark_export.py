"""`regionnet-export` of a landmark checkpoint (`regionnet.landmarks.export`): ONNX files whose
coordinates match PyTorch's (both steps, RoiAlign in the graph), a sidecar whose pixel mapping
is the model's own, step 1 alone where step 2 cannot be exported, and a check that fails loudly."""

from __future__ import annotations

import json
import logging

import lightning
import numpy as np
import pytest
import torch

from regionnet.config import compose_config
from regionnet.data.transforms import eval_transform
from regionnet.export import export
from regionnet.landmarks import export as landmark_export
from regionnet.landmarks.coords import detail_to_input
from regionnet.landmarks.infer import film_transform, prepare
from regionnet.landmarks.module import LandmarkNet
from regionnet.landmarks.phantom import landmark_names, render_spine

onnx = pytest.importorskip(
    "onnx", reason="landmark ONNX export needs onnx: pip install 'regionnet[export]'"
)
ort = pytest.importorskip(
    "onnxruntime", reason="the ONNX parity check needs onnxruntime: pip install 'regionnet[export]'"
)

S = 64
D = 128  # the detail image of a two-step model that crops step 2 from one
VERTEBRAE = 3


def save_checkpoint(path, refine: bool, detail_size: int | None = None):
    """A random-init LandmarkNet saved as Lightning would (no Trainer), with a non-default
    intensity normalisation; its heads' last layer scaled up so the heatmaps are peaked and the
    points spread over the input (an untrained head puts every point near the centre)."""
    torch.manual_seed(0)
    model = LandmarkNet(
        landmark_names=landmark_names(VERTEBRAE),
        skeleton="vertebrae",
        dataset="phantom",
        backbone="resnet18",
        head_width=16,
        image_size=S,
        refine=refine,
        refine_size=32,
        mean=0.5,
        std=0.25,
        detail_size=detail_size,
    ).eval()
    with torch.no_grad():
        for net in (model.net, model.refiner):
            if net is not None:
                net.head.out[-1].weight.mul_(20)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("landmark_ckpt")
    # the detail model first: the random state the tests start from stays that of before it
    kinds = {"detail": (True, D), True: (True, None), False: (False, None)}
    paths = {k: root / f"refine_{k}" / "best.ckpt" for k in kinds}
    return paths | {"models": {k: save_checkpoint(paths[k], *v) for k, v in kinds.items()}}


def export_cfg(ckpt, tmp_path, *overrides):
    return compose_config(
        "export", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", *overrides]
    )


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["coords"], {"image": x})[0]


def ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("refine", [True, False])
def test_export_reproduces_pytorch_coordinates(refine, checkpoints, tmp_path, capsys):
    ckpt, model = checkpoints[refine], checkpoints["models"][refine]
    output = tmp_path / "deploy" / "landmarks.onnx"
    path = export(export_cfg(ckpt, tmp_path, f"output={output}"))
    assert path == output and path.is_file()
    assert "max |onnxruntime - pytorch| normalised coordinate" in capsys.readouterr().out
    meta = json.loads(output.with_name(output.name + ".json").read_text())
    assert meta["task"] == "landmarks" and meta["steps"] == (2 if refine else 1)
    assert meta["landmark_names"] == landmark_names(VERTEBRAE) and meta["skeleton"] == "vertebrae"
    assert (meta["image_size"], meta["mean"], meta["std"], meta["opset"]) == (S, 0.5, 0.25, 17)
    assert meta["output"] == {"name": "coords", "shape": ["batch", 12, 2], "dtype": "float32"}
    assert "align_corners=False" in meta["coordinates"] and "offset_x" in meta["to_pixels"]
    assert meta["check_max_abs_diff"] <= 1e-4 and "note" not in meta
    assert json.loads(onnx.load(str(path)).metadata_props[-1].value)["steps"] == meta["steps"]
    assert ("RoiAlign" in ops(path)) == refine  # step 2's crops are in the graph

    x = torch.randn(5, 1, S, S)  # another batch size than the traced 2: a dynamic axis
    with torch.no_grad():
        found = model.infer(x)
    got = run_onnx(path, x.numpy())
    assert got.shape == (5, 12, 2)
    np.testing.assert_allclose(got, found["final"].numpy(), atol=1e-4)
    if refine:  # the check compares step 2's output, which differs from step 1's
        assert np.abs(got - found["step1"].numpy()).max() > 1e-3
    assert np.abs(got).max() > 0.2  # points spread over the input, not all at the centre


def test_sidecar_pixel_mapping_is_the_models(checkpoints, tmp_path):
    """A 64 x 128 film: the sidecar's recipe (input pixels, then the letterbox) applied to the
    ONNX output gives the points `LandmarkNet.to_original` gives."""
    ckpt, model = checkpoints[True], checkpoints["models"][True]
    path = export(export_cfg(ckpt, tmp_path, f"output={tmp_path / 'm.onnx'}"))
    meta = json.loads(path.with_name("m.onnx.json").read_text())
    pixels, _ = render_spine(3, 0, (128, 64), VERTEBRAE)
    film = prepare(pixels, eval_transform(model), S)
    coords = run_onnx(path, film["image"][None].numpy())[0]
    size = meta["image_size"]
    w, h = 64, 128
    long = max(w, h)
    new_w, new_h = (int(size * w / long), size) if h >= w else (size, int(size * h / long))
    scale = np.array([new_w / w, new_h / h])
    offset = np.array([(size - new_w) // 2, (size - new_h) // 2])
    ours = ((coords + 1) * size / 2 - offset) / scale
    with torch.no_grad():
        theirs = model.to_original(
            torch.from_numpy(coords)[None], film["scale"][None], film["offset"][None]
        )[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert meta["to_pixels_example"] == {
        "film": [512, 1024],
        "scale": [0.0625, 0.0625],
        "offset": [16.0, 0.0],
    }


def test_an_opset_without_roi_align_exports_step_1_and_says_so(checkpoints, tmp_path, caplog):
    ckpt, model = checkpoints[True], checkpoints["models"][True]
    output = tmp_path / "old.onnx"
    with caplog.at_level(logging.WARNING, logger="regionnet.landmarks.export"):
        export(export_cfg(ckpt, tmp_path, f"output={output}", "opset=15"))
    meta = json.loads(output.with_name("old.onnx.json").read_text())
    assert meta["steps"] == 1 and "step 1 only" in meta["note"] and "opset" in meta["note"]
    assert any("step 1 only" in r.getMessage() for r in caplog.records)
    assert "RoiAlign" not in ops(output)
    x = torch.randn(3, 1, S, S)
    with torch.no_grad():
        step1 = model.infer(x)["step1"].numpy()
    np.testing.assert_allclose(run_onnx(output, x.numpy()), step1, atol=1e-4)


def test_check_fails_loudly_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    real = landmark_export.onnx_runner

    def off_by_a_bit(path):
        run = real(path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(landmark_export, "onnx_runner", off_by_a_bit)
    output = tmp_path / "bad.onnx"
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by 1\.0\d*e-03 > atol=0\.0001"):
        export(export_cfg(checkpoints[True], tmp_path, f"output={output}"))
    assert not output.exists() and not output.with_name("bad.onnx.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no scratch folder left either


def test_other_formats_and_int8_are_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="format=torchscript: landmark models export to ONNX"):
        export(export_cfg(checkpoints[False], tmp_path, "format=torchscript"))
    with pytest.raises(ValueError, match="quantize=int8.*region models"):
        export(export_cfg(checkpoints[False], tmp_path, "quantize=int8"))


def test_a_detail_model_exports_with_its_detail_image_as_the_input(checkpoints, tmp_path):
    """A two-step model whose step 2 crops from a D x D detail image: the graph takes that
    image, pools it to S for step 1 (AveragePool) and cuts step 2's crops from it (RoiAlign),
    matching PyTorch (`infer(pooled, detail)`); the sidecar's recipe at N = input_size = D
    maps a film's coordinates to its pixels as the model does."""
    ckpt, model = checkpoints["detail"], checkpoints["models"]["detail"]
    output = tmp_path / "detail.onnx"
    export(export_cfg(ckpt, tmp_path, f"output={output}"))
    meta = json.loads(output.with_name("detail.onnx.json").read_text())
    assert (meta["steps"], meta["image_size"], meta["detail_size"], meta["input_size"]) == (
        2, S, D, D,
    )  # fmt: skip
    assert meta["input"]["shape"] == ["batch", 1, D, D] and meta["check_max_abs_diff"] <= 1e-4
    assert {"RoiAlign", "AveragePool"} <= ops(output)
    x = torch.randn(3, 1, D, D)
    with torch.no_grad():
        found = model.infer(detail_to_input(x, S), x)
    got = run_onnx(output, x.numpy())
    np.testing.assert_allclose(got, found["final"].numpy(), atol=1e-4)
    assert np.abs(got - found["step1"].numpy()).max() > 1e-3

    pixels, _ = render_spine(3, 0, (128, 64), VERTEBRAE)
    film = prepare(pixels, film_transform(model), S, D)
    assert film["detail"].shape == (1, D, D) and film["image"].shape == (1, S, S)
    coords = run_onnx(output, film["detail"][None].numpy())[0]
    # the 64 x 128 film letterboxed to N = 128: no resize, 32 px of padding left and right
    scale, offset = np.array([1.0, 1.0]), np.array([(D - 64) // 2, 0])
    ours = ((coords + 1) * meta["input_size"] / 2 - offset) / scale
    with torch.no_grad():
        theirs = model.to_original(
            torch.from_numpy(coords)[None], film["scale"][None], film["offset"][None]
        )[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
