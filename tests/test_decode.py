"""Reduced-size reads (`read_radiograph(path, target=S)`), the reader/torch thread choice
and the reader/model time in predict's summary.

A reduced read must give the tensor the full read gives once both went through
`resize_pad(S)`: same shape, mean absolute difference below 0.01 (measured: under 0.001 for
PNG (float rounding only) and uncompressed DICOM (integer rounding); about 0.001 for JPEG's
1/8 DCT scaling and 0.003 for JPEG 2000's lower resolution levels on real chest films).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import compress, make_dicom
from phantom_model import phantom_checkpoint  # noqa: F401  (session fixture)
from PIL import Image
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

from regionnet.config import compose_config
from regionnet.data.dataset import RadiographDataset, collate, loader_threads
from regionnet.data.transforms import resize_pad
from regionnet.io import read_radiograph
from regionnet.predict import predict

FULLRES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fullres"
SIZE = 224


def film(height: int = 1200, width: int = 1000, seed: int = 0) -> np.ndarray:
    """A radiograph-like 8-bit image: smooth anatomy, a bright implant with hard edges, a
    burned-in marker and noise (hard edges are where reduced decoding differs most)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = 90 + 80 * np.exp(-((x - 0.45) ** 2 + (y - 0.5) ** 2) / 0.05) + 30 * np.sin(9 * x)
    img[int(0.3 * height) : int(0.6 * height), int(0.4 * width) : int(0.45 * width)] = 250
    img[20:60, 20:120] = 255
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def resized(pixels: np.ndarray, size: int = SIZE) -> torch.Tensor:
    return resize_pad(size)(torch.from_numpy(pixels)[None])


def assert_same_after_resize(path: Path, tolerance: float = 0.01, size: int = SIZE) -> None:
    full, reduced = read_radiograph(path), read_radiograph(path, target=size)
    assert reduced.dtype == np.float32 and reduced.ndim == 2
    assert max(reduced.shape) >= min(size, max(full.shape))  # never smaller than needed
    a, b = resized(full, size), resized(reduced, size)
    assert a.shape == b.shape
    diff = (a - b).abs()
    assert float(diff.mean()) < tolerance, f"{path.name}: mean {float(diff.mean()):.4f}"


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> dict[str, Path]:
    """The same film as 8-bit PNG, 16-bit PNG (12-bit values), RGB PNG, JPEG and DICOMs:
    uncompressed 8/12-bit, MONOCHROME1, JPEG 2000 (lossless and lossy syntax), JPEG
    Baseline, and one with a window."""
    root = tmp_path_factory.mktemp("decode")
    grey = film()
    out = {}
    Image.fromarray(grey).save(out.setdefault("png8", root / "film8.png"))
    deep = grey.astype(np.uint16) * 16 + 5
    Image.fromarray(deep).save(out.setdefault("png16", root / "film16.png"))
    rgb = np.stack([grey, np.roll(grey, 3, 0), 255 - grey], -1)
    Image.fromarray(rgb).save(out.setdefault("rgb", root / "rgb.png"))
    Image.fromarray(grey).save(out.setdefault("jpeg", root / "film.jpg"), quality=90)
    Image.fromarray(rgb).save(out.setdefault("jpeg_rgb", root / "rgb.jpg"), quality=90)
    out["dcm8"] = make_dicom(root / "d8.dcm", grey)
    out["dcm12"] = make_dicom(root / "d12.dcm", deep)
    out["mono1"] = make_dicom(root / "m1.dcm", (4095 - deep).astype(np.uint16), "MONOCHROME1")
    out["window"] = make_dicom(root / "w.dcm", deep, WindowCenter=1800, WindowWidth=2400)
    out["j2k"] = compress(out["dcm12"], JPEG2000Lossless)
    out["j2k_lossy"] = compress(out["dcm8"], JPEG2000)
    out["j2k_mono1"] = compress(out["mono1"], JPEG2000Lossless)
    out["jpeg_dcm"] = compress(out["dcm8"], JPEGBaseline8Bit)
    return out


@pytest.mark.parametrize(
    "kind",
    ["png8", "png16", "rgb", "jpeg", "jpeg_rgb", "dcm8", "dcm12", "mono1", "window", "j2k",
     "j2k_lossy", "j2k_mono1", "jpeg_dcm"],
)  # fmt: skip
def test_reduced_read_matches_full_read_after_resize(films, kind):
    assert_same_after_resize(films[kind])


def test_reduced_read_is_the_transform_size(films):
    """Larger files come back at the size resize_pad gives them (its resize then has
    nothing left to do): PNGs (resized in float32, like torchvision) to float rounding,
    DICOMs (rounded back to integers for their LUTs) to integer rounding."""
    for kind in ("png8", "png16", "dcm12", "mono1"):
        reduced = read_radiograph(films[kind], target=SIZE)
        assert reduced.shape == (SIZE, int(SIZE * 1000 / 1200))
        diff = (resized(read_radiograph(films[kind])) - resized(reduced)).abs()
        assert float(diff.max()) < (1e-5 if kind.startswith("png") else 0.01), kind


def test_reduced_decoders_are_used(films, monkeypatch):
    """JPEG and JPEG 2000 really decode less: a smaller image comes out of the decoder."""
    from regionnet import io

    seen = []
    real = io._fit

    def spy(im, size, scale, target):
        seen.append((im.size, scale))
        return real(im, size, scale, target)

    monkeypatch.setattr(io, "_fit", spy)
    for kind in ("jpeg", "j2k", "jpeg_dcm"):
        seen.clear()
        read_radiograph(films[kind], target=SIZE)
        (decoded, scale), *_ = seen
        assert scale in (2.0, 4.0) and max(decoded) >= SIZE and max(decoded) < 1200, kind


def test_target_never_upsamples(tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(film(150, 120)).save(small)
    assert read_radiograph(small, target=SIZE).shape == (150, 120)
    np.testing.assert_array_equal(read_radiograph(small, target=SIZE), read_radiograph(small))
    dcm = make_dicom(tmp_path / "small.dcm", film(200, 100))
    assert read_radiograph(dcm, target=SIZE).shape == (200, 100)


@pytest.mark.parametrize("target", [16, 100, 224, 299, 511])
def test_target_never_smaller_than_needed(films, target):
    for kind in ("png8", "jpeg", "j2k", "jpeg_dcm"):
        reduced = read_radiograph(films[kind], target=target)
        assert max(reduced.shape) == target, (kind, reduced.shape)
        assert resized(reduced, target).shape == resized(read_radiograph(films[kind]), target).shape


def test_bit_depth_rule_uses_the_full_image(tmp_path):
    """Rule 2 picks the depth from the brightest value of the whole image, not of the
    averaged one: a single 12-bit-overflowing pixel keeps the 14-bit scale."""
    deep = film().astype(np.uint16) * 16
    deep[5, 5] = 5000  # needs 14 bits; averaging would hide it
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    full, reduced = read_radiograph(path), read_radiograph(path, target=SIZE)
    assert abs(float(full.mean()) - float(reduced.mean())) < 0.002
    assert float(full.max()) == pytest.approx(5000 / 16383)


@pytest.mark.skipif(not FULLRES.is_dir(), reason=f"{FULLRES} (real full-resolution films) absent")
def test_real_fullres_films(tmp_path):
    """Real chest (about 2400 x 2000 RGB) and hand films, and DICOMs made from one chest."""
    paths = sorted(FULLRES.glob("*/*.png"))
    assert paths
    for path in paths[::3]:
        assert_same_after_resize(path)
    grey = np.asarray(Image.open(sorted(FULLRES.glob("chest/*.png"))[0]).convert("L"))
    dcm = make_dicom(tmp_path / "chest.dcm", grey.astype(np.uint16) * 16 + 7)
    for path in (dcm, compress(dcm, JPEG2000Lossless)):
        assert_same_after_resize(path)


def test_dataset_uses_target_and_times_reads(films):
    import pandas as pd

    frame = pd.DataFrame({"path": [str(films["png8"]), str(films["jpeg"]) + ".missing"]})
    ds = RadiographDataset(frame, ["knee"], resize_pad(SIZE), target=SIZE)
    good, bad = ds[0], ds[1]
    assert good["image"].shape == (1, SIZE, SIZE) and good["read_seconds"] > 0
    assert "error" in bad and bad["read_seconds"] >= 0
    batch = collate([good, bad])
    assert batch["read_seconds"] == pytest.approx(good["read_seconds"] + bad["read_seconds"])


@pytest.mark.parametrize(
    "cores,gpu,expected",
    [(1, False, (0, 1)), (2, False, (1, 2)), (2, True, (1, 2)), (3, False, (1, 3)),
     (4, False, (2, 4)), (16, False, (8, 16)), (16, True, (15, 1))],
)  # fmt: skip
def test_thread_choice_from_cores(cores, gpu, expected):
    assert loader_threads(None, "auto", cores=cores, gpu=gpu) == expected


def test_thread_choice_respects_explicit_values():
    assert loader_threads(3, None, cores=2) == (3, 2)  # idle readers cost torch little
    assert loader_threads(0, None, cores=2) == (0, 2)
    assert loader_threads(None, 4, cores=2) == (1, 4)
    assert loader_threads("2", "3", cores=16, gpu=True) == (2, 3)
    with pytest.raises(ValueError, match="auto"):
        loader_threads(-1, None, cores=2)


def test_predict_summary_has_reader_and_model_time(phantom_checkpoint, films, tmp_path, capsys):  # noqa: F811
    before = torch.get_num_threads()
    folder = tmp_path / "in"
    folder.mkdir()
    for kind in ("png8", "jpeg", "j2k"):
        (folder / films[kind].name).write_bytes(films[kind].read_bytes())
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={phantom_checkpoint}",
            f"input={folder}",
            f"output={tmp_path / 'preds.csv'}",
            "accelerator=cpu",
            "num_workers=0",
            "torch_threads=1",
            "batch_size=2",
        ],
    )
    summary = predict(cfg)
    assert summary["ok"] == 3
    assert (summary["num_workers"], summary["torch_threads"]) == (0, 1)
    assert summary["read_seconds"] > 0 and summary["model_seconds"] > 0
    assert summary["read_ms_per_film"] == pytest.approx(1000 * summary["read_seconds"] / 3)
    assert summary["model_batches"] == 2
    assert summary["bound"] in ("reader", "model")
    out = capsys.readouterr().out
    assert f"{summary['bound']}-bound:" in out and "ms/film reading" in out
    assert "ms/film model" in out
    assert torch.get_num_threads() == before  # predict gives the caller's threads back
