"""The plain network (RegionClassifier) under the Lightning module: its seams, checkpoints
written before it existed, and gradients reaching every trainable parameter."""

from __future__ import annotations

import pytest
import torch

from regionnet.config import CONF_DIR, compose_config
from regionnet.model.module import RegionNet, load_regionnet
from regionnet.model.net import RegionClassifier
from regionnet.run import build_model

REGIONS = ["shoulder", "hand", "knee"]
# region models; model=dsnt (landmark heads) has its own gradient test in test_landmark_model
BACKBONE_CONFIGS = sorted(
    p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem not in ("dsnt", "fcos")
)


def _model(**kwargs) -> RegionNet:
    torch.manual_seed(0)
    return RegionNet(regions=REGIONS, backbone="test_resnet", image_size=32, **kwargs)


def test_lightning_module_runs_the_plain_network():
    model = _model().eval()
    assert isinstance(model.net, RegionClassifier) and model.net.shared
    x = torch.randn(2, 1, 32, 32)
    feats = model.net.forward_features(x)
    assert set(feats) == set(REGIONS) and feats["hand"] is feats["knee"]  # one pass, shared
    logits = model.net.forward_head(feats)
    assert torch.equal(torch.stack([logits[r] for r in REGIONS], 1), model.logits(x))
    assert torch.equal(model.net.predict_proba(x), model.predict_proba(x))


def test_separate_backbones_are_chosen_once():
    net = _model(shared_backbone=False).net
    assert not net.shared and list(net.backbones) == REGIONS
    assert all(net.backbone_for(r) is net.backbones[r] for r in REGIONS)
    assert len(list(net.unique_backbones())) == 3


def test_checkpoint_from_before_the_plain_network_still_loads(tmp_path):
    """Checkpoints written when backbone and heads sat on the Lightning module
    (`backbone.*`, `heads.*`) load into today's `net.*` with identical outputs."""
    model = _model().eval()
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("net.backbones.shared.", "backbone.").replace("net.heads.", "heads.")
        state[key] = value
    assert any(k.startswith("backbone.") for k in state)
    ckpt = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.4.0",
        },
        ckpt,
    )
    loaded = load_regionnet(ckpt)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.predict_proba(x), model.predict_proba(x))


@pytest.mark.parametrize(
    "overrides",
    [[f"model={name}"] for name in BACKBONE_CONFIGS] + [["model.shared_backbone=false"]],
    ids=[*BACKBONE_CONFIGS, "separate_backbones"],
)
def test_every_trainable_parameter_gets_a_gradient(overrides):
    """One training step of each backbone config (random init, tiny input) reaches every
    parameter that requires a gradient: nothing built is dead weight or detached."""
    cfg = compose_config(
        "train",
        [
            *overrides,
            "model.pretrained=false",
            # drop-path may drop a residual branch for the whole tiny batch: no gradient there
            "model.drop_path_rate=0",
            "model.pos_weight=null",
        ],
    )
    model = build_model(cfg, REGIONS).train()
    batch = {"image": torch.randn(4, 1, 64, 64), "labels": torch.eye(4, 3)}
    model.training_step(batch, 0).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert dead == []
    assert any(p.grad.abs().sum() > 0 for p in model.net.heads.parameters())
