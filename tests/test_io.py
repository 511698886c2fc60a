"""Tests for regionnet.io: every reader yields float32 (H, W) in [0, 1], MONOCHROME2."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import make_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless

from regionnet.io import (
    IMAGE_EXTENSIONS,
    RadiographReadError,
    is_dicom,
    read_dicom_header,
    read_radiograph,
)

RAW = np.array([[0, 500, 1000], [1500, 2000, 4000]], dtype=np.uint16)  # 12-bit values


def assert_contract(arr: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert arr.dtype == np.float32
    assert arr.ndim == 2
    assert arr.flags["C_CONTIGUOUS"]
    assert np.isfinite(arr).all()
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    if shape is not None:
        assert arr.shape == shape


def gradient(h: int = 16, w: int = 24) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


# --------------------------------------------------------------------------- Pillow formats


def test_png_8bit_keeps_exact_values(tmp_path):
    pixels = gradient()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_radiograph(tmp_path / "a.png")
    assert_contract(out, pixels.shape)
    np.testing.assert_array_equal(out, pixels.astype(np.float32) / 255)


def test_png_8bit_is_not_stretched(tmp_path):
    """8-bit files keep their stored exposure: a dim image stays dim."""
    Image.fromarray(np.array([[10, 20], [30, 40]], dtype=np.uint8)).save(tmp_path / "d.png")
    out = read_radiograph(tmp_path / "d.png")
    assert out.max() == pytest.approx(40 / 255)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_is_min_max_normalised_and_monotone(tmp_path, suffix):
    pixels = np.linspace(1000, 4000, 6 * 7).reshape(6, 7).astype(np.uint16)
    im = Image.fromarray(pixels)
    assert im.mode.startswith("I;16")
    im.save(tmp_path / f"a{suffix}")
    out = read_radiograph(tmp_path / f"a{suffix}")
    assert_contract(out, pixels.shape)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out.ravel()) > 0)
    np.testing.assert_allclose(out, (pixels - 1000.0) / 3000.0, atol=1e-6)


def test_constant_16bit_gives_zeros(tmp_path):
    Image.fromarray(np.full((4, 4), 1234, dtype=np.uint16)).save(tmp_path / "c.png")
    out = read_radiograph(tmp_path / "c.png")
    assert_contract(out, (4, 4))
    assert not out.any()


def test_tiff_8bit_exact(tmp_path):
    pixels = gradient(5, 9)
    Image.fromarray(pixels).save(tmp_path / "a.tiff")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "a.tiff"), pixels / np.float32(255))


def test_float_tiff_min_max_and_nan_rejected(tmp_path):
    pixels = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    Image.fromarray(pixels).save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_radiograph(tmp_path / "f.tif"), (pixels + 1) / 4)
    pixels[0, 0] = np.nan
    Image.fromarray(pixels).save(tmp_path / "nan.tif")
    with pytest.raises(RadiographReadError, match="nan.tif.*NaN"):
        read_radiograph(tmp_path / "nan.tif")


def test_rgb_png_becomes_gray(tmp_path):
    gray = gradient(4, 6)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    out = read_radiograph(tmp_path / "rgb.png")
    assert_contract(out, gray.shape)
    np.testing.assert_allclose(out, gray / 255, atol=1 / 255)


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 0  # fully transparent must not turn the image black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_radiograph(tmp_path / "rgba.png")
    assert_contract(out, (3, 4))
    np.testing.assert_allclose(out, 200 / 255, atol=1 / 255)


@pytest.mark.parametrize("mode", ["1", "P", "LA"])
def test_other_8bit_modes(tmp_path, mode):
    Image.fromarray(gradient(4, 8)).convert(mode).save(tmp_path / "m.png")
    out = read_radiograph(tmp_path / "m.png")
    assert_contract(out, (4, 8))
    assert out[:, 0].max() < 0.1 and out[:, -1].min() > 0.9


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg_approximately_preserved(tmp_path, suffix):
    pixels = gradient(16, 32)
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}", quality=95)
    out = read_radiograph(tmp_path / f"a{suffix}")
    assert_contract(out, pixels.shape)
    np.testing.assert_allclose(out, pixels / 255, atol=0.05)


def test_multipage_tiff_first_page_with_warning(tmp_path):
    pages = [Image.fromarray(np.full((3, 3), v, dtype=np.uint8)) for v in (51, 102, 204)]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match="multi.tif.*first"):
        out = read_radiograph(tmp_path / "multi.tif")
    np.testing.assert_allclose(out, 0.2)


# --------------------------------------------------------------------------- DICOM


def dicom_image(tmp_path, name="a.dcm", pixels=RAW, photometric="MONOCHROME2", **tags):
    path = make_dicom(tmp_path / name, pixels, photometric, **tags)
    return read_radiograph(path)


def test_dicom_rescale_then_min_max(tmp_path):
    out = dicom_image(tmp_path, RescaleSlope=2, RescaleIntercept=-100)
    assert_contract(out, RAW.shape)
    modality = RAW * 2.0 - 100
    expected = (modality - modality.min()) / (modality.max() - modality.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 1900, "WindowWidth": 2000}])
def test_monochrome1_is_inverse_of_monochrome2(tmp_path, window):
    tags = {"RescaleSlope": 2, "RescaleIntercept": -100, **window}
    m2 = dicom_image(tmp_path, "m2.dcm", photometric="MONOCHROME2", **tags)
    m1 = dicom_image(tmp_path, "m1.dcm", photometric="MONOCHROME1", **tags)
    assert_contract(m1, RAW.shape)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    # a raw-brighter pixel is displayed darker in MONOCHROME1
    assert m2[1, 1] > m2[0, 1] and m1[1, 1] < m1[0, 1]


def test_negative_slope_flips_order(tmp_path):
    pixels = np.array([[0, 100, 200]], dtype=np.uint16)
    out = dicom_image(tmp_path, pixels=pixels, RescaleSlope=-1, RescaleIntercept=0)
    np.testing.assert_allclose(out, [[1.0, 0.5, 0.0]])


def test_window_saturates_outside_and_is_linear_inside(tmp_path):
    # modality values: [[-100, 900, 1900], [2900, 3900, 7900]]; window 900..2900
    out = dicom_image(
        tmp_path, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1900, WindowWidth=2000
    )
    assert_contract(out, RAW.shape)
    assert out[0, 0] == 0.0 and out[0, 1] == 0.0  # below / at the lower edge
    assert out[1, 1] == 1.0 and out[1, 2] == 1.0  # above the window
    assert out[0, 2] == pytest.approx(0.5, abs=1e-3)
    assert out[1, 0] == pytest.approx(1.0, abs=1e-3)


def test_window_multi_valued_uses_first(tmp_path):
    out = dicom_image(tmp_path, WindowCenter=[1000, 50], WindowWidth=[1000, 10])
    assert out[0, 0] == 0.0 and out[0, 2] == pytest.approx(0.5, abs=1e-3)
    assert out[1, 0] == 1.0


def test_voi_lut_sequence(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", list(range(255, -1, -1)))  # inverting LUT
    pixels = np.array([[0, 100, 255, 1000]], dtype=np.uint16)
    out = dicom_image(tmp_path, pixels=pixels, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(out, [[1.0, 155 / 255, 0.0, 0.0]], atol=1e-6)


def test_signed_pixels(tmp_path):
    pixels = np.array([[-1000, 0], [500, 1000]], dtype=np.int16)
    out = dicom_image(tmp_path, pixels=pixels)
    np.testing.assert_allclose(out, (pixels + 1000) / 2000, atol=1e-6)


def test_rgb_dicom_becomes_gray(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0] = 50
    rgb[1] = 250
    out = dicom_image(tmp_path, pixels=rgb, photometric="RGB")
    assert_contract(out, (2, 3))
    np.testing.assert_allclose(out, [[0, 0, 0], [1, 1, 1]], atol=1e-6)


def test_constant_dicom_gives_zeros(tmp_path):
    out = dicom_image(tmp_path, pixels=np.full((3, 3), 700, dtype=np.uint16))
    assert_contract(out, (3, 3))
    assert not out.any()


def test_dicom_without_suffix_detected_by_magic(tmp_path):
    path = make_dicom(tmp_path / "IM000001.dcm", RAW, suffix="")
    assert path.suffix == "" and path.exists()
    assert is_dicom(path)
    assert_contract(read_radiograph(path), RAW.shape)


def test_is_dicom(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    (tmp_path / "short").write_bytes(b"DICM")
    assert not is_dicom(tmp_path / "a.png")
    assert not is_dicom(tmp_path / "short")
    assert not is_dicom(tmp_path / "missing")
    assert is_dicom(tmp_path / "missing.DCM")  # suffix alone, case-insensitive
    assert ".dicom" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


def test_multiframe_first_frame_with_warning(tmp_path):
    frames = np.stack([RAW, RAW[::-1], RAW[:, ::-1]])
    path = make_dicom(tmp_path / "cine.dcm", frames)
    with pytest.warns(UserWarning, match="cine.dcm.*3 frames"):
        out = read_radiograph(path)
    np.testing.assert_allclose(out, RAW / 4000, atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(RadiographReadError, match="report.dcm.*pixel") as err:
        read_radiograph(path)
    assert "skip" in str(err.value)


def test_compressed_dicom_without_decoder(tmp_path):
    path = make_dicom(tmp_path / "j2k.dcm", RAW)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00" * 32])  # not decodable by any plugin
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(RadiographReadError, match="j2k.dcm.*JPEG 2000") as err:
        read_radiograph(path)
    assert "pip install pylibjpeg" in str(err.value)


def test_read_dicom_header(tmp_path):
    path = make_dicom(tmp_path / "h.dcm", RAW, BodyPartExamined="CHEST", StudyDescription="XR")
    header = read_dicom_header(path)
    assert header["BodyPartExamined"] == "CHEST"
    assert header["StudyDescription"] == "XR"
    assert header["Modality"] == "DX"
    assert header["PatientID"] == "TEST0001"
    assert header["ProtocolName"] == ""
    assert header["SOPInstanceUID"].startswith("1.2.")
    assert all(isinstance(v, str) for v in header.values())


def test_read_dicom_header_rejects_non_dicom(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    with pytest.raises(RadiographReadError, match="a.png"):
        read_dicom_header(tmp_path / "a.png")


# --------------------------------------------------------------------------- bad input


def _truncated_png(path):
    Image.fromarray(gradient(64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:60])


BAD_FILES = {
    "truncated.png": _truncated_png,
    "empty.png": lambda p: p.write_bytes(b""),
    "notes.png": lambda p: p.write_text("this is not an image\n"),
    "garbage.dcm": lambda p: p.write_bytes(b"\x01" * 300),
    "missing.png": lambda p: None,
    "folder.png": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_unreadable_input_raises_naming_the_file(tmp_path, name):
    path = tmp_path / name
    BAD_FILES[name](path)
    with pytest.raises(RadiographReadError, match=name) as err:
        read_radiograph(path)
    assert err.value.path == str(path)
    assert isinstance(err.value, ValueError)


def test_error_messages(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(RadiographReadError, match="file is empty"):
        read_radiograph(tmp_path / "empty.png")
    with pytest.raises(RadiographReadError, match="file not found.*data.root"):
        read_radiograph(tmp_path / "nope.png")
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(RadiographReadError, match="not an image Pillow or pydicom can read"):
        read_radiograph(tmp_path / "t.png")


def test_error_str_format():
    err = RadiographReadError("x.png", "broken", "fix it")
    assert str(err) == "x.png: broken. fix it"
    assert (err.path, err.reason) == ("x.png", "broken")
    assert str(RadiographReadError("x.png", "broken")) == "x.png: broken."
