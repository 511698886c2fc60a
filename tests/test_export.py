"""regionnet-export: ONNX / TorchScript files that reproduce the PyTorch model."""

from __future__ import annotations

import json

import lightning
import numpy as np
import pytest
import torch

from regionnet import export as export_module
from regionnet.config import compose_config
from regionnet.export import export
from regionnet.model.module import RegionNet

# torch.jit is deprecated in recent torch; format=torchscript still works and is tested here
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")

S = 32
REGIONS = ["hand", "knee", "pelvis"]
THRESHOLDS = [0.3, 0.5, 0.7]


def save_checkpoint(path, shared: bool = True):
    """A random-init RegionNet saved as Lightning would (no Trainer needed), with a non-default
    intensity normalisation in its hyperparameters."""
    torch.manual_seed(0)
    model = RegionNet(
        regions=REGIONS,
        backbone="resnet18",
        image_size=S,
        shared_backbone=shared,
        mean=0.5,
        std=0.25,
    ).eval()
    model.thresholds.copy_(torch.tensor(THRESHOLDS))
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
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for shared in (True, False):
        path = root / ("shared" if shared else "per_region") / "best.ckpt"
        path.parent.mkdir()
        out[shared] = (path, save_checkpoint(path, shared))
    return out


def export_cfg(ckpt, tmp_path, *overrides):
    return compose_config(
        "export", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", *overrides]
    )


def test_saved_checkpoint_loads_like_a_lightning_one(checkpoints):
    path, model = checkpoints[True]
    loaded = RegionNet.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.regions == REGIONS
    torch.testing.assert_close(loaded.thresholds, torch.tensor(THRESHOLDS))
    x = torch.randn(2, 1, S, S)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x))


def run_exported(fmt, path, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probs"], {"image": x})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(
    ("fmt", "shared"), [("onnx", True), ("torchscript", True), ("onnx", False)]
)
def test_export_reproduces_pytorch(fmt, shared, checkpoints, tmp_path, capsys):
    ckpt, model = checkpoints[shared]
    output = tmp_path / f"deploy/model.{fmt}"
    path = export(export_cfg(ckpt, tmp_path, f"format={fmt}", f"output={output}"))
    assert path == output and path.is_file()
    assert "max |exported - pytorch|" in capsys.readouterr().out

    meta = json.loads(output.with_name(output.name + ".json").read_text())
    assert meta["regions"] == REGIONS and meta["thresholds"] == THRESHOLDS
    assert (meta["image_size"], meta["mean"], meta["std"]) == (S, 0.5, 0.25)
    assert meta["input"] == {"name": "image", "shape": ["batch", 1, S, S], "dtype": "float32"}
    assert meta["check_max_abs_diff"] <= 1e-4

    x = torch.randn(5, 1, S, S)  # another batch size than the traced 2: a dynamic axis
    with torch.no_grad():
        expected = model.predict_proba(x).numpy()
    got = run_exported(fmt, output, x.numpy())
    assert got.shape == (5, len(REGIONS))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_default_output_lies_next_to_the_checkpoint(checkpoints, tmp_path):
    ckpt, _ = checkpoints[True]
    path = export(export_cfg(ckpt, tmp_path, "format=torchscript", "check=false"))
    assert path == ckpt.parent / "model.ts" and path.is_file()
    assert (ckpt.parent / "model.ts.json").is_file()
    extra = {"regionnet.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["regionnet.json"])["regions"] == REGIONS


def test_wrong_format_is_named(checkpoints, tmp_path):
    ckpt, _ = checkpoints[True]
    with pytest.raises(ValueError, match="format='tflite'.*onnx"):
        export(export_cfg(ckpt, tmp_path, "format=tflite"))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        export(export_cfg(tmp_path / "nope.ckpt", tmp_path))
    with pytest.raises(ValueError, match="ckpt_path is required"):
        export(compose_config("export", [f"paths.output_dir={tmp_path}"]))


def test_check_fails_loudly_on_a_mismatch(checkpoints, tmp_path, monkeypatch):
    ckpt, _ = checkpoints[True]
    real = export_module.exported_runner

    def off_by_a_bit(fmt, output):
        run = real(fmt, output)
        return lambda x: [o + 0.01 for o in run(x)]

    monkeypatch.setattr(export_module, "exported_runner", off_by_a_bit)
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by 1\.000e-02 > atol=0\.0001"):
        export(export_cfg(ckpt, tmp_path, f"output={tmp_path / 'm.onnx'}"))
