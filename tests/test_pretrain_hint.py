"""regionnet-pretrain's closing hint is a complete fine-tuning command (issue 16 part 8): with
labelled data joined, it names `data=`, where the data is and `data.split_file=` (the split whose
val/test films the pretraining never saw), and that command composes and keeps the split."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from PIL import Image

from regionnet.config import compose_config
from regionnet.pretrain import pretrain

TINY = ["debug=tiny", "trainer.limit_train_batches=1", "data.batch_size=8", "model=resnet18"]


def films(root, n):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        paths.append(root / f"film{i}.png")
        Image.fromarray((rng.random((40, 48)) * 200).astype(np.uint8)).save(paths[-1])
    return paths


def hint_of(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if "fine-tune from" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0].split("regionnet-train ", 1)[1].split()


def test_hint_names_the_labelled_data_and_its_split(tmp_path, caplog):
    regions = ["hand", "knee", "elbow"]
    labelled = films(tmp_path / "labelled", 30)
    pd.DataFrame(
        {
            "path": [str(p) for p in labelled],
            "region": [regions[i % 3] for i in range(30)],
            "patient_id": [f"p{i}" for i in range(30)],
        }
    ).to_csv(tmp_path / "labelled.csv", index=False)
    pd.DataFrame({"path": [str(p) for p in films(tmp_path / "u", 10)]}).to_csv(
        tmp_path / "u.csv", index=False
    )
    out = tmp_path / "ssl"
    overrides = ["unlabeled=csv", f"data.csv={tmp_path / 'u.csv'}", f"paths.output_dir={out}"]
    overrides.append(f"data.labelled={{source:csv,csv:{tmp_path / 'labelled.csv'}}}")
    caplog.set_level(logging.INFO, logger="regionnet.pretrain")
    pretrain(compose_config("pretrain", [*TINY, *overrides]))
    hint = hint_of(caplog)
    assert hint == [
        "model.backbone=resnet18",
        f"model.weights_file={(out / 'backbone.pth').resolve()}",
        "data=csv",
        f"data.csv={tmp_path / 'labelled.csv'}",
        f"data.split_file={(out / 'labelled_split.csv').resolve()}",
    ]
    # the command composes, and its data module uses exactly the pretraining's split
    cfg = compose_config("train", [*hint, "debug=tiny", f"paths.output_dir={tmp_path / 'ft'}"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    written = pd.read_csv(out / "labelled_split.csv").set_index("path")["split"]
    used = dm.records.set_index("path")["split"]
    assert used.sort_index().equals(written.sort_index())


def test_hint_without_labelled_data(tmp_path, caplog):
    root = tmp_path / "archive"
    films(root, 10)
    out = tmp_path / "ssl"
    caplog.set_level(logging.INFO, logger="regionnet.pretrain")
    overrides = ["unlabeled=folder", f"data.root={root}", f"paths.output_dir={out}"]
    pretrain(compose_config("pretrain", [*TINY, *overrides]))
    assert hint_of(caplog) == [
        "model.backbone=resnet18",
        f"model.weights_file={(out / 'backbone.pth').resolve()}",
    ]
