"""Learning checks: a model that does not learn must fail here.

Range checks (`0 <= auroc <= 1`) and `unknown` rates measured on the films that set the
thresholds hold for a useless model too. These tests measure the shared phantom checkpoint
(`phantom_model.py`) on phantoms it never saw: new seeds, drawn like the training ones. A
working model separates them (AUROC near 1, in-set phantoms called by their own region);
a model whose training loss is zeroed scores near chance and calls everything `unknown`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phantom_model import phantom_checkpoint  # noqa: F401 - the fixture
from sklearn.metrics import roc_auc_score

from regionnet import load_model
from regionnet.data.phantom import render_phantom
from regionnet.model.thresholds import calibrate, choose_threshold
from regionnet.regions import REGIONS, UNKNOWN

HELD_OUT_SEED = 77_000_000  # far from the training seeds (phantom_records: < 10 million)
PER_REGION = 40
OTHERS = ("chest", "foot", "skull")


@pytest.fixture(scope="module")
def held_out(phantom_checkpoint):  # noqa: F811 - the fixture imported above
    """Predictions of the phantom checkpoint on unseen phantoms: (anatomy list, results)."""
    model = load_model(phantom_checkpoint)
    anatomy = [a for a in (*REGIONS, *OTHERS) for _ in range(PER_REGION)]
    images = [
        render_phantom(a, HELD_OUT_SEED + k, size=model.image_size) for k, a in enumerate(anatomy)
    ]
    return anatomy, model.predict(images)


def test_every_head_separates_held_out_phantoms(held_out):
    anatomy, results = held_out
    for region in REGIONS:
        labels = [a == region for a in anatomy]
        scores = [p.probabilities[region] for p in results]
        assert roc_auc_score(labels, scores) >= 0.9, region


def test_held_out_in_set_phantoms_get_their_own_region(held_out):
    """Measured at rejection@0.95 thresholds: 0.68-0.98 per region, 0.78 overall (10 epochs
    of the 32 px test model); a model that learned nothing calls them all `unknown`."""
    anatomy, results = held_out
    rates = {}
    for region in REGIONS:
        calls = [p.region for a, p in zip(anatomy, results, strict=True) if a == region]
        rates[region] = calls.count(region) / len(calls)
    assert min(rates.values()) >= 0.5 and np.mean(list(rates.values())) >= 0.7, rates


def test_held_out_out_of_set_phantoms_are_mostly_unknown(held_out):
    """Measured on phantoms the thresholds never saw (not the validation films that set
    them), and next to the in-set check above, so 'everything unknown' cannot pass both."""
    anatomy, results = held_out
    calls = [p.region for a, p in zip(anatomy, results, strict=True) if a in OTHERS]
    assert calls.count(UNKNOWN) / len(calls) >= 0.75, calls  # measured 0.91


def test_best_checkpoint_holds_the_best_logged_validation_auroc(tmp_path, fast):
    """best.ckpt must be the epoch with the highest val/auroc_mean (ModelCheckpoint mode max),
    over a run with several validations."""
    import pandas as pd

    from regionnet.config import compose_config
    from regionnet.train import train

    overrides = [*fast, "trainer.max_epochs=4", "callbacks.early_stopping=null", "test=false"]
    metrics = train(compose_config("train", [*overrides, f"paths.output_dir={tmp_path}"]))
    log = pd.read_csv(next(tmp_path.glob("csv/**/metrics.csv")))
    per_epoch = log.dropna(subset=["val/auroc_mean"]).groupby("epoch")["val/auroc_mean"].max()
    assert len(per_epoch) >= 3 and per_epoch.nunique() > 1, per_epoch  # a real choice
    # train() validates best.ckpt's own weights again after fitting: the best epoch's score
    assert metrics["val/auroc_mean"] == pytest.approx(per_epoch.max(), abs=1e-6)
    last = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert float(state["best_model_score"]) == pytest.approx(per_epoch.max(), abs=1e-6)


# -- thresholds on hand-made ROC points ---------------------------------------------------
def _roc(scores, labels):
    from torchmetrics.functional.classification import binary_roc

    return binary_roc(torch.tensor(scores), torch.tensor(labels), thresholds=None)


def test_youden_threshold_on_a_hand_made_vector():
    """Negatives 0.1 0.2 0.45 0.5, positives 0.3 0.6 0.7 0.8. Youden's J = TPR - FPR is 0.75
    at 0.6 (3 of 4 positives, no negative) and 0.5 at 0.3 (all positives, half the
    negatives); 'most sensitive' would pick 0.1, 'most specific' 0.8."""
    fpr, tpr, thr = _roc([0.1, 0.2, 0.45, 0.5, 0.3, 0.6, 0.7, 0.8], [0, 0, 0, 0, 1, 1, 1, 1])
    assert choose_threshold(fpr, tpr, thr, "youden") == pytest.approx(0.6)
    assert choose_threshold(fpr, tpr, thr, "sensitivity@1.0") == pytest.approx(0.3)
    # specificity >= 0.75 allows 0.6 and 0.5 (both 3 of 4 positives): the middle of the ties
    assert choose_threshold(fpr, tpr, thr, "specificity@0.75") == pytest.approx(0.5)
    chosen, _ = calibrate("youden", ["knee"], {"knee": (fpr, tpr, thr)}, torch.empty(0, 1), [0.5])
    assert chosen == pytest.approx([0.6])


def test_calibrate_keeps_heads_without_both_classes():
    fpr, tpr, thr = _roc([0.2, 0.9], [0, 1])
    chosen, _ = calibrate(
        "youden", ["hand", "knee"], {"knee": (fpr, tpr, thr)}, torch.empty(0, 2), [0.3, 0.5]
    )
    assert chosen == pytest.approx([0.3, 0.9])


def test_phantom_scores_are_not_constant(held_out):
    """A collapsed model gives (nearly) the same probabilities to every film."""
    _, results = held_out
    probs = np.array([[p.probabilities[r] for r in REGIONS] for p in results])
    assert probs.std(axis=0).min() > 0.05


# -- self-supervised pretraining learns --------------------------------------------------------
SSL_REGIONS = ("shoulder", "elbow", "hand", "pelvis", "knee")


def _phantom_folder(root, per_region: int, seed: int):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for r in SSL_REGIONS:
        for i in range(per_region):
            img = render_phantom(r, seed + i, 64)
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(root / f"{r}_{i}.png")
    return root


def _probe_accuracy(backbone, images: torch.Tensor, labels: np.ndarray) -> float:
    """5-fold cross-validated logistic-regression accuracy on frozen pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    with torch.no_grad():
        feats = backbone.eval()(images).numpy()
    probe = LogisticRegression(max_iter=2000)
    return float(cross_val_score(probe, feats, labels, cv=5).mean())


def test_simclr_loss_falls_and_its_features_beat_random_ones(tmp_path):
    """SimCLR on 120 unlabelled phantoms (no region labels), 10 short epochs of the tiny test
    ResNet: the contrastive loss falls (measured 3.86 -> about 3.1), and a linear probe on the
    frozen features of held-out phantoms beats the same probe on the random initialisation
    (measured 0.67 vs 0.43 region accuracy). Weight decay and BatchNorm statistics alone move
    the weights too, so the loss check is what catches a loss that teaches nothing."""
    import pandas as pd

    from regionnet.config import compose_config
    from regionnet.data.transforms import build_transforms
    from regionnet.model.backbone import create_backbone
    from regionnet.pretrain import pretrain

    root = _phantom_folder(tmp_path / "archive", per_region=24, seed=1000)
    out = tmp_path / "ssl"
    torch.manual_seed(0)
    overrides = ["debug=tiny", "unlabeled=folder", f"data.root={root}", "data.batch_size=32"]
    overrides += ["model.backbone=test_resnet", "trainer.max_epochs=10", "ssl.lr=0.003"]
    pretrain(
        compose_config("pretrain", [*overrides, "ssl.warmup_epochs=0", f"paths.output_dir={out}"])
    )

    log = pd.read_csv(next(out.glob("csv/**/metrics.csv")))
    losses = log["train/loss_epoch"].dropna().tolist()
    assert len(losses) == 10
    assert np.mean(losses[-4:]) < losses[0] - 0.3, losses

    tf = build_transforms(32, train=False)
    images = torch.stack(
        [
            tf(torch.from_numpy(render_phantom(r, 5000 + i, 64))[None])
            for r in SSL_REGIONS
            for i in range(30)
        ]
    )
    labels = np.repeat(np.arange(len(SSL_REGIONS)), 30)
    torch.manual_seed(0)
    random = _probe_accuracy(create_backbone("test_resnet"), images, labels)
    learned = create_backbone("test_resnet", weights_file=str(out / "backbone.pth"))
    assert _probe_accuracy(learned, images, labels) > random + 0.1
