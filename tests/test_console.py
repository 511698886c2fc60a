"""Console noise (issue 16 part 8): under Hydra's job logging every Lightning INFO line printed
twice, once by Lightning's own console handler and once by the root's; now once on the
console and once in `<task>.log`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import FAST

from regionnet.run import LIGHTNING_LOGGERS, lightning_logs_once


def test_lightning_logs_once_routes_through_the_root(monkeypatch):
    root = logging.getLogger()
    mine = logging.FileHandler(os.devnull)
    lightning = logging.getLogger("lightning")
    own = logging.StreamHandler()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "propagate", name == "lightning")
    lightning.addHandler(own)
    lightning.addHandler(mine)  # a user's file handler stays
    monkeypatch.setattr(root, "handlers", [])
    lightning_logs_once()  # no root handlers (no Hydra logging): nothing changes
    assert lightning.handlers == [own, mine]
    assert not logging.getLogger("lightning.pytorch").propagate
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler()])
    lightning_logs_once()
    assert lightning.handlers == [mine]
    assert all(logging.getLogger(n).propagate for n in LIGHTNING_LOGGERS)


def test_cli_prints_each_lightning_line_once(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "from regionnet.cli import train_main; train_main()", *FAST]
    cmd += [f"hydra.run.dir={out}", "logger=csv", "trainer.max_epochs=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    for line in ("GPU available: False", "Seed set to 42"):
        assert console.count(line) == 1, console[:3000]
        assert (out / "train.log").read_text().count(line) == 1
    assert "AUROC per region head" in done.stdout and "n+=" in done.stdout
