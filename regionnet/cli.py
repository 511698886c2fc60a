"""Console scripts: thin `@hydra.main` wrappers over the plain functions, and the Hydra
callback (conf/hydra/default.yaml) that refuses credentials in URLs before Hydra saves or
prints the config."""

from __future__ import annotations

import re
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from regionnet.config import CONF_DIR
from regionnet.sweep import register_resolvers

# before Hydra composes: hparams_search/optuna.yaml's storage uses ${regionnet.sqlite:...}
register_resolvers()


class CredentialsInUrl(SystemExit):
    """A URL in the config or on the command line holds `user:password@`. A SystemExit (exit
    status 1, the message on stderr): Hydra turns a callback's Exception into a warning and
    runs the job anyway."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = message  # sys.exit(message): printed to stderr, exit status 1


# a URL's userinfo (`scheme://user[:password]@`), anywhere in a string: a sweep override
# holds several URLs separated by commas, and a colon may come escaped (https\://)
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\\?://[^/?#\s,\[\]'\"@]+@")


def _userinfo(value: Any) -> bool:
    return isinstance(value, str) and bool(_USERINFO.search(value))


def _url_keys(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every key ending in `url` (dicomweb.url, dicomweb.sr_url, ...),
    resolved where it resolves; the rest of the config stays unresolved."""
    found = []
    if isinstance(node, DictConfig):
        for key in node:
            name = f"{prefix}{key}"
            if name == "hydra":
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig | ListConfig):
                found += _url_keys(child, f"{name}.")
            elif str(key).lower().endswith("url"):
                try:
                    found.append((name, node[key]))
                except Exception:  # missing (???) or an interpolation that needs Hydra's runtime
                    found.append((name, OmegaConf.to_container(node, resolve=False).get(key)))
    return found


def url_credentials(config: DictConfig) -> list[str]:
    """The keys ending in `url` (dicomweb.url, dicomweb.sr_url) whose URL holds credentials
    (`user:pw@host`), in the config or in a command-line override (a sweep's list too)."""
    bad = [key for key, value in _url_keys(config) if _userinfo(value)]
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key.lower().endswith("url") and _userinfo(value) and key not in bad:
            bad.append(key)
    return bad


def refuse_url_credentials(config: DictConfig) -> None:
    """Stop before anything is written or printed (Hydra saves the config into .hydra/ with
    mode 0644 and echoes the overrides of a failing job) when a URL holds credentials."""
    bad = url_credentials(config)
    if not bad:
        return
    auth = OmegaConf.select(config, "dicomweb.auth", default=None) or {}
    user = auth.get("username_env", "DICOMWEB_USER")
    password = auth.get("password_env", "DICOMWEB_PASSWORD")
    token = auth.get("token_env", "DICOMWEB_TOKEN")
    raise CredentialsInUrl(
        f"{', '.join(bad)}: a URL holding credentials (user:password@host) is refused before "
        "anything is written or logged. Give the URL without them (https://host/dicom-web) and "
        f"put the user name and password in the environment variables {user} and {password} "
        f"with dicomweb.auth.type=basic, or a token in {token} with dicomweb.auth.type=bearer "
        "(the variable names are set by dicomweb.auth.username_env, password_env, token_env). "
        "Also clear your shell history of the password."
    )


class RefuseUrlCredentials(Callback):
    """Hydra callback (conf/hydra/default.yaml): `refuse_url_credentials` before a run or a
    sweep starts, that is before Hydra creates the output directory or saves any config."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_url_credentials(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_url_credentials(config)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """`regionnet-train`: returns the metric a Hydra sweeper optimises."""
    from regionnet.train import train

    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:  # a sweeper would get None and stop without a reason
        monitor = OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor", default=None)
        raise ValueError(
            f"optimized_metric={name} is not among this run's metrics, so a sweeper has nothing "
            f"to optimise; this task's checkpoint follows {monitor}. Set optimized_metric="
            f"{monitor} (a landmark or box search: hparams_search=landmarks or "
            "hparams_search=boxes instead of hparams_search=optuna)"
        )
    return metrics.get(name or "", None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def pretrain_main(cfg: DictConfig) -> None:
    """`regionnet-pretrain unlabeled=shared|folder|csv ssl=simclr|byol`."""
    from regionnet.pretrain import pretrain

    pretrain(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """`regionnet-eval ckpt_path=... [data=...]`."""
    from regionnet.evaluate import evaluate

    evaluate(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    """`regionnet-predict ckpt_path=... input=PATH output=preds.csv`."""
    from regionnet.predict import predict

    predict(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def export_main(cfg: DictConfig) -> None:
    """`regionnet-export ckpt_path=... format=onnx|torchscript`."""
    from regionnet.export import export

    export(cfg)
