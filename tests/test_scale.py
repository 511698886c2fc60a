"""Scaling out: DDP in two CPU processes (trainer=ddp_sim), Hydra multiruns with DDP, sweeps
(basic, Optuna with SQLite, k-fold with pooled AUROC), the Submitit launcher, resuming a
sweep, W&B offline groups and summaries, and the speed options.

The command-line tests run `regionnet-train` as a user would, in a temporary working
directory, on tiny phantoms (32 px, timm's 0.4 M-parameter `test_resnet`, one epoch).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from regionnet.config import CONF_DIR, compose_config
from regionnet.distributed import child_overrides
from regionnet.model.module import RegionNet
from regionnet.sweep import cross_validation, finished_run, gather, main, pooled_auroc
from regionnet.train import build_model, speed_up, train

REGIONS = ["shoulder", "elbow", "hand", "pelvis", "knee"]
TINY = ["debug=tiny", "model.backbone=test_resnet"]
CPU = ["trainer.accelerator=cpu", "data.phantom.per_region=6", "data.batch_size=8"]
TIMEOUT_S = 300


def _exe() -> str:
    script = Path(sys.executable).with_name("regionnet-train")
    return str(script) if script.is_file() else shutil.which("regionnet-train")


def regionnet_train(args, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`regionnet-train ARGS` in `cwd` (no network, W&B off unless `env` says otherwise)."""
    return subprocess.run(
        [_exe(), *args],
        cwd=cwd,
        env=_env(cwd, env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _env(cwd: Path, extra: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.update(REGIONNET_LOG_DIR=str(cwd / "outputs"), HYDRA_FULL_ERROR="1", **extra)
    return env


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _one_process(run: Path, stage: str) -> dict:
    """`stage` metrics of the run's best checkpoint on its own split, one process."""
    model = RegionNet.load_from_checkpoint(run / "checkpoints/best.ckpt", map_location="cpu")
    data = OmegaConf.load(run / "config.yaml").data
    data.split_file = str(run / "split.csv")
    dm = instantiate(data, _convert_="all")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    run_stage = trainer.validate if stage == "val" else trainer.test
    values = run_stage(model, datamodule=dm, verbose=False)[0]
    # and independently of torchmetrics: scikit-learn on per-image probabilities
    frame = dm.split_frame(stage)
    outputs = trainer.predict(model, dataloaders=dm._loader(frame, train=False))
    probs = np.concatenate([o["probs"].numpy() for o in outputs])
    for k, r in enumerate(model.regions):
        if frame[f"label_{r}"].nunique() == 2:
            values[f"sklearn/{r}"] = roc_auc_score(frame[f"label_{r}"], probs[:, k])
    values["split_size"] = len(frame)
    return values


# -- trainer=ddp_sim: two processes exit 0 and report exactly one process's metrics ------------
@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Three `regionnet-train trainer=ddp_sim` runs at once (per_region 6, 10, 13: 7, 9 and 15
    val images, odd, so padding would show; batch 4: processes get unequal batch counts)."""
    cwd = tmp_path_factory.mktemp("ddp")
    procs = {}
    for n in (6, 10, 13):
        run = cwd / f"run{n}"
        args = [
            "trainer=ddp_sim",
            *TINY,
            f"data.phantom.per_region={n}",
            "data.batch_size=4",
            f"hydra.run.dir={run}",
        ]
        # the first also logs to W&B (offline): one W&B run, from rank 0
        wandb = {"WANDB_MODE": "offline"} if n == 6 else {}
        args += ["logger=wandb"] if wandb else []
        procs[run] = subprocess.Popen(
            [_exe(), *args],
            cwd=cwd,
            env=_env(cwd, wandb),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    results = {}
    for run, proc in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        results[run] = (proc.returncode, out.decode(errors="replace"))
    return cwd, results


def test_ddp_sim_exits_zero_every_time_and_rank_zero_writes_once(ddp_runs):
    cwd, results = ddp_runs
    for run, (code, out) in results.items():
        assert code == 0, out[-6000:]
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out  # really two processes
        assert (run / "metrics.json").is_file() and (run / "test_predictions.csv").is_file()
        assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
            "best.ckpt",
            "last.ckpt",
        ]
        assert len(list((run / "csv").iterdir())) == 1  # one logger version: rank 0's
    group, _, summary = _wandb_run(cwd / "run6")  # exactly one W&B run
    assert group == "" and json.loads(summary["val/images"]) == 7
    assert not (cwd / "outputs").exists()  # the second process ran in the first's run dir


def test_ddp_sim_metrics_equal_a_one_process_evaluation(ddp_runs):
    """Synced metrics, no repeated or dropped images: val and test AUROC per head equal one
    process's on the same checkpoint and split, to 1e-6."""
    _, results = ddp_runs
    for run in results:
        reported = _metrics(run)
        for stage in ("val", "test"):
            single = _one_process(run, stage)
            assert single["split_size"] % 2 == 1 or stage == "test"
            assert reported[f"{stage}/images"] == single["split_size"]
            keys = [k for k in single if k.startswith(f"{stage}/auroc")]
            assert f"{stage}/auroc_mean" in keys and len(keys) >= 3
            for key in keys:
                assert reported[key] == pytest.approx(single[key], abs=1e-6), (run, key)
            for r in REGIONS:
                if f"{stage}/auroc/{r}" in reported:
                    assert reported[f"{stage}/auroc/{r}"] == pytest.approx(
                        single[f"sklearn/{r}"], abs=1e-6
                    )
            assert reported[f"{stage}/loss"] == pytest.approx(single[f"{stage}/loss"], rel=1e-5)
        predictions = pd.read_csv(run / "test_predictions.csv")
        split = pd.read_csv(run / "split.csv")
        assert sorted(predictions["path"]) == sorted(split.loc[split["split"] == "test", "path"])


# -- the lightning-hydra-template #393 case: -m with DDP, here a k-fold sweep -----------------
def test_multirun_with_ddp_kfold_gather_and_resume(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "trainer=ddp_sim",
        "hparams_search=kfold",
        "data.folds=2",
        *TINY,
        "data.phantom.per_region=7",
        "data.batch_size=4",
        f"hydra.sweep.dir={sweep}",
    ]
    _ok(regionnet_train(args, tmp_path))
    # two jobs, each run once in its own directory; no child started a sweep of its own
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "outputs").exists()
    tested = []
    for fold in (0, 1):
        run = sweep / str(fold)
        assert OmegaConf.load(run / "config.yaml").data.fold == fold
        split = pd.read_csv(run / "split.csv")
        assert _metrics(run)["test/images"] == (split["split"] == "test").sum()
        tested += pd.read_csv(run / "test_predictions.csv")["path"].tolist()
    # every radiograph tested exactly once over the folds (DDP-gathered predictions)
    assert sorted(tested) == sorted(split["path"])

    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation" in printed and "pooled_auroc_mean" in printed
    cv = pd.read_csv(sweep / "cross_validation.csv")
    assert len(cv) == 1 and cv.loc[0, "folds_done"] == 2 and cv.loc[0, "pooled_images"] == 56
    assert 0 <= cv.loc[0, "pooled_auroc_mean"] <= 1 and cv.loc[0, "test_auroc_mean_sd"] >= 0

    # resuming: the same sweep again skips both finished jobs
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/checkpoints/best.ckpt")}
    before = {fold: _metrics(sweep / str(fold)) for fold in (0, 1)}
    _ok(regionnet_train(args, tmp_path))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {fold: _metrics(sweep / str(fold)) for fold in (0, 1)} == before


# -- sweeps ------------------------------------------------------------------------------------
def _wandb_records(run_file: Path):
    """Records of an offline W&B run file (`run-<id>.wandb`, LevelDB-log framing of
    `wandb_internal_pb2.Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = run_file.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _wandb_run(run: Path) -> tuple[str, list[str], dict]:
    """(group, tags, final summary) of the job's offline W&B run."""
    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    group, tags, summary = None, [], {}
    for record in _wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group, tags = record.run.run_group, list(record.run.tags)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = item.value_json
    return group, tags, summary


def test_backbone_sweep_gathers_one_row_per_backbone_in_one_wandb_group(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hparams_search=backbones",
        "model=resnet18",
        "model.optimizer.lr=0.001",
        *TINY,
        "model.backbone=test_resnet,test_efficientnet",  # after TINY's: the last one counts
        "data.image_size=32",  # a command-line value replaces the sweep's 224,320 list
        *CPU,
        "logger=wandb",
        "tags=[scale-test]",
        f"hydra.sweep.dir={sweep}",
    ]
    _ok(regionnet_train(args, tmp_path, WANDB_MODE="offline"))

    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    runs = pd.read_csv(sweep / "sweep_runs.csv")
    assert runs["backbone"].tolist() == ["test_resnet", "test_efficientnet"]
    assert "test_resnet" in printed and "test_efficientnet" in printed
    assert (runs["status"] == "done").all() and (runs["images_per_s"] > 0).all()
    assert runs["params"].iloc[0] > runs["params"].iloc[1] > 0
    assert runs["val_auroc_mean"].between(0, 1).all()

    groups = set()
    for job in ("0", "1"):
        group, tags, summary = _wandb_run(sweep / job)
        groups.add(group)
        assert tags == ["scale-test"]
        metrics = _metrics(sweep / job)
        wanted = ["val/auroc_mean_best", "test/auroc_mean", *(f"test/auroc/{r}" for r in REGIONS)]
        for key in wanted:
            if key in metrics:
                assert json.loads(summary[key]) == pytest.approx(metrics[key])
        assert "val/auroc_mean_best" in summary and "test/auroc/knee" in summary
        assert any(k.startswith("test/confusion") for k in summary)
    assert groups == {f"backbones-{sweep.name}"}


def test_optuna_sweep_runs_three_trials_stored_in_sqlite(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "model=resnet18",
        "model.optimizer.weight_decay=0.0001",
        *TINY,
        *CPU,
        "test=false",
        f"hydra.sweep.dir={sweep}",
    ]
    _ok(regionnet_train(args, tmp_path))
    study = optuna.load_study(study_name="regionnet", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert len({t.params["model.optimizer.lr"] for t in study.trials}) == 3
    reported = sorted(_metrics(sweep / str(k))["val/auroc_mean"] for k in range(3))
    assert sorted(t.value for t in study.trials) == pytest.approx(reported)
    assert (sweep / "optimization_results.yaml").is_file()


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "seed=1,2", *TINY, *CPU, "test=false"]
    _ok(regionnet_train([*args, f"hydra.sweep.dir={sweep}"], tmp_path))
    assert (sweep / ".submitit").is_dir()
    for job, seed in (("0", 1), ("1", 2)):
        assert OmegaConf.load(sweep / job / "config.yaml").seed == seed
        assert _metrics(sweep / job)["val/images"] > 0


# -- pieces, without training ------------------------------------------------------------------
def test_a_ddp_child_runs_its_parents_job_as_one_run():
    task = ["trainer=ddp_sim", "seed=1", "model=efficientnet_b0"]
    hydra = [
        "hydra.mode=MULTIRUN",
        "hydra.sweep.dir=/sweeps/s",
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_trials=3",
        "hydra.job.chdir=false",
        "hydra.verbose=true",
    ]
    assert child_overrides(task, hydra, "/sweeps/s/1") == [
        *task,
        "hydra.job.chdir=false",
        "hydra.verbose=true",
        "hydra.mode=RUN",
        'hydra.run.dir="/sweeps/s/1"',
        "hydra.output_subdir=null",
    ]


def test_skip_if_done_skips_only_a_finished_run_of_the_same_config(tmp_path):
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *TINY])
    assert finished_run(cfg) is None  # nothing there
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert finished_run(cfg) is None  # started, not finished
    (tmp_path / "metrics.json").write_text(json.dumps({"val/auroc_mean": 0.9}))
    assert finished_run(cfg) == {"val/auroc_mean": 0.9}
    shown = compose_config(
        "train", [f"paths.output_dir={tmp_path}", *TINY, "logger=none", "callbacks.progress_bar=x"]
    )
    assert finished_run(shown) == {"val/auroc_mean": 0.9}  # display settings do not count
    again = compose_config("train", [*TINY, f"paths.output_dir={tmp_path}", "skip_if_done=false"])
    assert finished_run(again) is None
    other = compose_config("train", [f"paths.output_dir={tmp_path}", *TINY, "seed=7"])
    assert finished_run(other) is None
    assert not (tmp_path / "metrics.json").exists()  # the other config's run starts clean
    (archive,) = tmp_path.glob("superseded-*")  # and the finished run is kept, not deleted
    assert json.loads((archive / "metrics.json").read_text()) == {"val/auroc_mean": 0.9}


def _fake_job(run: Path, fold: int, probs: list[float], labels: list[int]) -> None:
    run.mkdir(parents=True)
    config = {
        "seed": 0,
        "model": {"backbone": "resnet18", "optimizer": {"lr": 0.001}},
        "data": {"image_size": 64, "batch_size": 8, "folds": 2, "fold": fold},
    }
    OmegaConf.save(OmegaConf.create(config), run / "config.yaml")
    auroc = roc_auc_score(labels, probs)
    metrics = {"test/auroc_mean": auroc, "test/auroc_min": auroc, "val/auroc_mean": 0.5}
    (run / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame(
        {
            "path": [f"{fold}/{i}" for i in range(len(probs))],
            "true_region": ["knee" if y else "other" for y in labels],
            "p_knee": probs,
            "label_knee": labels,
        }
    ).to_csv(run / "test_predictions.csv", index=False)


def test_gather_reports_folds_mean_sd_and_pooled_auroc(tmp_path):
    a = ([0.9, 0.8, 0.3, 0.2, 0.6], [1, 1, 0, 0, 0])
    b = ([0.55, 0.4, 0.7, 0.1], [1, 0, 1, 0])
    _fake_job(tmp_path / "0", 0, *a)
    _fake_job(tmp_path / "1", 1, *b)
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job that never finished
    OmegaConf.save(
        OmegaConf.create({"model": {"backbone": "x"}}), tmp_path / "2/.hydra/config.yaml"
    )

    runs = gather(tmp_path)
    assert runs["run"].tolist() == ["0", "1", "2"]
    assert runs["status"].tolist() == ["done", "done", "unfinished"]
    cv = cross_validation(runs, tmp_path)
    folds = [roc_auc_score(a[1], a[0]), roc_auc_score(b[1], b[0])]
    assert cv.loc[0, "folds_done"] == 2
    assert cv.loc[0, "test_auroc_mean_mean"] == pytest.approx(np.mean(folds))
    assert cv.loc[0, "test_auroc_mean_sd"] == pytest.approx(np.std(folds, ddof=1))
    pooled = roc_auc_score(a[1] + b[1], a[0] + b[0])
    assert cv.loc[0, "pooled_auroc/knee"] == pytest.approx(pooled, abs=1e-6)
    assert pooled_auroc(pd.read_csv(tmp_path / "0/test_predictions.csv"))[
        "pooled_auroc_mean"
    ] == pytest.approx(folds[0], abs=1e-6)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "| run |" in (tmp_path / "out/sweep_runs.md").read_text()
    assert (tmp_path / "out/cross_validation.csv").is_file()


@pytest.mark.parametrize("option", ["backbones", "optuna", "kfold"])
def test_every_hparams_search_composes(option, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config("train", [f"hparams_search={option}", f"paths.output_dir={tmp_path}"])
    assert cfg.optimized_metric == "val/auroc_mean"


def test_slurm_preset_requests_the_trainers_gpus_and_nodes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra does: every setting must resolve
    assert type(launcher).__name__ == "SlurmLauncher"
    wanted = {"gpus_per_node": 4, "tasks_per_node": 4, "nodes": 2, "partition": None}
    assert {k: launcher.params[k] for k in wanted} == wanted


def test_wandb_sweep_config_drives_regionnet_train(tmp_path):
    sweep = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "wandb_sweep.yaml"))
    assert sweep["program"] == "regionnet-train" and "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"] == {"name": "val/auroc_mean", "goal": "maximize"}
    overrides = []
    for key, spec in sweep["parameters"].items():
        overrides.append(f"{key}={spec['values'][-1] if 'values' in spec else spec['max']}")
    cfg = compose_config("train", [*overrides, f"paths.output_dir={tmp_path}"])
    assert cfg.model.backbone == sweep["parameters"]["model"]["values"][-1]


# -- speed options -----------------------------------------------------------------------------
def test_channels_last_and_bf16_train(tmp_path):
    cfg = compose_config(
        "train",
        [*TINY, "trainer.fast_dev_run=true", f"paths.output_dir={tmp_path}", *CPU]
        + ["model.channels_last=true", "trainer.precision=bf16-mixed"],
    )
    assert np.isfinite(train(cfg)["test/loss"])


def test_compile_trains_and_keeps_checkpoint_keys(tmp_path):
    """torch.compile of the backbone on CPU, fast_dev_run: 40-50 s, mostly compiling."""
    cfg = compose_config(
        "train",
        [*TINY, "trainer.fast_dev_run=true", f"paths.output_dir={tmp_path}", *CPU]
        + ["model.compile=true"],
    )
    assert np.isfinite(train(cfg)["test/loss"])
    model = build_model(cfg, REGIONS)
    keys = list(model.state_dict())
    speed_up(model, channels_last=True, compile=True)
    assert list(model.state_dict()) == keys  # checkpoints load into an uncompiled model
