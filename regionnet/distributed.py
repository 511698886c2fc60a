"""DDP under Hydra: child processes that run the parent's job, and a clean end of each job.

Lightning's `ddp` strategy starts `devices - 1` more processes per node by running the
command again (its subprocess launcher), with `LOCAL_RANK` etc. in their environment. Under
Hydra it re-runs `sys.argv` plus `hydra.run.dir=<run dir>`, which breaks multiruns
(lightning-hydra-template issue #393): each child re-reads `-m`, starts the whole sweep again
in a new sweep directory and never joins its parent. Here a child runs exactly the parent's
job instead: that job's overrides, as a single run (`hydra.mode=RUN`) in the job's output
directory, with the same config sources. This replaces Lightning's private
`_hydra_subprocess_cmd` for the job, only when Lightning will start child processes (more than
one process on this node, not started by SLURM or another launcher), and only on a Lightning
whose function has the signature this was tested with (`TESTED_LIGHTNING`; a warning outside).

A multirun also runs its jobs one after another in one process, so each job must leave no
trace for the next: the launcher's environment variables (with `LOCAL_RANK` left set, the
next job would think its processes were started externally and wait forever for them) and
the process group (gloo processes can abort at exit without `destroy_process_group`).
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

# set by Lightning's launcher in the parent process (see module docstring)
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that belong to the sweep, not to the job a child must reproduce
SWEEP_KEYS = (
    "hydra.mode",
    "hydra.run.",
    "hydra.sweep.",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.job.num",
    "hydra.job.id",
    "hydra.output_subdir",
)
CHILD_EXIT_TIMEOUT_S = 300
# Lightning versions [from, to) whose private `_hydra_subprocess_cmd` (replaced by
# `child_command`) this module was tested with
TESTED_LIGHTNING = ("2.6", "2.7")
# The entry point a child runs: regionnet-train's task function. Not sys.argv[0]: under the
# submitit launcher the job's process is submitit's, not regionnet-train.
CHILD_PROGRAM = "from regionnet.cli import train_main; train_main()"


def child_overrides(task: Sequence[str], hydra: Sequence[str], output_dir: str) -> list[str]:
    """The overrides of a DDP child: the job's task overrides, the user's Hydra overrides
    less the sweep's, and a single run in the parent job's output directory that writes no
    `.hydra/` of its own."""
    keep = [o for o in hydra if not o.lstrip("+~").startswith(SWEEP_KEYS)]
    return [
        *task,
        *keep,
        "hydra.mode=RUN",
        f'hydra.run.dir="{output_dir}"',
        "hydra.output_subdir=null",
    ]


def child_command(local_rank: int, program: str = CHILD_PROGRAM) -> tuple[list[str], str]:
    """Command and working directory of DDP child `local_rank` under Hydra; replaces
    Lightning's `_hydra_subprocess_cmd` (same signature and return). `program` is the Python
    statement that runs the app's task function (train's by default)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    command = [sys.executable, "-c", program, "--config-name", hc.job.config_name]
    for source in hc.runtime.config_sources:
        where = source.path if source.schema == "file" else f"{source.schema}://{source.path}"
        if source.provider == "main":
            command += ["--config-path", where]
        elif source.provider == "command-line":
            command += ["--config-dir", where]
    command += child_overrides(hc.overrides.task, hc.overrides.hydra, hc.runtime.output_dir)
    log.info("starting DDP process of local rank %d: %s", local_rank, shlex.join(command))
    return command, hc.runtime.cwd


def starts_children(trainer) -> bool:
    """Whether Lightning's launcher will start DDP child processes for `trainer` (its
    subprocess-script launcher with more than one process per node, in an environment that
    does not start them itself, as SLURM's srun or torchrun do)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if launcher is None or getattr(launcher, "num_processes", 1) <= 1:
        return False
    environment = getattr(launcher, "cluster_environment", None)
    return not getattr(environment, "creates_processes_externally", False)


def patchable(module) -> bool:
    """Whether Lightning's `module._hydra_subprocess_cmd` can be replaced by `child_command`:
    it exists with a `local_rank` parameter. A warning when the Lightning version is outside
    `TESTED_LIGHTNING` (patched all the same) or the function is not there (not patched)."""
    import inspect

    import lightning
    from packaging.version import Version

    version = Version(lightning.__version__)
    low, high = (Version(v) for v in TESTED_LIGHTNING)
    original = getattr(module, "_hydra_subprocess_cmd", None)
    try:
        fits = original is not None and "local_rank" in inspect.signature(original).parameters
    except (TypeError, ValueError):
        fits = False
    if not fits:
        warnings.warn(
            f"lightning {version} has no {module.__name__}._hydra_subprocess_cmd(local_rank) "
            "for regionnet to replace: DDP child processes start with Lightning's own command, "
            "which under a Hydra multirun (-m) starts the whole sweep again in each child. "
            f"Use lightning>={low},<{high} (tested) for DDP under Hydra multiruns, or run "
            "each job on its own (no -m).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    if not low <= version < high:
        warnings.warn(
            f"regionnet replaces Lightning's private _hydra_subprocess_cmd to start DDP child "
            f"processes and was tested with lightning>={low},<{high}; this is lightning "
            f"{version}. Replacing it all the same: if the children fail to start or start a "
            f"sweep of their own, install lightning>={low},<{high}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


class DistributedJob:
    """One training job's processes: `with DistributedJob() as job: ... job.track(trainer)`.

    `track(trainer)` makes Lightning start DDP children with `child_command` when it will start
    children at all (`starts_children`; never for one process, nor under srun); on leaving,
    the process group is destroyed, the parent waits for its children to exit (an error if one
    fails), and Lightning's function and the launcher's environment are restored for the next
    job of a multirun.
    """

    def __init__(self, program: str = CHILD_PROGRAM) -> None:
        self.trainers: list = []
        self.program = program
        self._launcher_module = None
        self._original_command = None

    def track(self, trainer):
        self.trainers.append(trainer)
        if self._launcher_module is None and starts_children(trainer):
            self._patch()
        return trainer

    def _patch(self) -> None:
        from lightning.pytorch.strategies.launchers import subprocess_script

        if not patchable(subprocess_script):
            return
        self._launcher_module = subprocess_script
        self._original_command = subprocess_script._hydra_subprocess_cmd
        subprocess_script._hydra_subprocess_cmd = functools.partial(
            child_command, program=self.program
        )

    def __enter__(self) -> DistributedJob:
        self._env = {k: os.environ.get(k) for k in LAUNCHER_ENV}
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # RegionNet logs torchmetrics values that are already synced across processes;
        # Lightning cannot know that and recommends sync_dist for every one of them.
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            if exc_type is None:
                self._wait_for_children()
        finally:
            if self._launcher_module is not None:
                self._launcher_module._hydra_subprocess_cmd = self._original_command
                self._launcher_module = None
            for k, v in self._env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._warnings.__exit__(exc_type, exc, tb)

    def _wait_for_children(self) -> None:
        for trainer in self.trainers:
            procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
            for rank, proc in enumerate(procs, start=1):
                try:
                    code = proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise RuntimeError(
                        f"DDP process of local rank {rank} (pid {proc.pid}) did not exit "
                        f"{CHILD_EXIT_TIMEOUT_S} s after the job finished; killed it"
                    ) from None
                if code != 0:
                    raise RuntimeError(
                        f"DDP process of local rank {rank} exited with code {code}; its log "
                        "lines are in this job's log file and on stderr"
                    )
