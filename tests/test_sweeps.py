"""Sweeps and clusters that never discard finished work: `skip_if_done` compares only the keys
that change a run and moves earlier runs aside instead of training over them, a requeued job
resumes from `last.ckpt`, an extended Optuna study draws new trials, DDP children get
regionnet's command only when there are children, and a split smaller than the DDP world
fails at setup. Fast: fake run directories, fake trainers and world sizes; one tiny training.
"""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from regionnet.config import CONF_DIR, compose_config
from regionnet.sweep import (
    IGNORED_KEYS,
    config_diff,
    finished_run,
    gather,
    optuna_seed,
    optuna_trials,
)

TINY = ["debug=tiny", "model.backbone=test_resnet"]
METRICS = {"val/auroc_mean": 0.9, "test/auroc_mean": 0.8}


def _cfg(run: Path, *overrides: str):
    return compose_config("train", [*TINY, f"paths.output_dir={run}", *overrides])


def _fake_run(run: Path, *overrides: str, finished: bool = True) -> dict[Path, bytes]:
    """A run directory as `train` leaves it (config.yaml, split.csv, checkpoints, metrics.json
    when finished, a log), without training; returns its files' contents."""
    cfg = _cfg(run, *overrides)
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    (run / "split.csv").write_text("path,split\na.png,train\n")
    (run / "checkpoints/best.ckpt").write_bytes(b"best weights")
    (run / "checkpoints/last.ckpt").write_bytes(b"last weights")
    (run / "train.log").write_text("the first run's log\n")
    if finished:
        (run / "metrics.json").write_text(json.dumps(METRICS))
    return {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}


def _files(run: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}


# -- item 14: skip_if_done compares what changes the result, and deletes nothing ---------------
def test_a_relaunch_changing_only_loader_and_display_settings_skips_and_touches_nothing(tmp_path):
    before = _fake_run(tmp_path)
    stamps = {f: f.stat().st_mtime_ns for f in before}
    relaunch = _cfg(
        tmp_path,
        "data.num_workers=4",
        "data.pin_memory=true",
        "data.persistent_workers=false",
        "callbacks.progress_bar=null",
        "logger=none",
        "+trainer.enable_progress_bar=false",
        "model.compile=true",
        "tags=[again]",
    )
    assert finished_run(relaunch) == METRICS
    assert _files(tmp_path) == before
    assert {f: f.stat().st_mtime_ns for f in before} == stamps
    assert relaunch.ckpt_path is None  # a finished run is not resumed either


@pytest.mark.parametrize("skip_if_done", [True, False])
def test_a_finished_run_of_another_config_is_moved_aside_never_deleted(
    tmp_path, caplog, skip_if_done
):
    before = _fake_run(tmp_path)
    other = _cfg(tmp_path, "model.optimizer.lr=0.0003", f"skip_if_done={skip_if_done}")
    with caplog.at_level(logging.WARNING, logger="regionnet.sweep"):
        assert finished_run(other) is None
    (archive,) = tmp_path.glob("superseded-*")
    # every file of the first run is kept, byte for byte, under the archive
    for f, content in before.items():
        assert (archive / f.relative_to(tmp_path)).read_bytes() == content
    # the run directory is free for the new run; its log (open for the new job) stays, copied
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name, "train.log"]
    assert other.ckpt_path is None  # another config's last.ckpt is never resumed
    assert "model.optimizer.lr" in caplog.text and str(archive) in caplog.text
    assert "model.optimizer.lr" in (archive / "SUPERSEDED.txt").read_text()


def test_same_config_with_skip_if_done_false_trains_again_keeping_the_old_run(tmp_path):
    _fake_run(tmp_path)
    again = _cfg(tmp_path, "skip_if_done=false")
    assert finished_run(again) is None
    (archive,) = tmp_path.glob("superseded-*")
    assert json.loads((archive / "metrics.json").read_text()) == METRICS
    assert "skip_if_done is false" in (archive / "SUPERSEDED.txt").read_text()


def test_two_relaunches_keep_both_earlier_runs(tmp_path):
    _fake_run(tmp_path)
    finished_run(_cfg(tmp_path, "seed=7"))
    (tmp_path / "metrics.json").write_text(json.dumps({"val/auroc_mean": 0.5}))
    OmegaConf.save(_cfg(tmp_path, "seed=7"), tmp_path / "config.yaml", resolve=True)
    finished_run(_cfg(tmp_path, "seed=8"))
    kept = sorted(
        json.loads(f.read_text())["val/auroc_mean"] for f in tmp_path.glob("*/metrics.json")
    )
    assert kept == [0.5, 0.9]


def test_a_reordered_grid_keeps_every_run_and_names_where_this_config_finished(
    tmp_path, monkeypatch, caplog
):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(
        HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN))
    )
    first = {**_fake_run(tmp_path / "0", "seed=1"), **_fake_run(tmp_path / "1", "seed=2")}
    with caplog.at_level(logging.WARNING, logger="regionnet.sweep"):
        assert finished_run(_cfg(tmp_path / "0", "seed=2")) is None  # seed=2,1 this time
        assert f"a finished run of this config is in {tmp_path / '1'} " in caplog.text
        assert finished_run(_cfg(tmp_path / "1", "seed=1")) is None
        (moved,) = (tmp_path / "0").glob("superseded-*")
        assert f"a finished run of this config is in {moved} " in caplog.text
    # both earlier runs kept, byte for byte: <job>/<archive>/<file> holds <job>/<file>
    for f, content in first.items():
        job, *rest = f.relative_to(tmp_path).parts
        (kept,) = (tmp_path / job).glob(f"superseded-*/{'/'.join(rest)}")
        assert kept.read_bytes() == content


def test_only_rank_zero_moves_files(tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    before = _fake_run(tmp_path)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert finished_run(_cfg(tmp_path, "seed=7")) is None
    assert _files(tmp_path) == before


def test_config_diff_ignores_only_the_documented_keys():
    old = {"seed": 1, "data": {"num_workers": 2, "image_size": 32}, "paths": {"output_dir": "a"}}
    assert config_diff(old, {**old, "paths": {"output_dir": "b"}}) == []
    assert config_diff(old, {**old, "data": {"num_workers": 8, "image_size": 32}}) == []
    assert config_diff(old, {**old, "data": {"num_workers": 2, "image_size": 64}}) == [
        "data.image_size"
    ]
    assert config_diff(old, {**old, "new_key": 1}) == ["new_key"]  # a key on one side counts
    assert config_diff({"callbacks": {"ema": None}}, {"callbacks": {"ema": {"decay": 0.9}}})
    for key in ("data.num_workers", "data.pin_memory", "data.persistent_workers", "logger"):
        assert key in IGNORED_KEYS
    for key in ("seed", "data", "model", "trainer", "callbacks", "test"):
        assert key not in IGNORED_KEYS


def test_gather_leaves_out_superseded_runs(tmp_path):
    _fake_run(tmp_path / "0")
    finished_run(_cfg(tmp_path / "0", "seed=7"))  # job 0 now holds a started run of seed 7
    OmegaConf.save(_cfg(tmp_path / "0", "seed=7"), tmp_path / "0/config.yaml", resolve=True)
    runs = gather(tmp_path)
    assert runs["run"].tolist() == ["0"] and runs["seed"].tolist() == [7]
    assert runs["status"].tolist() == ["unfinished"]


# -- item 16: a requeued or re-launched job resumes from last.ckpt -----------------------------
def test_an_unfinished_run_of_the_same_config_resumes_from_last_ckpt(tmp_path):
    before = _fake_run(tmp_path, finished=False)
    cfg = _cfg(tmp_path, "data.num_workers=3")  # a requeue may change only ignored keys
    assert finished_run(cfg) is None
    assert cfg.ckpt_path == str(tmp_path / "checkpoints/last.ckpt")
    assert _files(tmp_path) == before  # nothing moved: the fit goes on in place
    # a newer SLURM HPC checkpoint (Lightning's requeue on SIGUSR1) wins over last.ckpt
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"hpc")
    cfg = _cfg(tmp_path)
    finished_run(cfg)
    assert cfg.ckpt_path == str(tmp_path / "hpc_ckpt_1.ckpt")
    # a ckpt_path given on the command line is kept; skip_if_done=false starts again
    given = _cfg(tmp_path, "ckpt_path=/elsewhere/x.ckpt")
    finished_run(given)
    assert given.ckpt_path == "/elsewhere/x.ckpt"
    fresh = _cfg(tmp_path, "skip_if_done=false")
    finished_run(fresh)
    assert fresh.ckpt_path is None and len(list(tmp_path.glob("superseded-*/checkpoints"))) == 1


class _TrainBatches(L.Callback):
    """Counts training batches."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, *args, **kwargs):
        self.batches += 1


def test_train_resumes_an_interrupted_run_and_keeps_a_superseded_one(tmp_path):
    """One tiny training end to end: killed after its last checkpoint (no metrics.json), the
    same job resumes (no batch trained again); then another LR moves the finished run aside."""
    from regionnet.train import train

    base = ["data.phantom.per_region=6", "data.batch_size=8", "test=false"]
    first = train(_cfg(tmp_path, *base))
    (tmp_path / "metrics.json").unlink()  # as if killed before the end
    counter = _TrainBatches()
    resumed = train(_cfg(tmp_path, *base), extra_callbacks=[counter])
    assert counter.batches == 0  # the epoch was done: restored from last.ckpt, not retrained
    assert resumed["val/auroc_mean"] == pytest.approx(first["val/auroc_mean"])
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.ckpt_path == str(tmp_path / "checkpoints/last.ckpt")
    best = (tmp_path / "checkpoints/best.ckpt").read_bytes()
    train(_cfg(tmp_path, *base, "model.optimizer.lr=0.0003"))
    (archive,) = tmp_path.glob("superseded-*")
    assert (archive / "checkpoints/best.ckpt").read_bytes() == best
    assert json.loads((archive / "metrics.json").read_text()) == pytest.approx(resumed)


# -- item 15: an extended Optuna study draws new parameters ------------------------------------
def _sampler(sweep_dir: Path, storage: Path):
    """The sampler hparams_search=optuna builds, as Hydra instantiates it for a sweep."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from regionnet.sweep import register_resolvers

    register_resolvers()
    overrides = [
        "hparams_search=optuna",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.storage=sqlite:///{storage}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return instantiate(cfg.hydra.sweeper.sampler), cfg


def _sweep(sampler, storage: Path, n: int) -> list[dict]:
    """`n` trials of the study on `storage` with a cheap objective, as the sweeper asks them
    (the search space of conf/hparams_search/optuna.yaml, in the plugin's distributions)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = OmegaConf.load(CONF_DIR / "hparams_search/optuna.yaml").hydra.sweeper.params
    space, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="regionnet",
        storage=f"sqlite:///{storage}",
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    drawn = []
    for _ in range(n):
        trial = study.ask(fixed_distributions=space)
        drawn.append(trial.params)
        study.tell(trial, trial.params["model.optimizer.lr"])
    return drawn


def test_an_extended_optuna_study_does_not_redraw_its_first_trials(tmp_path):
    pytest.importorskip("optuna")
    storage = tmp_path / "optuna.db"  # shared by both sweeps
    sampler, cfg = _sampler(tmp_path / "first", storage)
    assert optuna_trials(cfg.hydra.sweeper.storage, "regionnet") == 0
    assert sampler._random_sampler._rng.get_state()[1][0] == 42  # seed: a new study's = ${seed}
    first = _sweep(sampler, storage, 3)
    assert len({p["model.optimizer.lr"] for p in first}) == 3

    # a second sweep (new sweep dir) on the same storage: 3 trials stored, another seed
    sampler, cfg = _sampler(tmp_path / "second", storage)
    assert optuna_trials(cfg.hydra.sweeper.storage, "regionnet") == 3
    second = _sweep(sampler, storage, 3)
    lrs = [p["model.optimizer.lr"] for p in first + second]
    assert len(set(lrs)) == 6, lrs
    assert first[0] != second[0]
    # the seed is reproducible: same seed and trial count, same sampler seed
    assert (
        optuna_seed(42, cfg.hydra.sweeper.storage, "regionnet")
        == optuna_seed(42, f"sqlite:///{storage}", "regionnet")
        != 42
    )


def test_optuna_seed_without_a_storage_or_study_is_the_seed(tmp_path):
    assert optuna_seed(5, None, "regionnet") == 5
    missing = tmp_path / "none.db"
    assert optuna_seed(5, f"sqlite:///{missing}", "regionnet") == 5
    assert not missing.exists()  # looking does not create the file
    assert optuna_seed(None, f"sqlite:///{missing}", "regionnet") is None


def test_two_optuna_sweeps_on_one_storage_through_hydra(tmp_path):
    """The real sweeper (hydra-optuna-sweeper) with a cheap task function: the second sweep's
    first trial is not the first sweep's."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            f"""
            import hydra
            from regionnet.sweep import register_resolvers

            register_resolvers()

            @hydra.main(version_base="1.3", config_path={str(CONF_DIR)!r}, config_name="train")
            def main(cfg):
                return -abs(cfg.model.optimizer.lr - 0.001)

            main()
            """
        )
    )
    storage = tmp_path / "optuna.db"
    for name in ("a", "b"):
        args = [
            sys.executable,
            str(app),
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage=sqlite:///{storage}",
            f"hydra.sweep.dir={tmp_path / name}",
        ]
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="regionnet", storage=f"sqlite:///{storage}").trials
    assert len(trials) == 4
    assert trials[0].params != trials[2].params and trials[1].params != trials[3].params


# -- item 16: Lightning's child command is replaced only when Lightning starts children --------
def _trainer(processes: int, external: bool = False):
    """A trainer as `DistributedJob.track` sees it: its strategy's launcher."""
    environment = SimpleNamespace(creates_processes_externally=external)
    launcher = SimpleNamespace(num_processes=processes, cluster_environment=environment)
    return SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))


def _command():
    from lightning.pytorch.strategies.launchers import subprocess_script

    return subprocess_script._hydra_subprocess_cmd


def _is_ours(command) -> bool:
    from regionnet.distributed import child_command

    return getattr(command, "func", None) is child_command


def test_child_command_is_patched_only_for_several_local_processes():
    from regionnet.distributed import DistributedJob

    original = _command()
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    for trainer, patched in (
        (single, False),  # one process: Lightning's function is left alone
        (_trainer(4, external=True), False),  # srun/torchrun start the processes
        (ddp, True),  # Lightning's launcher starts a child: it runs this job
    ):
        with DistributedJob() as job:
            job.track(trainer)
            assert _is_ours(_command()) is patched
        assert _command() is original


def test_an_untested_lightning_warns_and_a_missing_function_is_not_patched(monkeypatch):
    import lightning
    from lightning.pytorch.strategies.launchers import subprocess_script
    from packaging.version import Version

    from regionnet.distributed import TESTED_LIGHTNING, DistributedJob

    low, high = (Version(v) for v in TESTED_LIGHTNING)
    assert low <= Version(lightning.__version__) < high  # the installed one was tested
    original = _command()
    monkeypatch.setattr(lightning, "__version__", "2.9.0")
    untested = pytest.warns(RuntimeWarning, match=r"tested with lightning>=2\.6,<2\.7; this is")
    with untested, DistributedJob() as job:
        job.track(_trainer(2))
        assert _is_ours(_command())
    assert _command() is original
    monkeypatch.delattr(subprocess_script, "_hydra_subprocess_cmd")
    missing = pytest.warns(RuntimeWarning, match="starts the whole sweep again")
    with missing, DistributedJob() as job:
        job.track(_trainer(2))
    assert not hasattr(subprocess_script, "_hydra_subprocess_cmd")


# -- item 17: a split smaller than the DDP world fails at setup, not after the fit -------------
def _datamodule(**kwargs):
    from regionnet.data.datamodule import RegionDataModule

    phantom = {"per_region": 6, "other_regions": ["chest"], "seed": 0}  # 6 val, 6 test
    return RegionDataModule(source="phantom", phantom=phantom, image_size=32, **kwargs)


def test_a_split_smaller_than_the_world_size_fails_at_setup(monkeypatch):
    dm = _datamodule()
    dm.setup()  # as train does, before the trainer exists: world size unknown, no check
    sizes = dm.records["split"].value_counts()
    assert 0 < sizes["val"] < 8 and sizes["test"] >= 2
    dm.trainer = SimpleNamespace(world_size=1)
    dm.setup("fit")  # one process: any split size will do
    dm.trainer = SimpleNamespace(world_size=8)  # Lightning attaches its trainer before setup
    with pytest.raises(ValueError, match=r"the val split holds \d radiograph\(s\), fewer") as e:
        dm.setup("fit")
    message = str(e.value)
    assert "8 DDP processes" in message and "data.split_fractions" in message
    assert f"at most {sizes['val']} process" in message

    # the world size from torch.distributed, as under DDP; first the datamodule's first setup
    dm = _datamodule()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dm.setup("fit")  # every evaluated split holds at least 2
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 64)
    with pytest.raises(ValueError, match="the val split holds .* fewer than the 64 DDP"):
        _datamodule().setup("fit")
    # the test split too (tested after the whole fit): 12 val, 6 test radiographs
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    with pytest.raises(ValueError, match="the test split holds 6 radiograph"):
        _datamodule(split_fractions=[0.5, 0.3, 0.2]).setup("fit")


# -- item 16: srun gets the job's CPUs per task -------------------------------------------------
def test_slurm_multinode_script_passes_cpus_per_task_to_srun(tmp_path):
    """The script under a fake `srun` (records its arguments) with a 2-node SLURM job's
    environment."""
    fake = tmp_path / "bin/srun"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:/usr/bin:/bin",
        "SRUN_ARGS": str(tmp_path / "args"),
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_JOB_NAME": "regionnet",
        "SLURM_JOB_ID": "123",
        "REGIONNET_LOG_DIR": str(tmp_path / "logs"),
    }
    script = CONF_DIR.parent / "scripts/slurm_multinode.sh"
    proc = subprocess.run(["bash", str(script), "model=resnet18"], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:2] == ["--cpus-per-task=8", "regionnet-train"]
    for wanted in ("trainer.num_nodes=2", "trainer.devices=4", "data.num_workers=7"):
        assert wanted in args
    assert f"hydra.run.dir={tmp_path}/logs/train/slurm/regionnet-123" in args
    assert args[-1] == "model=resnet18"


def test_slurm_launcher_preset_exports_srun_cpus_per_task(tmp_path):
    """Submitit's sbatch script from the preset: srun reads SRUN_CPUS_PER_TASK (Slurm >= 22.05
    does not inherit --cpus-per-task)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from submitit.slurm.slurm import _make_sbatch_string

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    params = instantiate(cfg.hydra.launcher).params
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit",
        folder=str(tmp_path),
        setup=params["setup"],
        cpus_per_task=params["cpus_per_task"],
        ntasks_per_node=params["tasks_per_node"],
    )
    lines = sbatch.splitlines()
    export = lines.index("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK")
    assert "#SBATCH --cpus-per-task=8" in lines
    assert export < next(k for k, line in enumerate(lines) if line.startswith("srun "))
