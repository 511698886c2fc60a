"""Safe by default (issue 15): checkpoints are read as tensors and plain values only, best.ckpt
keeps only what inference needs, W&B stays offline and gets no paths unless asked, and a
DICOMweb URL with credentials is refused before Hydra writes or prints it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST
from PIL import Image

from regionnet.config import compose_config
from regionnet.data.phantom import render_phantom
from regionnet.model.module import UnsafeCheckpointError, load_regionnet
from regionnet.train import train

TINY = [*FAST, "model.backbone=test_resnet"]
# data=folder: no phantom settings
FOLDER = ["debug=tiny", "model.backbone=test_resnet", "data=folder"]
REGIONS = ["shoulder", "elbow", "hand", "pelvis", "knee"]


def _console(name: str) -> str:
    script = Path(sys.executable).with_name(name)
    return str(script) if script.is_file() else name


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.update(HYDRA_FULL_ERROR="1", **extra)
    return env


def _folder_data(root: Path, per_region: int = 10) -> Path:
    """root/<region>/<n>.png phantoms, plus one unreadable file (a warning naming its path)."""
    for region in REGIONS:
        (root / region).mkdir(parents=True)
        for k in range(per_region):
            pixels = (render_phantom(region, 100 * k + 7, 48) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(root / region / f"{k}.png")
    (root / "knee" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny `data=folder` training: (data root, run dir)."""
    base = tmp_path_factory.mktemp("folder_run")
    root = _folder_data(base / "secret-radiograph-root")
    run = base / "run-dir-xyz"
    cfg = compose_config("train", [*FOLDER, f"data.root={root}", f"paths.output_dir={run}"])
    train(cfg)
    return root, run


# -- 1. checkpoints and pickles -------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_even_when_torch_is_told_to_unpickle(
    folder_run, tmp_path, monkeypatch
):
    _, run = folder_run
    marker = tmp_path / "MARKER"
    checkpoint = torch.load(run / "checkpoints/best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(UnsafeCheckpointError) as refused:
        load_regionnet(evil)
    message = str(refused.value)
    assert str(evil) in message and "never unpickles code" in message
    assert "weights_only=False" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__

    from regionnet.api import load_model
    from regionnet.export import export

    with pytest.raises(UnsafeCheckpointError):
        load_model(evil)
    with pytest.raises(UnsafeCheckpointError):
        export(compose_config("export", [f"ckpt_path={evil}", f"paths.output_dir={tmp_path}"]))
    # resuming a training from it
    cfg = compose_config("train", [*TINY, f"paths.output_dir={tmp_path}", f"ckpt_path={evil}"])
    with pytest.raises(UnsafeCheckpointError, match="never unpickles code"):
        train(cfg)
    assert not marker.exists()


def test_best_ckpt_keeps_only_what_inference_needs(folder_run):
    root, run = folder_run
    best, last = run / "checkpoints/best.ckpt", run / "checkpoints/last.ckpt"
    raw = best.read_bytes()
    for secret in (str(root), root.name, str(run), run.name):
        assert secret.encode() not in raw, secret
    checkpoint = torch.load(best, weights_only=True)
    assert set(checkpoint) <= {
        "state_dict",
        "hyper_parameters",
        "hparams_name",
        "pytorch-lightning_version",
        "regionnet",
    }
    assert root.name not in repr(checkpoint) and run.name not in repr(checkpoint)
    # last.ckpt keeps what a resume needs (it names the run directory; it stays in the run)
    full = torch.load(last, weights_only=True)
    assert {"optimizer_states", "loops", "callbacks", "state_dict"} <= set(full)

    model = load_regionnet(best)
    assert model.regions == REGIONS
    torch.testing.assert_close(model.state_dict()["thresholds"], full["state_dict"]["thresholds"])


def test_eval_and_predict_run_on_the_stripped_checkpoint(folder_run, tmp_path):
    root, run = folder_run
    best = run / "checkpoints/best.ckpt"
    evaluated = subprocess.run(
        [
            _console("regionnet-eval"),
            f"ckpt_path={best}",
            f"hydra.run.dir={tmp_path / 'eval'}",
            "num_workers=0",
            "trainer.accelerator=cpu",
            "bootstrap.resamples=20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"),
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test/auroc_mean" in json.loads((tmp_path / "eval/metrics.json").read_text())

    out = tmp_path / "preds.csv"
    predicted = subprocess.run(
        [
            _console("regionnet-predict"),
            f"ckpt_path={best}",
            f"input={root / 'hand'}",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'predict'}",
            "num_workers=0",
            "accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(pd.read_csv(out)) == 10


def test_resume_from_last_ckpt_reads_weights_only_and_refuses_best(folder_run, tmp_path):
    root, run = folder_run
    common = [*FOLDER, f"data.root={root}", "skip_if_done=false"]
    last, best = run / "checkpoints/last.ckpt", run / "checkpoints/best.ckpt"
    out = tmp_path / "resumed"
    resumed = [*common, f"paths.output_dir={out}", f"ckpt_path={last}", "trainer.max_epochs=2"]
    assert "val/auroc_mean" in train(compose_config("train", resumed))
    from_best = [*common, f"paths.output_dir={tmp_path / 'b'}", f"ckpt_path={best}"]
    with pytest.raises(ValueError, match="last.ckpt"):
        train(compose_config("train", from_best))


def test_a_weights_file_with_a_payload_is_refused(tmp_path, monkeypatch):
    import timm

    from regionnet.model.backbone import build_backbone

    marker = tmp_path / "MARKER"
    state = timm.create_model("test_resnet", num_classes=0, in_chans=1).state_dict()
    state["payload"] = _Payload(marker)
    weights = tmp_path / "backbone.pth"
    torch.save(state, weights)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError, match="model.weights_file=") as refused:
        build_backbone("test_resnet", weights_file=str(weights))
    assert "weights_only=False" not in str(refused.value) and not marker.exists()
