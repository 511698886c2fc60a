"""The stronger supervised recipe's knobs: label smoothing, `other` film weight, class-balanced
sampling, test-time flip, rejection-rate thresholds and EMA weights; defaults change nothing."""

import logging

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import RandomSampler, WeightedRandomSampler
from torchmetrics.classification import BinaryROC
from torchmetrics.functional.classification import binary_auroc

from regionnet.api import load_model
from regionnet.config import compose_config
from regionnet.data.datamodule import RegionDataModule, balanced_sampler
from regionnet.model.module import RegionNet
from regionnet.model.thresholds import choose_threshold, parse_method, rejection_thresholds
from regionnet.train import build_model, train

REGIONS = ["hand", "knee", "pelvis"]


def _net(**kwargs) -> RegionNet:
    return RegionNet(regions=REGIONS, backbone="test_resnet", image_size=32, **kwargs).eval()


# -- defaults ---------------------------------------------------------------------------------
def test_defaults_are_todays_recipe(tmp_path):
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}"])
    assert cfg.model.label_smoothing == 0.0 and cfg.model.other_weight == 1.0
    assert cfg.model.tta is False and cfg.model.threshold_method == "youden"
    assert cfg.data.balanced_sampling is False and cfg.callbacks.ema is None
    model = build_model(cfg, REGIONS)
    model.pos_weight = torch.tensor([2.0, 3.0, 4.0])
    logits, labels = torch.randn(6, 3), torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    labels[4:] = 0
    plain = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=model.pos_weight)
    assert torch.equal(model._loss(logits, labels, train=True), plain)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().inference_proba(x), model.predict_proba(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label_smoothing": 1.0}, "model.label_smoothing"),
        ({"label_smoothing": -0.1}, "model.label_smoothing"),
        ({"other_weight": -1}, "model.other_weight"),
        ({"threshold_method": "rejection@90"}, "rejection@X"),
        ({"threshold_method": "rejection@1.5"}, "rejection@X"),
    ],
)
def test_bad_recipe_values_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _net(**kwargs)


# -- losses ---------------------------------------------------------------------------------
def _bce(logits, targets, pos_weight):
    """Elementwise BCE with pos_weight, written out: -(w y log s + (1 - y) log(1 - s))."""
    s = torch.sigmoid(logits)
    return -(pos_weight * targets * torch.log(s) + (1 - targets) * torch.log(1 - s))


def test_label_smoothing_moves_training_targets_halfway_and_leaves_eval_loss_hard():
    model = _net(label_smoothing=0.2)
    model.pos_weight = torch.tensor([2.0, 1.0, 3.0])
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    smooth = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1]])  # y * 0.8 + 0.1
    train_loss = model._loss(logits, labels, train=True)
    # pos_weight weighs positive films; the soft target's two terms keep equal weight
    film = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(train_loss, (film * _bce(logits, smooth, 1.0)).mean())
    eval_loss = model._loss(logits, labels)
    torch.testing.assert_close(eval_loss, _bce(logits, labels, model.pos_weight).mean())
    assert train_loss > eval_loss  # confident right answers cost more with soft targets


@pytest.mark.parametrize("pos_weight", [1.0, 14.0, 100.0])
def test_smoothed_loss_of_a_negative_film_is_lowest_at_half_the_smoothing(pos_weight):
    """A head with a large pos_weight (few positives, e.g. pelvis) must still push negatives to
    e/2: with BCE's pos_weight on soft targets their optimum was pw*e/2 / (pw*e/2 + 1 - e/2),
    0.84 at pw = 100, and that head fired on every film."""
    model = _net(label_smoothing=0.1)
    model.pos_weight = torch.full((3,), pos_weight)
    labels = torch.tensor([[1.0, 0.0, 0.0]])  # heads 2 and 3 see a negative film
    logit = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=1.0)
    for _ in range(2000):
        opt.zero_grad()
        model._loss(logit, labels, train=True).backward()
        opt.step()
    p = torch.sigmoid(logit.detach())[0]
    torch.testing.assert_close(p[1:], torch.full((2,), 0.05), atol=2e-3, rtol=0)
    assert abs(float(p[0]) - 0.95) < 2e-3  # the positive film's optimum is 1 - e/2 too


def test_other_weight_scales_the_loss_of_films_with_no_positive_label():
    model = _net(other_weight=3.0)
    model.pos_weight = torch.tensor([2.0, 1.0, 3.0])
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(5, 3)
    labels[0, 0] = labels[1, 2] = 1  # rows 2-4 are other films
    per = _bce(logits, labels, model.pos_weight)
    weight = torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0])[:, None]
    torch.testing.assert_close(model._loss(logits, labels, train=True), (per * weight).mean())
    torch.testing.assert_close(model._loss(logits, labels), per.mean())  # val/test: unweighted


# -- balanced sampling ------------------------------------------------------------------------
def test_balanced_sampler_draws_each_class_equally_often_from_an_imbalanced_table():
    frame = pd.DataFrame({"region": ["knee"] * 80 + ["hand"] * 15 + ["other"] * 5})
    sampler = balanced_sampler(frame, repeat=2)
    assert len(sampler) == 200 and sampler.replacement
    torch.manual_seed(0)
    drawn = torch.cat([torch.tensor(list(sampler)) for _ in range(20)])
    assert int(drawn.max()) >= 100  # indices span the repeated dataset
    shares = frame["region"].to_numpy()[(drawn % 100).numpy()]
    shares = pd.Series(shares).value_counts(normalize=True)
    assert set(shares.index) == {"knee", "hand", "other"}
    assert (shares - 1 / 3).abs().max() < 0.03, shares


def test_datamodule_uses_the_sampler_only_when_asked():
    common = dict(source="phantom", phantom={"per_region": 6}, image_size=32, num_workers=0)
    dm = RegionDataModule(**common, augment_factor=3, balanced_sampling=True)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler)
    assert len(loader.sampler) == 3 * dm.train_size() == len(loader.dataset)
    assert isinstance(RegionDataModule(**common).train_dataloader().sampler, RandomSampler)
    assert not isinstance(dm.val_dataloader().sampler, WeightedRandomSampler)


# -- test-time flip ----------------------------------------------------------------------------
def test_tta_averages_plain_and_flipped_probabilities_on_every_inference_path():
    model = _net(tta=True)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = torch.sigmoid(model.logits(x))
        flipped = torch.sigmoid(model.logits(x.flip(-1)))
        expected = (plain + flipped) / 2
        torch.testing.assert_close(model.inference_proba(x), expected)
        assert not torch.allclose(expected, model.predict_proba(x))  # the plain forward
        out = model.predict_step({"image": x, "path": ["a", "b", "c"]}, 0)
        torch.testing.assert_close(out["probs"], expected)
        model._eval_step({"image": x, "labels": torch.zeros(3, 3)}, "val")
        torch.testing.assert_close(model.metrics["val"].other_probs(), expected)


# -- rejection@X ---------------------------------------------------------------------------
def _synthetic_val(seed: int = 0):
    """Three heads; in-set films clearly separated, other films half-way up on every head."""
    g = torch.Generator().manual_seed(seed)
    n = 60
    labels = torch.eye(3).repeat_interleave(n, 0)
    probs = torch.where(labels == 1, 0.6 + 0.4 * torch.rand(3 * n, 3, generator=g), 0.0)
    probs = probs + torch.where(labels == 0, 0.3 * torch.rand(3 * n, 3, generator=g), 0.0)
    other = 0.2 + 0.5 * torch.rand(40, 3, generator=g)
    return probs, labels, other


def _curves(probs, labels, other):
    """ROC per head over in-set and other films together, as on the validation pass."""
    p, y = torch.cat([probs, other]), torch.cat([labels, torch.zeros_like(other)])
    curves = []
    for k in range(p.shape[1]):
        roc = BinaryROC(thresholds=200)
        roc.update(p[:, k], y[:, k].int())
        curves.append(tuple(roc.compute()))
    return curves


def _rejected(other, thresholds) -> float:
    return float((other < torch.tensor(thresholds)).all(1).float().mean())


def test_rejection_thresholds_reach_the_target_where_youden_does_not():
    probs, labels, other = _synthetic_val()
    youden = [choose_threshold(*c, "youden") for c in _curves(probs, labels, other)]
    assert _rejected(other, youden) < 0.9
    thresholds, rejected = rejection_thresholds(other, youden, 0.9)
    assert rejected >= 0.9 and rejected == pytest.approx(_rejected(other, thresholds))
    assert all(t >= f for t, f in zip(thresholds, youden, strict=True))
    # the least strict choice at a common level: one film fewer per head misses the target
    levels = [int((other[:, k] < t).sum()) for k, t in enumerate(thresholds)]
    assert len(set(levels)) == 1
    below = [float(other[:, k].sort().values[levels[0] - 2]) + 1e-6 for k in range(3)]
    assert _rejected(other, [max(b, f) for b, f in zip(below, youden, strict=True)]) < 0.9
    # in-set sensitivity is what is given up, and not all of it
    sensitivity = (probs >= torch.tensor(thresholds))[labels == 1].float().mean()
    assert 0.3 < sensitivity < 1.0
    # floors that already reject enough stay as they are
    kept, rejected = rejection_thresholds(other, [0.8, 0.8, 0.8], 0.9)
    assert kept == pytest.approx([0.8, 0.8, 0.8]) and rejected == 1.0


def test_validation_pass_applies_rejection_and_falls_back_without_other_films(caplog):
    probs, labels, other = _synthetic_val(1)
    curves = dict(zip(REGIONS, _curves(probs, labels, other), strict=True))
    values = {f"val/auroc/{r}": 1.0 for r in REGIONS}
    model = _net(threshold_method="rejection@0.9")
    assert parse_method("rejection@0.9") == ("rejection", 0.9)
    model._calibrate(curves, values, other)
    assert _rejected(other, model.thresholds.tolist()) >= 0.9
    with caplog.at_level(logging.WARNING, logger="regionnet.model.module"):
        model._calibrate(curves, values, torch.zeros(0, 3))
    assert "no other films" in caplog.text
    spec = [choose_threshold(*curves[r], "specificity@0.9") for r in REGIONS]
    assert model.thresholds.tolist() == pytest.approx(spec)


# -- the whole recipe on phantoms, EMA included ------------------------------------------------
EMA = "{_target_:lightning.pytorch.callbacks.EMAWeightAveraging,decay:0.5}"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from conftest import FAST

    out = tmp_path_factory.mktemp("recipe")
    cfg = compose_config(
        "train",
        [
            *FAST,
            f"paths.output_dir={out}",
            "model.backbone=test_resnet",
            "trainer.max_epochs=2",
            "data.phantom.per_region=16",
            "model.threshold_method=rejection@0.9",
            "model.tta=true",
            "model.label_smoothing=0.1",
            "model.other_weight=2",
            "data.balanced_sampling=true",
            f"callbacks.ema={EMA}",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread avoids contention on 2 cores
    try:
        metrics = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return out, metrics


def test_best_checkpoint_holds_the_averaged_weights_and_the_chosen_thresholds(recipe_run):
    out, _ = recipe_run
    best = torch.load(out / "checkpoints/best.ckpt", weights_only=True)
    assert best["hyper_parameters"]["tta"] is True
    # best.ckpt keeps only what inference needs: the averaged weights, not the trained ones
    assert "current_model_state" not in best and "averaging_state" not in best
    assert not torch.equal(best["state_dict"]["thresholds"], torch.full((5,), 0.5))
    # last.ckpt keeps both for resuming
    last = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    averaged, trained = last["state_dict"], last["current_model_state"]
    assert int(last["averaging_state"]["n_averaged"]) > 1
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained if "weight" in k)
    # thresholds are chosen on validation, not averaged with the initial 0.5
    assert torch.equal(averaged["thresholds"], trained["thresholds"])
    assert not torch.equal(averaged["thresholds"], torch.full((5,), 0.5))


def test_the_run_reports_what_its_best_checkpoint_does(recipe_run):
    """Val metrics, test predictions and the rejection rate of train() are those of
    best.ckpt (averaged weights, flip averaging) as the Python API loads it."""
    out, metrics = recipe_run
    predictor = load_model(out / "checkpoints/best.ckpt")
    split = pd.read_csv(out / "split.csv")
    regions = list(predictor.regions)

    test = pd.read_csv(out / "test_predictions.csv")
    got = predictor.predict(test["path"].tolist())
    probs = torch.tensor([[p.probabilities[r] for r in regions] for p in got])
    torch.testing.assert_close(
        probs, torch.tensor(test[[f"p_{r}" for r in regions]].to_numpy()).float(), atol=1e-5, rtol=0
    )

    val = split[split["split"] == "val"]
    got = predictor.predict(val["path"].tolist())
    probs = torch.tensor([[p.probabilities[r] for r in regions] for p in got])
    labels = torch.tensor(val[[f"label_{r}" for r in regions]].to_numpy())
    aurocs = [
        float(binary_auroc(probs[:, k], labels[:, k]))
        for k in range(len(regions))
        if 0 < labels[:, k].sum() < len(labels)
    ]
    assert sum(aurocs) / len(aurocs) == pytest.approx(metrics["val/auroc_mean"], abs=1e-4)
    other = [p.region for p, region in zip(got, val["region"], strict=True) if region == "other"]
    assert len(other) >= 3
    # the films that chose the thresholds: a consistency check of the saved thresholds (it
    # holds for a useless model too); learning is checked on held-out films in test_learning
    assert sum(r == "unknown" for r in other) / len(other) >= 0.9
