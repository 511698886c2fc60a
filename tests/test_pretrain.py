"""regionnet-pretrain: unlabelled sources, SimCLR/BYOL runs, and fine-tuning from its weights."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from regionnet.config import compose_config
from regionnet.model.backbone import create_backbone
from regionnet.pretrain import pretrain
from regionnet.ssl.data import UnlabeledDataModule
from regionnet.train import train

# tiny pretraining: 32 px views, 8-image batches, two steps
TINY = [
    "debug=tiny",
    "trainer.limit_train_batches=2",
    "data.batch_size=8",
    "model=resnet18",  # random init (debug=tiny): the checks below compare with a fresh resnet18
]


def archive(root: Path, n: int = 20) -> Path:
    """A folder of n small grey radiograph-like PNGs in nested sub-folders, one not an image."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"study{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        h, w = 40 + 3 * i, 56
        pixels = (rng.random((h, w)) * 80 + np.linspace(0, 150, w)).astype(np.uint8)
        Image.fromarray(pixels).save(sub / f"film{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def run_pretrain(tmp_path: Path, overrides: list[str]) -> Path:
    out = tmp_path / "pretrain"
    pretrain(compose_config("pretrain", [*TINY, *overrides, f"paths.output_dir={out}"]))
    return out


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_pretrain_folder_writes_timm_backbone_weights(tmp_path, method):
    root = archive(tmp_path / "archive")
    out = run_pretrain(tmp_path, ["unlabeled=folder", f"data.root={root}", f"ssl={method}"])
    state = torch.load(out / "backbone.pth")
    timm_keys = set(create_backbone("resnet18").state_dict())
    assert set(state) == timm_keys  # exactly the headless timm model: no heads, no prefixes
    used = pd.read_csv(out / "pretrain_images.csv")
    assert len(used) == 20 and used["path"].str.endswith(".png").all()
    metrics = (out / "metrics.json").read_text()
    assert f'"pretrain/method": "{method}"' in metrics and '"pretrain/steps": 2' in metrics
    # the weights moved away from their initialisation (a real optimisation ran)
    L.seed_everything(42)
    init = create_backbone("resnet18").state_dict()
    assert not torch.equal(init["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_finetune_starts_from_pretrained_backbone(tmp_path, fast):
    root = archive(tmp_path / "archive")
    out = run_pretrain(tmp_path, ["unlabeled=folder", f"data.root={root}"])
    weights = torch.load(out / "backbone.pth")
    seen = {}

    class AtStepZero(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0 and not seen:
                state = pl_module.net.backbone_for("hand").state_dict()
                seen.update({k: torch.equal(state[k].cpu(), v) for k, v in weights.items()})

    cfg = compose_config(
        "train",
        [
            *fast,
            "model=resnet18",  # the architecture TINY pretrains
            f"model.weights_file={out / 'backbone.pth'}",
            f"paths.output_dir={tmp_path / 'ft'}",
        ],
    )
    train(cfg, extra_callbacks=[AtStepZero()])
    assert seen and all(seen.values()), [k for k, same in seen.items() if not same][:5]


def test_csv_source_excludes_labelled_val_and_test(tmp_path):
    """The labelled training split joins without labels; its val/test films never do, not
    even when the unlabelled manifest lists them."""
    root = archive(tmp_path / "labelled", n=30)
    files = sorted(root.rglob("*.png"))
    regions = ["hand", "knee", "elbow"]
    labelled = pd.DataFrame(
        {
            "path": [str(f) for f in files],
            "region": [regions[i % 3] for i in range(len(files))],
            "patient_id": [f"p{i}" for i in range(len(files))],
        }
    )
    labelled.to_csv(tmp_path / "labelled.csv", index=False)
    extra = archive(tmp_path / "extra", n=10)
    listed = [str(f) for f in sorted(extra.rglob("*.png"))] + labelled["path"].tolist()[:12]
    pd.DataFrame({"path": listed + ["missing.png"]}).to_csv(tmp_path / "u.csv", index=False)
    dm = UnlabeledDataModule(
        csv=str(tmp_path / "u.csv"),
        labelled={"source": "csv", "csv": str(tmp_path / "labelled.csv")},
        image_size=32,
        batch_size=4,
    )
    dm.setup()
    split = dm.labelled.records.set_index("path")["split"]
    used = set(dm.records["path"])
    held_out = set(split[split != "train"].index)
    assert held_out and not used & held_out
    assert set(split[split == "train"].index) <= used
    assert {str(f) for f in sorted(extra.rglob("*.png"))} <= used
    assert not any(p.endswith("missing.png") for p in used)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 2, 1, 32, 32)
    assert not torch.equal(batch["image"][:, 0], batch["image"][:, 1])  # two different views


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.csv=.*data.root="):
        UnlabeledDataModule()
    with pytest.raises(FileNotFoundError, match="data.root="):
        UnlabeledDataModule(root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        UnlabeledDataModule(root=str(archive(tmp_path / "a", n=3)), batch_size=8).setup()
    with pytest.raises(ValueError, match="data.view has unknown keys"):
        UnlabeledDataModule(root=str(tmp_path), view={"colour": 0.4})
    other = tmp_path / "resnet34.pth"
    torch.save(create_backbone("resnet34").state_dict(), other)
    with pytest.raises(ValueError, match="matches only|does not fit"):
        create_backbone("efficientnet_b0", weights_file=str(other))
    with pytest.raises(ValueError, match="matches only"):
        create_backbone("resnet50", weights_file=str(other))
    cfg = compose_config(
        "pretrain",
        [*TINY, "data._target_=regionnet.data.datamodule.RegionDataModule"]
        + ["data.csv=null", f"paths.output_dir={tmp_path}"],
    )
    with pytest.raises((ValueError, TypeError), match="needs unlabelled data|unexpected keyword"):
        pretrain(cfg)


def test_pretrain_cli_on_a_user_folder(tmp_path):
    """The README's command form, as a user runs it, logging to W&B (offline) like train."""
    root = archive(tmp_path / "archive")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        "from regionnet.cli import pretrain_main; pretrain_main()",
        "unlabeled=folder",
        f"data.root={root}",
        f"hydra.run.dir={out}",
        *TINY,
        "logger=wandb",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "backbone.pth").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run written"


@pytest.mark.shared_data
def test_pretrain_on_shared_unlabelled_data(tmp_path, shared_data):
    out = run_pretrain(tmp_path, [f"paths.data_dir={shared_data}", "data.max_images=64"])
    used = pd.read_csv(out / "pretrain_images.csv")
    split = pd.read_csv(out / "labelled_split.csv")
    assert set(used["origin"]) <= {"unlabelled", "labelled_train"}
    assert not set(used["path"]) & set(split.loc[split["split"] != "train", "path"])
    assert (out / "backbone.pth").is_file()


def test_pretrain_ddp_sim_two_processes(tmp_path):
    """Multi-device like train: `trainer=ddp_sim` starts a second process that runs the
    pretrain app (not train's), SimCLR gathers both processes' negatives, rank 0 saves."""
    root = archive(tmp_path / "archive", n=40)
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("regionnet-pretrain")
    cmd = [
        str(exe) if exe.is_file() else "regionnet-pretrain",
        "trainer=ddp_sim",
        "unlabeled=folder",
        f"data.root={root}",
        f"hydra.run.dir={out}",
        *TINY,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert (out / "backbone.pth").is_file()
    assert '"pretrain/steps": 2' in (out / "metrics.json").read_text()
