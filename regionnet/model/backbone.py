"""timm backbones for single-channel radiographs, with offline-safe weight handling.

`timm.create_model(name, num_classes=0, in_chans=1)` gives a headless backbone whose forward
returns pooled features; with ImageNet weights timm adapts the first conv to one channel by
summing its RGB filters. Weights come from (a) nowhere (random init: tests, air-gapped use),
(b) timm's normal download (`pretrained=true`, needs a network), or (c) a local file of
ImageNet-style weights (`weights_file=`), whose classifier is dropped.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path

import timm
import torch

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
        return model
    if pretrained:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"  # then timm reads only its cache
        if not offline and not _network_reachable():
            raise RuntimeError(
                f"model.pretrained=true needs a network to download ImageNet weights for {name!r}, "
                "and huggingface.co is unreachable. Use model.weights_file=PATH for local weights, "
                "HF_HUB_OFFLINE=1 to use weights already in the cache, or model.pretrained=false."
            )
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # timm and huggingface_hub raise many types for a failed fetch
            raise RuntimeError(
                f"could not load ImageNet weights for {name!r}: {e}. Use model.weights_file=PATH "
                "for local weights, or model.pretrained=false."
            ) from e
    return timm.create_model(name, pretrained=False, **kwargs)
