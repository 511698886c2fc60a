"""DDP for the landmark, box and composed head types: `regionnet-train trainer=ddp_sim
task=landmarks|boxes|multi` runs two gloo processes on the CPU, both exit 0, rank 0 alone
writes the run, and the test metrics synced across the processes (the landmark metrics' cat
states, torchmetrics' MeanAveragePrecision, the region metrics) equal a one-process
`regionnet-eval` of the same checkpoint on the same split: no film repeated or dropped by the
samplers (odd split sizes), nothing lost in the sync. Tiny phantom spines (4 vertebrae, 64 px
input, random resnet18, one epoch), with region phantoms for the composed model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_scale import TIMEOUT_S, _env, _exe

from regionnet.config import compose_config
from regionnet.evaluate import evaluate

COMMON = [
    "trainer=ddp_sim",
    "debug=tiny",
    "data.dataset=phantom",
    "data.phantom.n=34",  # odd test and validation splits (5 each): padding would show
    "data.phantom.size=[128,64]",
    "data.phantom.vertebrae=4",
    "data.image_size=64",
    "data.batch_size=4",
    "model.backbone=resnet18",
]
# region heads with landmark and box parts (regionnet/compose): region phantoms and the same
# synthetic spines, the spine keys under data.landmarks
MULTI = [
    "task=multi",
    "data@data.regions=phantom",
    "data.regions.phantom.per_region=5",  # odd test split (13 films with the spines)
    "data.landmark_region=null",
    "model.parts.landmarks.width=32",
    "model.parts.boxes={width: 64}",
    *(o.replace("data.", "data.landmarks.", 1) if o.startswith(("data.dataset", "data.phantom"))
      else o for o in COMMON),
]  # fmt: skip
TASKS = {
    "landmarks": ["task=landmarks", "model.head_width=32", *COMMON],
    "boxes": ["task=boxes", "model.fpn_width=64", *COMMON],
    "multi": MULTI,
}
CACHE = {"landmarks": "data.phantom.cache", "boxes": "data.phantom.cache",
         "multi": "data.landmarks.phantom.cache"}  # fmt: skip
# metrics.json keys a one-process evaluation gives too
COMPARED = {
    "landmarks": ("test/mre_px", "test/mre_pct", "test/err_x_median_pct", "test/err_y_mean_pct"),
    "boxes": ("test/map", "test/map_50", "test/map_75"),
    "multi": ("test/auroc_mean", "test/landmarks/mre_px", "test/boxes/map_50"),
}
# the evaluation's count of test films
FILMS = {"landmarks": "test/films", "boxes": "test/films", "multi": "test/images"}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Both tasks' DDP runs, started together: task -> (run dir, exit code, output)."""
    cwd = tmp_path_factory.mktemp("ddp_heads")
    procs = {}
    for task, extra in TASKS.items():
        run = cwd / task
        args = [*extra, f"{CACHE[task]}={cwd / 'phantoms'}", f"hydra.run.dir={run}"]
        procs[task] = (
            run,
            subprocess.Popen(
                [_exe(), *args],
                cwd=cwd,
                env=_env(cwd, {}),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            ),
        )
    out = {}
    for task, (run, proc) in procs.items():
        text, _ = proc.communicate(timeout=TIMEOUT_S)
        out[task] = (run, proc.returncode, text.decode(errors="replace"))
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_ddp_runs_every_head_type_in_two_processes(ddp_runs, task, tmp_path):
    run, code, text = ddp_runs[task]
    assert code == 0, text[-6000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # really two processes
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert len(list((run / "csv").iterdir())) == 1  # one logger version: rank 0's
    reported = json.loads((run / "metrics.json").read_text())
    split = pd.read_csv(run / "split.csv")
    n_test = int((split["split"] == "test").sum())
    assert n_test % 2 == 1 or int((split["split"] == "val").sum()) % 2 == 1
    single = evaluate(
        compose_config(
            "eval",
            [
                f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                f"paths.output_dir={tmp_path}",
                "num_workers=0",
                "trainer.accelerator=cpu",
                "bootstrap.resamples=20",
            ],
        )
    )
    assert single[FILMS[task]] == n_test
    # test_predictions.csv holds every test film once: both processes' films, gathered
    rows = pd.read_csv(run / "test_predictions.csv")
    assert len(rows) == n_test and rows["path"].is_unique
    assert set(rows["path"]) == set(split.loc[split["split"] == "test", "path"])
    for key in COMPARED[task]:
        assert reported[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


# -- sweeps: a landmark search minimises the landmark task's own metric ------------------------
def test_a_landmark_optuna_sweep_minimises_val_mre_and_gathers_it(tmp_path):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from test_scale import _ok, regionnet_train

    from regionnet.sweep import gather

    sweep = tmp_path / "sweep"
    tiny = [a for a in COMMON if a != "trainer=ddp_sim"] + ["trainer.accelerator=cpu"]
    args = [
        "-m",
        "task=landmarks",
        "hparams_search=landmarks",
        "hydra.sweeper.n_trials=2",
        "model.head_width=32",  # keys given on the command line are fixed: only lr is searched
        *tiny,
        f"data.phantom.cache={tmp_path / 'phantoms'}",
        "test=false",
        f"hydra.sweep.dir={sweep}",
    ]
    _ok(regionnet_train(args, tmp_path))
    study = optuna.load_study(
        study_name="regionnet_landmarks", storage=f"sqlite:///{sweep / 'optuna.db'}"
    )
    assert study.direction.name == "MINIMIZE"
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    rows = gather(sweep)
    assert list(rows["optimized_metric"]) == ["val/mre_pct"] * 2
    assert sorted(rows["optimized_value"]) == pytest.approx(sorted(t.value for t in study.trials))


def test_a_search_for_a_metric_the_task_does_not_log_says_which_to_use(tmp_path):
    """hparams_search=optuna optimises val/auroc_mean, which landmark runs do not log: the
    run stops with the task's metric named instead of handing the sweeper None."""
    from test_scale import regionnet_train

    tiny = [a for a in COMMON if a != "trainer=ddp_sim"] + ["trainer.accelerator=cpu"]
    proc = regionnet_train(
        ["task=landmarks", "model.head_width=32", *tiny, "optimized_metric=val/auroc_mean",
         f"data.phantom.cache={tmp_path / 'phantoms'}", "test=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "optimized_metric=val/auroc_mean is not among this run's metrics" in proc.stderr
    assert "val/mre_pct" in proc.stderr and "hparams_search=landmarks" in proc.stderr
