"""One intensity rule for every reader (`regionnet.io`'s docstring): one image saved in every
container reads to the same pixels and gets the same probabilities.

Pixels are compared at 1e-6 (the rule is exact: only float32 rounding differs), probabilities
of a small random network through the evaluation preprocessing at 1e-4. Lossy JPEG (a .jpg
file, DICOM JPEG baseline and 12-bit JPEG Extended) changes the pixels themselves; its
documented tolerance is `LOSSY_MEAN` / `LOSSY_MAX` on pixels and `LOSSY_PROB` on probabilities.
DICOMweb is covered by `dicom_pixels` on the retrieved data set (what `regionnet.dicomweb`
decodes with); the HTTP round trip itself is tested in test_dicomweb.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dicom_factory import compress, make_dicom, strip_header
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from regionnet.api import array_pixels
from regionnet.data.phantom import render_phantom
from regionnet.data.transforms import eval_transform
from regionnet.io import INTENSITY, dicom_pixels, read_radiograph

PIXEL_TOL = 1e-6
PROB_TOL = 1e-4
LOSSY_MEAN, LOSSY_MAX, LOSSY_PROB = 0.01, 0.05, 0.01  # JPEG quality 95, GDCM default
HEIGHT, WIDTH = 96, 80  # not square: a transposed read fails


def dim_film() -> np.ndarray:
    """A film like radoss_ddh_jordan/pelvis/331_DDH_116.png: 8-bit, pixels 0..149 only."""
    return (render_phantom("pelvis", 3, HEIGHT)[:, :WIDTH] * 149).round().astype(np.uint8)


FILM = dim_film()
COARSE = (FILM // 17 * 17).astype(np.uint8)  # 16 levels: exact in 12 bits too (17 v -> 273 v)


def model_probs(pixels: np.ndarray) -> np.ndarray:
    """Probabilities of a fixed random network after the evaluation preprocessing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    transform = eval_transform({"image_size": 64, "mean": 0.449, "std": 0.226})
    with torch.inference_mode():
        return torch.sigmoid(net(transform(torch.from_numpy(pixels)[None])[None]))[0].numpy()


# --------------------------------------------------------------------------- writers
# Each takes (folder, v: the 8-bit image) and returns a path, a pydicom Dataset or an array.


def png8(d: Path, v: np.ndarray) -> Path:
    Image.fromarray(v).save(d / "a.png")
    return d / "a.png"


def png16(d: Path, v: np.ndarray) -> Path:  # 8 -> 16 bits the standard way: v * 257
    Image.fromarray(v.astype(np.uint16) * 257).save(d / "a16.png")
    return d / "a16.png"


def png16_raw(d: Path, v: np.ndarray) -> Path:  # 8-bit values in a 16-bit container
    Image.fromarray(v.astype(np.uint16)).save(d / "raw16.png")
    return d / "raw16.png"


def tiff8(d: Path, v: np.ndarray) -> Path:
    Image.fromarray(v).save(d / "a.tif")
    return d / "a.tif"


def tiff16(d: Path, v: np.ndarray) -> Path:
    Image.fromarray(v.astype(np.uint16) * 257).save(d / "a16.tiff")
    return d / "a16.tiff"


def rgb_png(d: Path, v: np.ndarray) -> Path:
    Image.fromarray(np.stack([v] * 3, axis=-1)).save(d / "rgb.png")
    return d / "rgb.png"


def dcm8(d: Path, v: np.ndarray) -> Path:
    return make_dicom(d / "m2_8.dcm", v)


def dcm8_m1(d: Path, v: np.ndarray) -> Path:
    return make_dicom(d / "m1_8.dcm", 255 - v, "MONOCHROME1")


def dcm8_rgb(d: Path, v: np.ndarray) -> Path:
    return make_dicom(d / "rgb8.dcm", np.stack([v] * 3, axis=-1), "RGB")


def dcm16(d: Path, v: np.ndarray) -> Path:
    return make_dicom(d / "m2_16.dcm", v.astype(np.uint16) * 257, BitsStored=16)


def dcm16_m1(d: Path, v: np.ndarray) -> Path:
    stored = 65535 - v.astype(np.uint16) * 257
    return make_dicom(d / "m1_16.dcm", stored, "MONOCHROME1", BitsStored=16)


WINDOW_12 = {"WindowCenter": 2040, "WindowWidth": 4080, "VOILUTFunction": "LINEAR_EXACT"}


def dcm12_window(d: Path, v: np.ndarray) -> Path:  # 16 v, window 0..4080 -> v / 255
    return make_dicom(d / "m2_12w.dcm", v.astype(np.uint16) * 16, **WINDOW_12)


def dcm12_window_m1(d: Path, v: np.ndarray) -> Path:
    stored = (4080 - v.astype(np.uint16) * 16).astype(np.uint16)
    return make_dicom(d / "m1_12w.dcm", stored, "MONOCHROME1", **WINDOW_12)


def dcm16_rescale_linear_window(d: Path, v: np.ndarray) -> Path:
    # modality = 0.5 * (16 v + 100) - 50 = 8 v; LINEAR window c 1020.5, w 2041 -> 8 v / 2040
    return make_dicom(
        d / "rescale.dcm",
        v.astype(np.uint16) * 16 + 100,
        BitsStored=16,
        RescaleSlope=0.5,
        RescaleIntercept=-50,
        WindowCenter=1020.5,
        WindowWidth=2041,
    )


def dcm12_voi_lut(d: Path, v: np.ndarray) -> Path:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", [s // 16 for s in range(4096)])  # 16 v -> v, 0..255
    return make_dicom(d / "voi.dcm", v.astype(np.uint16) * 16, VOILUTSequence=Sequence([item]))


def dcm12_coarse(d: Path, v: np.ndarray) -> Path:  # no window: 273 k / 4095 = 17 k / 255
    return make_dicom(d / "m2_12.dcm", (v.astype(np.uint16) // 17) * 273)


def dcm12_coarse_m1(d: Path, v: np.ndarray) -> Path:
    return make_dicom(d / "m1_12.dcm", 4095 - (v.astype(np.uint16) // 17) * 273, "MONOCHROME1")


def compressed(make, syntax):
    def write(d: Path, v: np.ndarray) -> Path:
        return compress(make(d, v), syntax)

    write.__name__ = f"{make.__name__}_{syntax.keyword}"
    return write


def headerless(d: Path, v: np.ndarray) -> Path:  # no preamble, no file meta, no suffix
    return strip_header(dcm16(d, v), d / "IM_NO_META", implicit_vr=True)


def headerless_explicit(d: Path, v: np.ndarray) -> Path:
    return strip_header(dcm8_m1(d, v), d / "no_meta_explicit.dcm", implicit_vr=False)


def dicomweb_dataset(d: Path, v: np.ndarray) -> Dataset:  # a retrieved instance, in memory
    return pydicom.dcmread(dcm12_window(d, v))


def uint8_array(d: Path, v: np.ndarray) -> np.ndarray:
    return v


def uint16_array(d: Path, v: np.ndarray) -> np.ndarray:
    return v.astype(np.uint16) * 257


def float_array(d: Path, v: np.ndarray) -> np.ndarray:
    return v / np.float32(255)


def tensor(d: Path, v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(v / np.float32(255))[None]


EXACT = [
    png8, png16, png16_raw, tiff8, tiff16, rgb_png,
    dcm8, dcm8_m1, dcm8_rgb, dcm16, dcm16_m1,
    dcm12_window, dcm12_window_m1, dcm16_rescale_linear_window, dcm12_voi_lut,
    compressed(dcm8, JPEGLosslessSV1), compressed(dcm16, JPEGLosslessSV1),
    compressed(dcm12_window_m1, JPEGLosslessSV1), compressed(dcm8_m1, JPEGLossless),
    compressed(dcm16, JPEGLSLossless), compressed(dcm12_window, JPEG2000Lossless),
    compressed(dcm16_m1, RLELossless), compressed(dcm8, DeflatedExplicitVRLittleEndian),
    headerless, headerless_explicit, dicomweb_dataset,
    uint8_array, uint16_array, float_array, tensor,
]  # fmt: skip
COARSE_ONLY = [dcm12_coarse, dcm12_coarse_m1, compressed(dcm12_coarse, JPEGLosslessSV1)]
LOSSY = [compressed(dcm8, JPEGBaseline8Bit), compressed(dcm12_window, JPEGExtended12Bit)]


def read(x) -> np.ndarray:
    """Pixels of what a writer made, through the reader that input would meet."""
    if isinstance(x, Path):
        return read_radiograph(x)
    if isinstance(x, Dataset):
        return dicom_pixels(x, "retrieved instance")
    return array_pixels(x)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return {
        "film": FILM / np.float32(255),
        "coarse": COARSE / np.float32(255),
        "film_probs": model_probs(FILM / np.float32(255)),
        "coarse_probs": model_probs(COARSE / np.float32(255)),
    }


@pytest.mark.parametrize(
    "write,image", [(w, "film") for w in EXACT] + [(w, "coarse") for w in COARSE_ONLY + EXACT[:1]]
)
def test_same_pixels_and_probabilities_in_every_container(tmp_path, reference, write, image):
    v = FILM if image == "film" else COARSE
    pixels = read(write(tmp_path, v))
    assert pixels.dtype == np.float32 and pixels.shape == v.shape
    np.testing.assert_allclose(pixels, reference[image], rtol=0, atol=PIXEL_TOL)
    probs = model_probs(pixels)
    np.testing.assert_allclose(probs, reference[f"{image}_probs"], rtol=0, atol=PROB_TOL)


@pytest.mark.parametrize("write", LOSSY)
def test_lossy_jpeg_within_its_documented_tolerance(tmp_path, reference, write):
    pixels = read(write(tmp_path, FILM))
    diff = np.abs(pixels - reference["film"])
    assert diff.mean() <= LOSSY_MEAN and diff.max() <= LOSSY_MAX
    assert np.abs(model_probs(pixels) - reference["film_probs"]).max() <= LOSSY_PROB


def test_lossy_jpeg_file_within_its_documented_tolerance(tmp_path, reference):
    Image.fromarray(FILM).save(tmp_path / "a.jpg", quality=95)
    pixels = read_radiograph(tmp_path / "a.jpg")
    diff = np.abs(pixels - reference["film"])
    assert diff.mean() <= LOSSY_MEAN and diff.max() <= LOSSY_MAX
    assert np.abs(model_probs(pixels) - reference["film_probs"]).max() <= LOSSY_PROB


def test_a_dim_8bit_dicom_is_not_stretched(tmp_path):
    """The issue's case: pixels 0..149 without a window read as v / 255 in DICOM too (the
    old reader stretched the DICOM to 0..1 and a model called the pelvis a knee)."""
    out = read_radiograph(dcm8(tmp_path, FILM))
    assert out.max() == pytest.approx(149 / 255)
    np.testing.assert_array_equal(out, read_radiograph(png8(tmp_path, FILM)))


def test_real_dim_pelvis_film_png_and_dicom_identical(tmp_path, shared_data):
    png = shared_data / "radiographs" / "radoss_ddh_jordan" / "pelvis" / "331_DDH_116.png"
    if not png.is_file():
        pytest.skip(f"{png} not found")
    v = np.asarray(Image.open(png).convert("L"))
    assert (v.min(), v.max()) == (0, 149)
    from_png = read_radiograph(png)
    np.testing.assert_array_equal(read_radiograph(make_dicom(tmp_path / "ddh.dcm", v)), from_png)
    m1 = read_radiograph(make_dicom(tmp_path / "ddh_m1.dcm", 255 - v, "MONOCHROME1"))
    np.testing.assert_allclose(m1, from_png, rtol=0, atol=PIXEL_TOL)
    np.testing.assert_allclose(model_probs(m1), model_probs(from_png), rtol=0, atol=PROB_TOL)


def test_undeclared_depth_is_the_smallest_that_holds_the_data(tmp_path):
    """16-bit PNGs and integer arrays declare no bit depth: 12-bit data saved raw reads like the
    12-bit DICOM it came from (BitsStored 12)."""
    raw = (COARSE.astype(np.uint16) // 17) * 273  # 0..4095
    Image.fromarray(raw).save(tmp_path / "raw12.png")
    from_dicom = read_radiograph(make_dicom(tmp_path / "raw12.dcm", raw))
    np.testing.assert_array_equal(read_radiograph(tmp_path / "raw12.png"), from_dicom)
    np.testing.assert_array_equal(array_pixels(raw), from_dicom)
    ten_bit = np.array([[0, 512, 1023]], dtype=np.uint16)
    np.testing.assert_allclose(array_pixels(ten_bit), ten_bit / 1023, rtol=0, atol=PIXEL_TOL)
    signed = np.array([[-2048, 0, 2047]], dtype=np.int16)  # signed 12-bit
    np.testing.assert_allclose(array_pixels(signed), (signed + 2048) / 4095, atol=PIXEL_TOL)


def test_checkpoints_record_the_rule_and_old_ones_get_it(tmp_path):
    import lightning as L

    from regionnet.model.module import RegionNet, load_regionnet

    model = RegionNet(regions=["hand", "knee"], backbone="test_resnet", image_size=32)
    assert model.hparams.intensity == INTENSITY
    old = {k: v for k, v in model.hparams.items() if k != "intensity"}  # before the rule
    ckpt = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": old,
            "pytorch-lightning_version": L.__version__,
        },
        ckpt,
    )
    assert load_regionnet(ckpt).hparams.intensity == INTENSITY
    with pytest.raises(ValueError, match="intensity"):
        RegionNet(regions=["hand"], backbone="test_resnet", intensity="percentile")
