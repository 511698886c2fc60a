"""One real use of each interface no other test exercised (issue 14): predict in bf16 with
channels_last, the `regionnet-export` console script, `data.external_test` through training,
`threshold_method=sensitivity@X`, `trainer.max_time`, `head_hidden`, `drop_path_rate`,
`experiment=yi2019`, and the two example scripts (scripts/cam_example.py,
scripts/example_report.py) run as a user would.

Everything is tiny (32-48 px phantoms, one epoch or a few batches) and offline; the predict,
export and Grad-CAM tests reuse the session's phantom checkpoint (tests/phantom_model.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.predict import predict
from regionnet.regions import REGIONS
from regionnet.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=test_resnet"]  # timm's tiny test ResNet; with the `fast` fixture
HANG_GUARD_S = 3600  # subprocesses: a guard against a hang, not a speed requirement


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread avoids contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_phantoms(root: Path, regions, per_region: int, seed: int, size: int = 64) -> Path:
    """root/<region>/<i>.png phantoms (8-bit) with seeds no training set uses."""
    for region in regions:
        (root / region).mkdir(parents=True, exist_ok=True)
        for i in range(per_region):
            pixels = (render_phantom(region, seed + i, size) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(root / region / f"{i}.png")
    return root


def tiny_train(run: Path, fast: list[str], *overrides: str, callbacks=None) -> dict:
    cfg = compose_config("train", [*fast, *TINY, f"paths.output_dir={run}", *overrides])
    return train(cfg, extra_callbacks=callbacks)


def installed_script(name: str) -> str:
    """The console script installed next to this Python (its venv), else the one on PATH."""
    script = Path(sys.executable).with_name(name)
    found = str(script) if script.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed (pip install -e .)"
    return found


def run_cmd(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: a second thread only waits for a busy core
    env["REGIONNET_LOG_DIR"] = str(cwd / "outputs")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def decoded_png(path: Path) -> np.ndarray:
    """The pixels of a PNG that decodes and is not one flat colour."""
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] >= 32 and pixels.shape[1] >= 32 and pixels.std() > 1, path
    return pixels


# -- regionnet-predict: bf16 autocast and channels_last ---------------------------------------
def test_predict_bf16_channels_last_matches_fp32(phantom_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    folder = write_phantoms(tmp_path / "in", [*REGIONS, "chest"], per_region=2, seed=8100)
    files = sorted(str(p) for p in folder.rglob("*.png"))

    # what reaches the backbone: the dtype of a convolution's output, the layout of its
    # weights and of its input
    import regionnet.predict as predict_module

    seen: list[dict] = []
    loader = predict_module.load_checkpoint

    def load_and_watch(path):
        model = loader(path)
        # a 3x3 convolution with several input channels: a tensor with one channel (or a
        # 1x1 kernel) counts as contiguous in both layouts
        conv = next(
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size == (3, 3)
        )

        def hook(module, args, output):
            seen.append(
                {
                    "dtype": output.dtype,
                    "weight_cl": module.weight.is_contiguous(memory_format=torch.channels_last),
                    "input_cl": args[0].is_contiguous(memory_format=torch.channels_last),
                }
            )

        conv.register_forward_hook(hook)
        return model

    monkeypatch.setattr(predict_module, "load_checkpoint", load_and_watch)

    def run(name: str, *overrides: str) -> pd.DataFrame:
        seen.clear()
        out = tmp_path / f"{name}.csv"
        cfg = compose_config(
            "predict",
            [f"ckpt_path={phantom_checkpoint}", f"input={folder}", f"output={out}",
             "accelerator=cpu", "num_workers=0", "batch_size=4", *overrides],
        )  # fmt: skip
        summary = predict(cfg)
        assert summary["ok"] == len(files) and summary["errors"] == 0
        return pd.read_csv(out).set_index("path").sort_index()

    fp32 = run("fp32")
    assert seen and all(s["dtype"] == torch.float32 and not s["weight_cl"] for s in seen)
    fast = run("bf16_cl", "precision=bf16-mixed", "channels_last=true")
    # bf16 autocast reached the convolutions, channels_last the weights and the batches
    assert seen and all(s["dtype"] == torch.bfloat16 for s in seen)
    assert all(s["weight_cl"] for s in seen)
    assert all(s["input_cl"] for s in seen), "channels_last=true left the input batches NCHW"

    # every file once, complete rows, probabilities within bf16 rounding of the fp32 run
    assert list(fast.index) == files == list(fp32.index)
    cols = [f"p_{r}" for r in REGIONS]
    assert (fast["status"] == "ok").all() and fast[[*cols, "region"]].notna().all().all()
    diff = np.abs(fast[cols].to_numpy() - fp32[cols].to_numpy())
    assert diff.max() < 0.05, diff.max()
    assert diff.max() > 0  # bf16 rounding shows: the run was not fp32 again
    agree = (fast["region"] == fp32["region"]).mean()
    assert agree >= 0.8, f"bf16 changed {1 - agree:.0%} of the decisions"


# -- regionnet-export, the console script -----------------------------------------------------
def test_export_console_script_writes_onnx_and_metadata(phantom_checkpoint, tmp_path):  # noqa: F811
    from regionnet.api import load_model

    out = tmp_path / "deploy" / "regionnet.onnx"
    done = run_cmd(
        [installed_script("regionnet-export"), f"ckpt_path={phantom_checkpoint}", "format=onnx",
         f"output={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        tmp_path,
    )  # fmt: skip
    assert "check onnx: max |exported - pytorch|" in done.stdout
    meta = json.loads(out.with_name("regionnet.onnx.json").read_text())
    model = load_model(phantom_checkpoint)
    assert meta["format"] == "onnx" and meta["model_file"] == "regionnet.onnx"
    assert meta["regions"] == list(model.regions)
    assert meta["thresholds"] == pytest.approx(model.model.thresholds.tolist(), abs=1e-6)
    assert meta["image_size"] == 32 and meta["opset"] == 17
    assert meta["check_max_abs_diff"] <= 1e-4

    # the file itself: an ONNX graph carrying the same metadata, that onnxruntime runs with a
    # dynamic batch axis and that agrees with the checkpoint on a phantom
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(out))
    inside = json.loads({p.key: p.value for p in graph.metadata_props}["regionnet"])
    assert inside["regions"] == meta["regions"] and inside["thresholds"] == meta["thresholds"]
    from regionnet.data.transforms import eval_transform

    tf = eval_transform(model.model)
    x = torch.stack([tf(torch.from_numpy(render_phantom(r, 8200, 32))[None]) for r in REGIONS])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model.model.net.predict_proba(x).numpy()
    assert got.shape == (len(REGIONS), len(model.regions))
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- data.external_test through regionnet-train ----------------------------------------------
def test_train_reports_the_external_test_set(tmp_path, fast):
    external = write_phantoms(tmp_path / "external", [*REGIONS, "chest"], per_region=3, seed=8300)
    metrics = tiny_train(tmp_path / "run", fast, f"data.external_test={external}")
    assert metrics["external/images"] == 3 * (len(REGIONS) + 1)
    for r in REGIONS:
        assert metrics[f"external/positives/{r}"] == 3
        assert 0.0 <= metrics[f"external/auroc/{r}"] <= 1.0
    assert "external/auroc_mean" in metrics and "test/auroc_mean" in metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["external/auroc_mean"] == pytest.approx(metrics["external/auroc_mean"])


# -- model.threshold_method=sensitivity@X -----------------------------------------------------
def test_sensitivity_threshold_method_keeps_the_sensitivity_asked_for(tmp_path, fast):
    """Same seed, same training, two operating points: sensitivity@0.9 keeps at least 90 % of
    every head's validation positives above its threshold, and its thresholds are not
    Youden's."""
    more = ["data.phantom.per_region=24"]  # enough validation positives per head
    youden = tiny_train(tmp_path / "youden", fast, *more, "test=false")
    sens = tiny_train(
        tmp_path / "sens", fast, *more, "test=false", "model.threshold_method=sensitivity@0.9"
    )
    for r in REGIONS:
        assert sens[f"val/positives/{r}"] >= 3
        assert sens[f"val/sensitivity/{r}"] >= 0.9 - 1e-6, (r, sens[f"val/sensitivity/{r}"])

    def thresholds(run: str, method: str) -> list[float]:
        path = tmp_path / run / "checkpoints" / "best.ckpt"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["threshold_method"] == method
        return ckpt["state_dict"]["thresholds"].tolist()

    chosen = thresholds("sens", "sensitivity@0.9")
    assert chosen != pytest.approx(thresholds("youden", "youden"))
    # the operating point moved, the model did not (the method does not touch the loss)
    assert sens["val/auroc_mean"] == pytest.approx(youden["val/auroc_mean"], abs=1e-6)


# -- trainer.max_time -----------------------------------------------------------------------
class Epochs(L.Callback):
    """Counts the training epochs that ran to their end."""

    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1


def test_max_time_stops_the_fit_and_keeps_its_outputs(tmp_path, fast):
    counter = Epochs()
    run = tmp_path / "run"
    metrics = tiny_train(
        run, fast, "trainer.max_time=00:00:00:05", "trainer.max_epochs=1000",
        "callbacks.early_stopping=null", "test=false", callbacks=[counter],
    )  # fmt: skip
    assert 1 <= counter.epochs < 1000  # stopped by the 5 s budget, not by max_epochs
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert "val/auroc_mean" in saved and saved == pytest.approx(metrics)


# -- model.head_hidden and model.drop_path_rate --------------------------------------------
def test_head_hidden_and_drop_path_reach_the_trained_model(tmp_path, fast):
    from regionnet.api import load_model

    run = tmp_path / "run"
    tiny_train(run, fast, "model.head_hidden=16", "model.drop_path_rate=0.1", "test=false")
    net = load_model(run / "checkpoints" / "best.ckpt").model.net  # through the checkpoint
    for r in REGIONS:
        hidden, last = [m for m in net.heads[r] if isinstance(m, torch.nn.Linear)]
        assert hidden.out_features == 16 and (last.in_features, last.out_features) == (16, 1)
    drops = [m for m in net.modules() if type(m).__name__ == "DropPath"]
    assert drops and max(m.drop_prob for m in drops) == pytest.approx(0.1)
    # drop path is stochastic in training and off at inference
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net.logits(x), net.logits(x))
        net.train()
        torch.manual_seed(0)
        a = net.logits(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, net.logits(x))


def test_default_head_has_no_hidden_layer_nor_drop_path(tmp_path):
    """The counterpart of the test above, without training: the defaults build neither."""
    from regionnet.model.module import RegionNet

    net = RegionNet(backbone="test_resnet", image_size=32).net
    assert all(
        len([m for m in h if isinstance(m, torch.nn.Linear)]) == 1 for h in net.heads.values()
    )
    assert not [m for m in net.modules() if type(m).__name__ == "DropPath"]


# -- experiment=yi2019 ------------------------------------------------------------------------
def test_yi2019_experiment_trains_in_tiny_form(tmp_path, fast):
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    metrics = tiny_train(
        run, [o for o in fast if not o.startswith("data.phantom")],
        "experiment=yi2019",  # its EfficientNet-Lite0 replaced by TINY's test_resnet
        "data.phantom.per_region=16",
        "trainer.limit_train_batches=3",  # its 30x augmentation, a few batches of it
    )  # fmt: skip
    cfg = OmegaConf.load(run / "config.yaml")
    # the experiment's own values reached the run (tiny's size and epochs win over its)
    assert list(cfg.data.split_fractions) == [0.64, 0.12, 0.24]
    assert cfg.data.augment_factor == 30
    assert list(cfg.tags) == ["yi2019"]
    assert cfg.data.image_size == 32 and cfg.trainer.max_epochs == 1
    split = pd.read_csv(run / "split.csv")["split"].value_counts(normalize=True)
    assert split["train"] == pytest.approx(0.64, abs=0.05)
    assert split["val"] == pytest.approx(0.12, abs=0.05)
    assert split["test"] == pytest.approx(0.24, abs=0.05)
    assert "test/auroc_mean" in metrics and (run / "checkpoints" / "best.ckpt").is_file()


# -- the example scripts, run as a user would -----------------------------------------------
def test_cam_example_trains_a_tiny_model_and_draws_each_head(tmp_path):
    out = tmp_path / "cams"
    tiny = ["data.image_size=32", "trainer.max_epochs=1", "data.phantom.per_region=8",
            "model.backbone=test_resnet", "model.pretrained=false", "trainer.accelerator=cpu",
            "data.batch_size=16"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "scripts" / "cam_example.py"), "--out", str(out),
           "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for o in tiny:
        cmd += ["--train", o]
    done = run_cmd(cmd, tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"cam_{r}.png" for r in REGIONS)
    for r in REGIONS:
        decoded_png(out / f"cam_{r}.png")
        assert f"phantom://{r}/99999: {r} head p=" in done.stdout


def test_cam_example_on_given_radiographs_with_a_checkpoint(phantom_checkpoint, tmp_path):  # noqa: F811
    files = write_phantoms(tmp_path / "in", ["knee", "hand"], per_region=1, seed=8400, size=96)
    knee, hand = files / "knee" / "0.png", files / "hand" / "0.png"
    shutil.copy(knee, tmp_path / "my_knee.png")
    shutil.copy(hand, tmp_path / "my_hand.png")
    out = tmp_path / "cams"
    done = run_cmd(
        [sys.executable, str(ROOT / "scripts" / "cam_example.py"), "--ckpt",
         str(phantom_checkpoint), "--out", str(out), "my_knee.png", "my_hand.png"],
        tmp_path,
    )  # fmt: skip
    for name in ("my_knee", "my_hand"):
        overlay = decoded_png(out / f"cam_{name}.png")
        assert overlay.shape[:2] == (96, 96)  # drawn over the file at its own size
        assert f"{name}.png: " in done.stdout


def test_example_report_writes_the_figures_and_the_evaluation(tmp_path):
    out, docs = tmp_path / "report", tmp_path / "docs"
    done = run_cmd(
        [sys.executable, str(ROOT / "scripts" / "example_report.py"), "--out", str(out),
         "--docs", str(docs), "--epochs", "1", "--per-region", "8"],
        tmp_path,
    )  # fmt: skip
    for name in ("roc.png", "confusion.png"):
        decoded_png(docs / name)
        assert (docs / name).stat().st_size > 10_000  # a drawn figure, not an empty canvas
        assert str(docs / name) in done.stdout
    assert (out / "train" / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["confusion"]) == {"test", "external"}
    assert metrics["external/images"] == 7 * 4  # 7 folders of max(4, 8 // 4) phantoms
    for stage in ("test", "external"):
        assert f"{stage}/auroc_mean" in metrics
    pred = pd.read_csv(out / "eval" / "predictions.csv")
    assert set(pred["split"]) == {"test", "external"}
