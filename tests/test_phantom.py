"""Tests for the synthetic phantom generator (regionnet.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest

from regionnet.data.phantom import (
    PHANTOM_REGIONS,
    parse_phantom_uri,
    phantom_uri,
    render_phantom,
)

TARGETS = ("shoulder", "elbow", "hand", "pelvis", "knee")


def test_region_set():
    assert set(TARGETS) <= set(PHANTOM_REGIONS)
    assert {"chest", "foot", "skull"} <= set(PHANTOM_REGIONS)
    assert len(set(PHANTOM_REGIONS)) == len(PHANTOM_REGIONS)


@pytest.mark.parametrize("region", PHANTOM_REGIONS)
@pytest.mark.parametrize("size", [64, 128, 224])
def test_render_shape_dtype_range(region, size):
    img = render_phantom(region, 7, size)
    assert img.dtype == np.float32
    assert img.shape == (size, size)
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.02  # not constant


def test_default_size_is_128():
    assert render_phantom("hand", 0).shape == (128, 128)


@pytest.mark.parametrize("region", PHANTOM_REGIONS)
def test_deterministic_and_seed_dependent(region):
    a = render_phantom(region, 11, 96)
    np.testing.assert_array_equal(a, render_phantom(region, 11, 96))
    assert not np.array_equal(a, render_phantom(region, 12, 96))


def test_regions_differ_for_same_seed():
    imgs = [render_phantom(r, 5, 64) for r in PHANTOM_REGIONS]
    for i in range(len(imgs)):
        for k in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[k]).mean() > 0.01, (PHANTOM_REGIONS[i], PHANTOM_REGIONS[k])


def test_unknown_region_raises_listing_valid_ones():
    with pytest.raises(ValueError) as exc:
        render_phantom("spleen", 0)
    msg = str(exc.value)
    assert "spleen" in msg
    for region in PHANTOM_REGIONS:
        assert region in msg


@pytest.mark.parametrize("region", PHANTOM_REGIONS)
@pytest.mark.parametrize("seed", [0, 1, 123456789])
def test_uri_round_trip(region, seed):
    uri = phantom_uri(region, seed)
    assert uri == f"phantom://{region}/{seed}"
    assert parse_phantom_uri(uri) == (region, seed)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "phantom://",
        "phantom://hand",
        "phantom://hand/",
        "phantom:///3",
        "phantom://hand/abc",
        "phantom://hand/1.5",
        "file://hand/3",
        "xphantom://hand/3",
        "/data/hand/3.png",
    ],
)
def test_malformed_uri_raises(uri):
    with pytest.raises(ValueError):
        parse_phantom_uri(uri)


def _dataset(seeds):
    """16x16 block means and the global mean of 128-px phantoms of the target regions."""
    small, means, labels = [], [], []
    for label, region in enumerate(TARGETS):
        for seed in seeds:
            img = render_phantom(region, seed, 128)
            means.append(img.mean())
            small.append(img.reshape(16, 8, 16, 8).mean(axis=(1, 3)).ravel())
            labels.append(label)
    return np.array(small), np.array(means), np.array(labels)


def test_learnable_by_shape_not_by_brightness():
    x_tr, m_tr, y_tr = _dataset(range(40))  # 200 training images
    x_te, _, y_te = _dataset(range(10_000, 10_020))  # 100 held-out images

    # Mean intensity alone must not identify the region, even fitted and scored on the same
    # data (5 classes, chance 20%): exposure is randomised identically for every region.
    class_means = np.array([m_tr[y_tr == c].mean() for c in range(len(TARGETS))])
    mean_acc = (np.abs(m_tr[:, None] - class_means).argmin(axis=1) == y_tr).mean()
    assert mean_acc < 0.6, mean_acc

    # ...while the brightness-normalised 16x16 layout does: ridge least squares, held out.
    def features(x):
        x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)
        return np.c_[x, np.ones(len(x))]

    a = features(x_tr)
    w = np.linalg.solve(a.T @ a + 100.0 * np.eye(a.shape[1]), a.T @ np.eye(len(TARGETS))[y_tr])
    shape_acc = (np.argmax(features(x_te) @ w, axis=1) == y_te).mean()
    assert shape_acc > 0.5, shape_acc
