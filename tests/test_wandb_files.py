"""What regionnet logs to W&B, read back from the offline run's files (what `wandb sync`
would upload): ROC curves per validation pass, the test confusion matrix, the final metrics,
and regionnet-eval's ROC and confusion figures and its predictions table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from regionnet.config import compose_config
from regionnet.evaluate import evaluate
from regionnet.train import train


def _files(run_dir: Path) -> list[Path]:
    (offline,) = run_dir.glob("wandb/offline-run-*")
    return [f for f in offline.rglob("*") if f.is_file() and "logs" not in f.parts]


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    from conftest import FAST

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        run = tmp_path_factory.mktemp("train")
        mp.setenv("WANDB_DIR", str(run))
        overrides = [*FAST, "logger=wandb", "trainer.max_epochs=2", f"paths.output_dir={run}"]
        metrics = train(compose_config("train", overrides))
        out = tmp_path_factory.mktemp("eval")
        mp.setenv("WANDB_DIR", str(out))
        evaluate(
            compose_config(
                "eval",
                [f"ckpt_path={run / 'checkpoints/best.ckpt'}", f"paths.output_dir={out}"]
                + ["logger=wandb", "num_workers=0", "trainer.accelerator=cpu"]
                + ["bootstrap.resamples=20"],
            )
        )
    finally:
        mp.undo()
    return run, out, metrics


def test_training_logs_roc_curves_confusion_and_final_metrics(wandb_runs):
    run, _, metrics = wandb_runs
    files = _files(run)
    tables = {f.name.split("_")[0]: f for f in files if f.name.endswith(".table.json")}
    assert {"roc", "confusion"} <= set(tables), [f.name for f in files]
    roc = json.loads(tables["roc"].read_text())
    heads = {row[roc["columns"].index("lineKey")] for row in roc["data"]}
    assert heads == {"shoulder", "elbow", "hand", "pelvis", "knee"}
    vals = [f for f in files if f.parent.name == "val" and f.name.startswith("roc_table")]
    assert len(vals) >= 2  # one ROC per validation pass, not only the last
    (record,) = [f for f in files if f.suffix == ".wandb"]  # the run's history and summary
    blob = record.read_bytes()
    assert b"val/auroc_mean_best" in blob and b"test/auroc_mean" in blob
    assert f"{metrics['test/auroc_mean']}".encode()[:6] in blob


def test_eval_logs_its_figures_and_predictions_table(wandb_runs):
    _, out, _ = wandb_runs
    files = _files(out)
    images = [f for f in files if f.suffix == ".png"]
    names = " ".join(f.name for f in images)
    assert "roc" in names and "confusion" in names, names
    for image in images:
        assert min(Image.open(image).size) > 100  # a real figure, not a placeholder
    (table,) = [f for f in files if f.name.endswith(".table.json")]
    assert "p_knee" in json.loads(table.read_text())["columns"]
