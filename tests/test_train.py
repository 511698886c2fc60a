"""train(cfg) through the real Hydra configs: outputs, region sets, checkpoints, loggers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from regionnet.config import CONF_DIR, compose_config
from regionnet.data.phantom import render_phantom
from regionnet.model.module import RegionNet
from regionnet.train import build_datamodule, build_model, train

GROUPS = ["data", "unlabeled", "model", "trainer", "logger", "callbacks", "experiment", "debug"]
GROUPS += ["ssl", "task"]
# a head type's data and model belong together: its task= preset picks both
HEAD_TYPES = {
    ("data", "landmarks"): ("LandmarkDataModule", "LandmarkNet"),
    ("model", "dsnt"): ("LandmarkDataModule", "LandmarkNet"),
    ("task", "landmarks"): ("LandmarkDataModule", "LandmarkNet"),
    ("model", "fcos"): ("BoxDataModule", "BoxNet"),
    ("task", "boxes"): ("BoxDataModule", "BoxNet"),
    ("data", "multi"): ("MultiDataModule", "MultiNet"),
    ("task", "multi"): ("MultiDataModule", "MultiNet"),
}
REQUIRED = {
    ("data", "landmarks"): ["task=landmarks"],
    ("model", "dsnt"): ["task=landmarks"],
    ("model", "fcos"): ["task=boxes"],
    ("data", "multi"): ["task=multi"],
    ("data", "folder"): ["data.root=/tmp"],
    ("data", "csv"): ["data.csv=/tmp/m.csv"],
    ("unlabeled", "folder"): ["data.root=/tmp"],
    ("unlabeled", "csv"): ["data.csv=/tmp/u.csv"],
}


def _app(group: str, option: str) -> str:
    """regionnet-pretrain's own groups (unlabelled data, SSL methods) compose with it."""
    pretrain_only = group in ("ssl", "unlabeled") or option == "pretrain"
    return "pretrain" if pretrain_only else "train"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_every_config_option_composes_and_resolves(group, option, tmp_path):
    extra = REQUIRED.get((group, option), [])
    app = _app(group, option)
    cfg = compose_config(app, [f"{group}={option}", f"paths.output_dir={tmp_path}", *extra])
    # resolve everything but Hydra's own runtime values
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if app == "pretrain":
        assert container["data"]["_target_"].endswith("UnlabeledDataModule")
        assert container["ssl"]["method"] in ("simclr", "byol")
        return
    data, model = HEAD_TYPES.get((group, option), ("RegionDataModule", "RegionNet"))
    assert container["data"]["_target_"].endswith(data)
    assert container["model"]["_target_"].endswith(model)
    assert container["model"]["image_size"] == container["data"]["image_size"]


def test_unlabelled_sources_are_not_training_data():
    """Defect: `regionnet-train data=unlabeled` composed, then crashed with an AttributeError
    deep in training. Unlabelled sources are their own group now, which train cannot pick."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    for option in ("unlabeled", "unlabeled_folder", "unlabeled_csv"):
        with pytest.raises(MissingConfigException, match=f"data/{option}"):
            compose_config("train", [f"data={option}"])
    assert "unlabeled" not in _options("data") and _options("unlabeled")
    with pytest.raises(ConfigCompositionException):  # and pretrain cannot pick labelled data
        compose_config("pretrain", ["data=folder"])


def test_every_model_config_builds_a_backbone_with_five_heads(tmp_path):
    for option in _options("model"):
        if ("model", option) in HEAD_TYPES:
            continue  # other head types: built from their data module in their own tests
        cfg = compose_config("train", [f"model={option}", f"paths.output_dir={tmp_path}"])
        model = build_model(cfg, ["shoulder", "elbow", "hand", "pelvis", "knee"])
        out = model(torch.rand(2, 1, 64, 64))
        assert list(out) == ["shoulder", "elbow", "hand", "pelvis", "knee"], option
        assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values()), option


def test_fast_dev_run_through_the_real_config(tmp_path):
    cfg = compose_config(
        "train", ["debug=fdr", f"paths.output_dir={tmp_path}", "data.image_size=32"]
    )
    metrics = train(cfg)
    assert "test/loss" in metrics and np.isfinite(metrics["test/loss"])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "split.csv").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real training on phantoms: 2 epochs, checkpoints, CSV logs."""
    from conftest import FAST

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        [*FAST, f"paths.output_dir={out}", "trainer.max_epochs=2", "data.phantom.per_region=16"],
    )
    return out, cfg, train(cfg)


def test_run_directory_holds_the_documented_outputs(trained):
    out, cfg, metrics = trained
    for name in [
        "config.yaml",
        "split.csv",
        "metrics.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    ]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for region in ["shoulder", "elbow", "hand", "pelvis", "knee"]:
        assert 0.0 <= saved[f"test/auroc/{region}"] <= 1.0
        assert f"val/sensitivity/{region}" in saved and f"test/specificity/{region}" in saved
    assert {"val/auroc_mean", "test/auroc_mean", "test/top1_acc", "val/auroc_mean_best"} <= set(
        saved
    )
    assert list(Path(out / "csv").rglob("metrics.csv"))


def test_split_csv_feeds_back_and_has_no_patient_leak(trained, tmp_path):
    out, cfg, _ = trained
    split = __import__("pandas").read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    cfg2 = compose_config(
        "train",
        [
            "data.phantom.per_region=16",
            f"data.split_file={out / 'split.csv'}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    dm = build_datamodule(cfg2)
    dm.setup()
    assert dm.records.set_index("path")["split"].equals(split.set_index("path")["split"])


def test_checkpoint_reloads_without_hydra_and_predicts_the_same(trained):
    out, cfg, _ = trained
    model = RegionNet.load_from_checkpoint(out / "checkpoints/best.ckpt", map_location="cpu").eval()
    assert model.regions == ["shoulder", "elbow", "hand", "pelvis", "knee"]
    assert all(not OmegaConf.is_config(v) for v in model.hparams.values())
    ckpt = torch.load(out / "checkpoints/best.ckpt", weights_only=False)
    twin = RegionNet(**ckpt["hyper_parameters"])
    twin.load_state_dict(ckpt["state_dict"])
    x = torch.from_numpy(render_phantom("knee", 1, 32))[None, None]
    with torch.no_grad():
        assert torch.allclose(model.predict_proba(x), twin.eval().predict_proba(x))
    assert not torch.equal(model.thresholds, torch.full((5,), 0.5))  # chosen on validation


def test_heads_and_metrics_follow_a_three_region_set(tmp_path, fast):
    cfg = compose_config(
        "train",
        [
            *fast,
            f"paths.output_dir={tmp_path}",
            "data.regions=[hand,knee,chest]",
            "data.phantom.other_regions=[foot,skull]",
        ],
    )
    metrics = train(cfg)
    assert {k.split("/")[-1] for k in metrics if k.startswith("test/auroc/")} == {
        "hand",
        "knee",
        "chest",
    }
    model = RegionNet.load_from_checkpoint(tmp_path / "checkpoints/best.ckpt")
    assert list(model.net.heads) == ["hand", "knee", "chest"]
    assert model.logits(torch.rand(3, 1, 32, 32)).shape == (3, 3)


def test_study_design_builds_one_backbone_per_region(tmp_path):
    study = ["model=resnet18", f"paths.output_dir={tmp_path}"]
    cfg = compose_config("train", [*study, "model.shared_backbone=false"])
    model = build_model(cfg, ["shoulder", "elbow", "hand", "pelvis", "knee"])
    assert len(model.net.backbones) == 5 and not model.net.shared
    shared = build_model(compose_config("train", study), ["knee", "hand"])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) > 4.9 * n(shared)
    logits = model(torch.rand(2, 1, 32, 32))
    logits["knee"].sum().backward()
    assert model.net.backbones["knee"].conv1.weight.grad is not None
    assert model.net.backbones["hand"].conv1.weight.grad is None  # heads do not share anything


def test_every_parameter_gets_a_gradient(tmp_path):
    cfg = compose_config("train", ["model=mobilenetv3_large_100", f"paths.output_dir={tmp_path}"])
    model = build_model(cfg, ["hand", "knee"])
    model.train()
    model._loss(
        model.logits(torch.rand(2, 1, 64, 64)), torch.tensor([[1.0, 0], [0, 1.0]])
    ).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_wandb_offline_writes_an_offline_run(tmp_path, fast, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = [o for o in fast if not o.startswith("logger=")]
    train(compose_config("train", [*overrides, "logger=wandb", f"paths.output_dir={tmp_path}"]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_weights_file_loads_imagenet_style_weights_into_a_gray_backbone(tmp_path):
    import timm

    rgb = timm.create_model("resnet18", pretrained=False)  # 3 channels, 1000 classes
    torch.save(rgb.state_dict(), tmp_path / "resnet18.pth")
    cfg = compose_config(
        "train",
        [
            "model=resnet18",
            f"model.weights_file={tmp_path / 'resnet18.pth'}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    model = build_model(cfg, ["hand", "knee"])
    conv = model.net.backbones["shared"].conv1.weight
    assert conv.shape[1] == 1
    # timm adapts the first conv to one channel by summing the RGB filters
    assert torch.allclose(conv, rgb.conv1.weight.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(
        model.net.backbones["shared"].layer4[1].conv2.weight, rgb.layer4[1].conv2.weight
    )


def test_pretrained_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import regionnet.model.backbone as backbone

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbone, "_network_reachable", lambda timeout=3.0: False)
    # resnet18: no installed package provides its ImageNet weights, so only timm's download
    cfg = compose_config(
        "train", ["model=resnet18", "model.pretrained=true", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(RuntimeError, match="weights_file"):
        build_model(cfg, ["knee"])


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("data.image_size=8", ValueError, "data.image_size"),
        ("data.batch_size=0", ValueError, "data.batch_size"),
        ("data.split_fractions=[0.5,0.5,0.5]", ValueError, "split_fractions"),
        ("data.regions=[knee,knee]", ValueError, "more than once"),
        ("data.regions=[knee,wrist]", ValueError, "cannot draw"),
        ("model.backbone=resnet1800", ValueError, "not a timm architecture.*resnet18"),
        ("model.threshold_method=best", ValueError, "threshold_method"),
        ("model.pos_weight=lots", ValueError, "pos_weight"),
        ("model.weights_file=/nope/w.pth", FileNotFoundError, "model.weights_file"),
    ],
)
def test_bad_config_values_fail_with_the_key(override, error, match, tmp_path, fast):
    cfg = compose_config("train", [*fast, override, f"paths.output_dir={tmp_path}"])
    with pytest.raises(error, match=match):
        train(cfg)


def _no_phantom(overrides):
    return [o for o in overrides if not o.startswith("data.phantom")]


def test_missing_data_root_names_the_key(tmp_path, fast):
    cfg = compose_config(
        "train",
        [
            *_no_phantom(fast),
            "data=folder",
            f"data.root={tmp_path}/nope",
            f"paths.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(FileNotFoundError, match="data.root="):
        train(cfg)


def test_folder_of_dicom_and_png_trains_and_skips_a_corrupt_file(tmp_path, fast):
    from dicom_factory import make_dicom

    root = tmp_path / "data"
    for region, folder in [
        ("knee", "knee"),
        ("hand", "hand"),
        ("pelvis", "hip"),
        ("chest", "chest"),
    ]:
        (root / folder).mkdir(parents=True)
        for i in range(8):
            pixels = render_phantom(region, i, 48)
            if i % 2:
                make_dicom(
                    root / folder / f"{i}.dcm",
                    (pixels * 4000).astype(np.uint16),
                    photometric="MONOCHROME2",
                    BodyPartExamined=region.upper(),
                    PatientID=f"{region}{i}",  # folder sources split DICOMs by PatientID
                )
            else:
                Image.fromarray((pixels * 255).astype(np.uint8)).save(root / folder / f"{i}.png")
    (root / "knee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = compose_config(
        "train",
        [
            *_no_phantom(fast),
            "data=folder",
            f"data.root={root}",
            "data.regions=[hand,pelvis,knee]",
            f"paths.output_dir={tmp_path / 'run'}",
            "data.batch_size=4",
        ],
    )
    metrics = train(cfg)
    assert np.isfinite(metrics["val/loss"])
    split = __import__("pandas").read_csv(tmp_path / "run" / "split.csv")
    assert len(split) == 33 and split["path"].str.endswith(".dcm").sum() == 16


def test_datamodule_repeats_training_images_augment_factor_times(tmp_path):
    cfg = compose_config(
        "train",
        ["data.augment_factor=3", "data.phantom.per_region=10", f"paths.output_dir={tmp_path}"],
    )
    dm = instantiate(cfg.data)
    dm.setup()
    assert len(dm.train_dataloader().dataset) == 3 * dm.train_size()
    assert len(dm.val_dataloader().dataset) == len(dm.split_frame("val"))


def test_a_validation_split_without_both_classes_is_named(tmp_path, fast):
    """Every validation film is a knee: no head has both classes, so val/auroc_mean (which
    the best checkpoint follows) cannot exist; the error says so instead of Lightning's
    'Early stopping conditioned on metric ... which is not available'."""
    rows = []
    for region in ("knee", "hand"):
        (tmp_path / region).mkdir()
        for i in range(10):
            path = tmp_path / region / f"{i}.png"
            Image.fromarray((render_phantom(region, i, 48) * 255).astype(np.uint8)).save(path)
            split = "val" if region == "knee" and i < 3 else ("test" if i >= 8 else "train")
            rows.append({"path": str(path), "region": region, "split": split})
    manifest = tmp_path / "m.csv"
    __import__("pandas").DataFrame(rows).to_csv(manifest, index=False)
    cfg = compose_config(
        "train",
        [*_no_phantom(fast), "data=csv", f"data.csv={manifest}", "data.regions=[hand,knee]"]
        + [f"paths.output_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(ValueError, match="no head with both positive and negative films"):
        train(cfg)
