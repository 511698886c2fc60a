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
from regionnet.model.checkpoint import UnsafeCheckpointError
from regionnet.model.module import load_regionnet
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
    """A tiny `data=folder` training logging to W&B (offline, the default): (data root, run
    dir). The data hold an unreadable file, whose path the console log names."""
    base = tmp_path_factory.mktemp("folder_run")
    root = _folder_data(base / "secret-radiograph-root")
    run = base / "run-dir-xyz"
    with pytest.MonkeyPatch.context() as env:
        env.delenv("WANDB_MODE", raising=False)
        env.delenv("WANDB_API_KEY", raising=False)
        env.setenv("WANDB_DIR", str(base))
        cfg = compose_config(
            "train",
            [*FOLDER, "logger=wandb", f"data.root={root}", f"paths.output_dir={run}"],
        )
        assert cfg.logger.wandb.mode == "offline" and not cfg.logger.wandb.log_paths
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


# -- 2. W&B: offline unless asked, no paths unless asked --------------------------------------
def _uploadable(run: Path) -> list[Path]:
    """What `wandb sync` would upload of a run's offline W&B runs: the run file and files/
    (not logs/, W&B's local debug logs)."""
    (offline,) = run.glob("wandb/offline-run-*")
    return [f for f in offline.rglob("*") if f.is_file() and "logs" not in f.parts]


def test_default_wandb_logger_is_offline_and_private(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key alone is no consent to upload
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}"])
    assert "wandb" in cfg.logger and cfg.logger.wandb.mode == "offline"
    logger = instantiate(cfg.logger.wandb)
    assert logger._wandb_init["mode"] == "offline" and not logger.log_paths
    settings = logger._wandb_init["settings"]
    assert settings.console == "off" and settings.x_disable_meta and settings.disable_git
    assert settings.host == "<redacted>"
    # WANDB_MODE may make it stricter, never looser than the config
    monkeypatch.setenv("WANDB_MODE", "offline")
    online = compose_config("train", [f"paths.output_dir={tmp_path}", "logger.wandb.mode=online"])
    assert instantiate(online.logger.wandb)._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert instantiate(cfg.logger.wandb)._wandb_init["mode"] == "disabled"


def test_wandb_gets_no_data_root_no_run_dir_and_no_console_log(folder_run):
    root, run = folder_run
    files = _uploadable(run)
    assert any(f.suffix == ".wandb" for f in files)
    assert not any(f.name == "output.log" for f in files)  # no console log
    assert not any(f.name == "wandb-metadata.json" for f in files)  # no command line, host
    blob = b"".join(f.read_bytes() for f in files)
    assert b"<redacted>" in blob and b"test/auroc_mean" in blob  # the config and the metrics
    for secret in (str(root), root.name, "broken.png", str(run)):
        assert secret.encode() not in blob, secret
    # the unreadable file was named on the console (train.log), just not sent to W&B
    assert (run / "checkpoints").is_dir()


def test_eval_table_sent_to_wandb_has_no_path_or_patient_column(folder_run, tmp_path, monkeypatch):
    from regionnet.evaluate import evaluate

    root, run = folder_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "eval"
    cfg = compose_config(
        "eval",
        [f"ckpt_path={run / 'checkpoints/best.ckpt'}", f"paths.output_dir={out}", "logger=wandb",
         "num_workers=0", "trainer.accelerator=cpu", "bootstrap.resamples=20"],
    )  # fmt: skip
    evaluate(cfg)
    assert "path" in pd.read_csv(out / "predictions.csv").columns  # the local file keeps it
    (table,) = [f for f in _uploadable(out) if f.name.endswith(".table.json")]
    columns = json.loads(table.read_text())["columns"]
    assert "p_knee" in columns and "true_region" in columns
    assert not {"path", "patient_id", "source"} & set(columns)
    blob = b"".join(f.read_bytes() for f in _uploadable(out))
    assert root.name.encode() not in blob and run.name.encode() not in blob


def test_online_without_a_reachable_server_logs_offline_with_one_warning(
    tmp_path, monkeypatch, caplog
):
    import time

    from hydra.utils import instantiate

    from regionnet import loggers

    monkeypatch.setattr(loggers, "_probed", {})
    monkeypatch.setattr(loggers, "_warned", set())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = [o for o in TINY if not o.startswith("logger=")]
    cfg = compose_config(
        "train",
        [*overrides, "logger=wandb", "logger.wandb.mode=online", "logger.wandb.probe_timeout=2",
         f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="regionnet.loggers"):
        assert instantiate(cfg.logger.wandb)._wandb_init["mode"] == "offline"
        metrics = train(cfg)
    assert time.monotonic() - start < 120 and "test/auroc_mean" in metrics
    warnings = [r for r in caplog.records if r.name == "regionnet.loggers"]
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0].getMessage()
    assert "offline" in warnings[0].getMessage()
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


# -- 6. credentials in URLs ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["dicomweb.url=https://u:secret@host/dicom-web", "input=dicomweb", "ckpt_path=x"],
        # a sweep, and the SR destination
        ["-m", "dicomweb.url=https://host/dicom-web", "input=dicomweb", "ckpt_path=x",
         "dicomweb.sr_url=https://h2/dicom-web,https://u:secret@host/sr"],
    ],
    ids=["run", "multirun"],
)  # fmt: skip
def test_a_dicomweb_url_with_credentials_is_refused_before_hydra_writes_it(tmp_path, args):
    proc = subprocess.run(
        [_console("regionnet-predict"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(REGIONNET_LOG_DIR=str(tmp_path / "outputs")),
    )
    assert proc.returncode != 0
    assert "DICOMWEB_USER" in proc.stderr and "DICOMWEB_PASSWORD" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*"))  # no run directory, no .hydra/*.yaml, no log


def test_url_credentials_names_only_urls_with_userinfo():
    from regionnet.cli import url_credentials

    cfg = compose_config(
        "predict", ["ckpt_path=x", "input=dicomweb", "dicomweb.url=https://host/dicom-web"]
    )
    assert url_credentials(cfg) == []
    cfg.dicomweb.sr_url = "http://pacs-user@host:8042/dicom-web"
    assert url_credentials(cfg) == ["dicomweb.sr_url"]
