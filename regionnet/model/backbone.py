"""timm backbones for single-channel radiographs, with offline-safe weight handling.

`timm.create_model(name, num_classes=0, in_chans=1)` gives a headless backbone whose forward
returns pooled features; with ImageNet weights the first conv is adapted to one channel by
summing its RGB filters. Weights come from (a) nowhere (random init), (b) an installed package
that ships ImageNet weights (`pretrained=true` for the backbones in `weights.PROVIDERS`: no
network, ever), (c) timm's normal download (`pretrained=true` for any other backbone; needs a
network), or (d) a local file of ImageNet-style or `regionnet-pretrain` weights
(`weights_file=`), whose classifier is dropped. `build_backbone` also says which, for the
checkpoint and the model card.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path

import timm
import torch

from regionnet.model import weights as provided

log = logging.getLogger(__name__)

_HUB_HOST = ("huggingface.co", 443)


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
    raise ValueError(
        f"model.backbone={name!r} is not a timm architecture. Close matches: {close or 'none'}; "
        "list all with `python -c 'import timm; print(timm.list_models())'`"
    )


def _network_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline `pretrained=true` fails in seconds, not retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(_HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def feature_dim(model: torch.nn.Module) -> int:
    """Width of the pooled features a headless timm model returns."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _check_weights_match(model: torch.nn.Module, path: Path, name: str) -> None:
    """timm loads a weights file non-strictly once the classifier is dropped, so a file of
    another architecture (or with prefixed keys) would silently leave random weights."""
    state = timm.models.load_state_dict(str(path))
    own = model.state_dict()
    matched = [k for k in own if k in state and state[k].numel() == own[k].numel()]
    if len(matched) < 0.9 * len(own):
        missing = [k for k in own if k not in state][:3]
        raise ValueError(
            f"model.weights_file={str(path)!r} matches only {len(matched)} of {len(own)} tensors "
            f"of {name!r} (missing e.g. {missing}); give weights of the same model.backbone, "
            "such as regionnet-pretrain's backbone.pth or timm's ImageNet file"
        )


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
) -> torch.nn.Module:
    """A headless timm backbone (`num_classes=0`) taking `in_chans` channels."""
    return build_backbone(name, pretrained, weights_file, in_chans, drop_path_rate)[0]


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
) -> tuple[torch.nn.Module, dict]:
    """(headless backbone, where its weights came from). The second is a plain dict: `kind`
    random | imagenet-package | timm-hub | file, plus package/version/sha256 or file name and
    sha256 (never an absolute path: it goes into checkpoints and model cards)."""
    _check_name(name)
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.weights_file={str(path)!r} does not exist; give a .pth/.safetensors "
                "state dict of this architecture, or drop it to start from random weights"
            )
        if path.suffix != ".safetensors":  # a pickle: tensors and plain values only, never code
            from regionnet.model.checkpoint import load_plain

            load_plain(path, "model.weights_file")
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except RuntimeError as e:  # torch's size-mismatch report, one line per tensor
            raise ValueError(
                f"model.weights_file={str(path)!r} does not fit model.backbone={name!r}: "
                f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}; it "
                "matches only part of the tensors: give weights of the same architecture"
            ) from None
        _check_weights_match(model, path, name)
        return model, {"kind": "file", "file": path.name, "sha256": provided.sha256_file(path)}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs), {"kind": "random"}
    if provided.provider_for(name):
        # the installed package's file, checked by hash and mapped strictly: never random
        model = timm.create_model(name, pretrained=False, **kwargs)
        return model, provided.load_provided(model, name)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"  # then timm reads only its cache
    if not offline and not _network_reachable():
        raise RuntimeError(
            f"model.pretrained=true: no installed package provides ImageNet weights for {name!r}, "
            "and timm's download needs a network (huggingface.co is unreachable). Backbones whose "
            f"weights install offline: {provided.provided_list()}. Or use model.weights_file=PATH "
            "for local weights, HF_HUB_OFFLINE=1 for weights already in timm's cache, or "
            "model.pretrained=false."
        )
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # timm and huggingface_hub raise many types for a failed fetch
        raise RuntimeError(
            f"could not load ImageNet weights for {name!r}: {e}. Backbones whose weights "
            f"install offline: {provided.provided_list()}. Or use model.weights_file=PATH for "
            "local weights, or model.pretrained=false."
        ) from e
    cfg = model.pretrained_cfg or {}
    return model, {
        "kind": "timm-hub",
        "hub_id": cfg.get("hf_hub_id") or cfg.get("url") or name,
        "timm": timm.__version__,
    }


def input_stats(name: str) -> tuple[float, float]:
    """(mean, std) of the intensities `name`'s ImageNet weights expect, averaged over RGB for
    one gray channel: 0.449/0.226 for most timm models, 0.5/0.5 for the TF-ported ones (inputs
    in [-1, 1]). Unknown names get ImageNet's."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - a name timm does not know is reported elsewhere
        cfg = None
    mean = getattr(cfg, "mean", None) or (0.485, 0.456, 0.406)
    std = getattr(cfg, "std", None) or (0.229, 0.224, 0.225)
    return round(sum(mean) / len(mean), 3), round(sum(std) / len(std), 3)
