"""Where regionnet's Hydra configs live, and composing them without the command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config `conf/<name>.yaml` with command-line style overrides (tests, notebooks).

    `paths.output_dir` resolves through Hydra's runtime only under `@hydra.main`; pass
    `paths.output_dir=DIR` here.
    """
    from hydra import compose, initialize_config_dir

    from regionnet.sweep import register_resolvers

    register_resolvers()
    if not CONF_DIR.is_dir():
        raise FileNotFoundError(
            f"regionnet's configs are not at {CONF_DIR}; install from a source checkout "
            "with `pip install -e .`"
        )
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))
