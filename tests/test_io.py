"""Tests for regionnet.io: every reader yields float32 (H, W) in [0, 1], MONOCHROME2."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_factory import compress, make_dicom, strip_header
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import regionnet.io
from regionnet.io import (
    IMAGE_EXTENSIONS,
    RadiographReadError,
    dicom_pixels,
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
@pytest.mark.parametrize("top,bits", [(4000, 12), (1000, 10), (200, 8), (16000, 14), (60000, 16)])
def test_16bit_is_divided_by_the_smallest_depth_that_holds_it(tmp_path, suffix, top, bits):
    """16-bit files declare no bit depth: the smallest of 8..16 bits holding the brightest
    value (12-bit data saved raw reads as v / 4095, like its DICOM). Not stretched."""
    pixels = np.linspace(top // 4, top, 6 * 7).reshape(6, 7).astype(np.uint16)
    im = Image.fromarray(pixels)
    assert im.mode.startswith("I;16")
    im.save(tmp_path / f"a{suffix}")
    out = read_radiograph(tmp_path / f"a{suffix}")
    assert_contract(out, pixels.shape)
    assert np.all(np.diff(out.ravel()) > 0)
    np.testing.assert_allclose(out, pixels / (2**bits - 1), atol=1e-6)


def test_constant_16bit_keeps_its_value(tmp_path):
    Image.fromarray(np.full((4, 4), 1234, dtype=np.uint16)).save(tmp_path / "c.png")
    out = read_radiograph(tmp_path / "c.png")
    assert_contract(out, (4, 4))
    np.testing.assert_allclose(out, 1234 / 4095)


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


def test_dicom_without_window_is_divided_by_its_bits_stored(tmp_path):
    """No window: v / (2**BitsStored - 1), whatever the rescale (a positive slope maps the
    stored range onto the modality range linearly); never stretched to the image's min-max."""
    plain = dicom_image(tmp_path, "plain.dcm")
    rescaled = dicom_image(tmp_path, "rescaled.dcm", RescaleSlope=2, RescaleIntercept=-100)
    assert_contract(rescaled, RAW.shape)
    np.testing.assert_allclose(plain, RAW / 4095, atol=1e-6)
    np.testing.assert_array_equal(rescaled, plain)
    ten = dicom_image(tmp_path, "ten.dcm", pixels=RAW // 4, BitsStored=10)
    np.testing.assert_allclose(ten, (RAW // 4) / 1023, atol=1e-6)


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
    np.testing.assert_allclose(out, 1 - pixels / 4095, atol=1e-6)


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
    out = dicom_image(tmp_path, pixels=pixels)  # BitsStored 16, signed: -32768..32767
    np.testing.assert_allclose(out, (pixels + 32768.0) / 65535, atol=1e-6)


def test_rgb_dicom_becomes_gray_like_an_rgb_png(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0] = 50
    rgb[1] = [250, 10, 90]
    out = dicom_image(tmp_path, pixels=rgb, photometric="RGB")
    assert_contract(out, (2, 3))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(out, read_radiograph(tmp_path / "rgb.png"))
    assert out[0, 0] == pytest.approx(50 / 255)


def test_constant_dicom_keeps_its_value(tmp_path):
    out = dicom_image(tmp_path, pixels=np.full((3, 3), 700, dtype=np.uint16))
    assert_contract(out, (3, 3))
    np.testing.assert_allclose(out, 700 / 4095)


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
    np.testing.assert_allclose(out, RAW / 4095, atol=1e-6)


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
    assert "python-gdcm" in str(err.value)


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


# --------------------------------------------------------------------------- compressed DICOM


def pydicom_file(name: str) -> str:
    """A pydicom test file: pydicom's own, or pydicom-data's (inside its wheel; never
    downloaded here)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} needs pydicom-data (pip install -e '.[dev]')")
    return path


@pytest.fixture(scope="module")
def real_cr(tmp_path_factory):
    """A 320 x 288 crop of pydicom-data's RG3 (a real CR of a distal tibia: MONOCHROME1,
    BitsStored 10, window 550/1024), uncompressed, and its uncompressed read."""
    ds = pydicom.dcmread(pydicom_file("RG3_UNCR.dcm"))
    crop = np.ascontiguousarray(ds.pixel_array[700:1020, 700:988])
    ds.PixelData = crop.tobytes()
    ds.Rows, ds.Columns = crop.shape
    path = tmp_path_factory.mktemp("cr") / "rg3.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, read_radiograph(path)


LOSSLESS = [
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless,
    DeflatedExplicitVRLittleEndian,
]  # fmt: skip


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda u: u.keyword)
def test_every_lossless_syntax_decodes_a_real_cr_exactly(real_cr, syntax):
    path, expected = real_cr
    assert np.ptp(expected) > 0.5  # a real film, its window applied, not a flat crop
    out = read_radiograph(compress(path, syntax))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "syntax,tolerance", [(JPEGLSNearLossless, 0.01), (JPEG2000, 0.01), (JPEGExtended12Bit, 0.02)]
)
def test_lossy_syntaxes_decode_a_real_cr(real_cr, syntax, tolerance):
    path, expected = real_cr
    out = read_radiograph(compress(path, syntax))
    assert np.abs(out - expected).mean() < tolerance


@pytest.mark.parametrize("name", ["RG3", "RG1"])
def test_pydicom_data_jpeg2000_films_match_their_uncompressed_originals(name):
    """Real CR films (RG3 a distal tibia, 10 bits; RG1 a chest, 15 bits), as shipped."""
    np.testing.assert_array_equal(
        read_radiograph(pydicom_file(f"{name}_J2KR.dcm")),
        read_radiograph(pydicom_file(f"{name}_UNCR.dcm")),
    )


def test_pydicom_compressed_fixtures_decode():
    """Files from other encoders than GDCM: JPEG Lossless (.70, 8 and 16 bits), 12-bit JPEG
    Extended (.51, by GDCM through regionnet.io: pydicom's plugin refuses it), JPEG-LS
    near-lossless (.81), JPEG 2000 (.91), deflate."""
    for name in ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEGLSNearLossless_16.dcm"]:
        assert_contract(read_radiograph(pydicom_file(name)))
    assert_contract(read_radiograph(pydicom_file("JPEG2000.dcm")), (1024, 256))
    assert_contract(read_radiograph(pydicom_file("image_dfl.dcm")), (512, 512))
    jpeg12 = read_radiograph(pydicom_file("JPGExtended.dcm"))
    assert_contract(jpeg12, (1024, 256))
    # pixel values pydicom's own tests check for this file, here over BitsStored 12
    assert jpeg12[420, 140] * 4095 == pytest.approx(244, abs=1e-3)
    assert jpeg12[230, 120] * 4095 == pytest.approx(95, abs=1e-3)


@pytest.mark.parametrize(
    "name",
    ["emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"],
)
def test_multiframe_compressed_first_frame_equals_the_uncompressed_file(name):
    with pytest.warns(UserWarning, match="10 frames"):
        expected = read_radiograph(pydicom_file("emri_small.dcm"))
    with pytest.warns(UserWarning, match="10 frames"):
        np.testing.assert_array_equal(read_radiograph(pydicom_file(name)), expected)


# --------------------------------------------------------------------------- no preamble


@pytest.mark.parametrize("implicit", [True, False])
def test_dicom_without_preamble_and_file_meta_is_read(tmp_path, implicit):
    src = make_dicom(tmp_path / "src.dcm", RAW, WindowCenter=2000, WindowWidth=4000)
    bare = strip_header(src, tmp_path / "BARE", implicit_vr=implicit)  # no suffix either
    assert is_dicom(bare)
    np.testing.assert_array_equal(read_radiograph(bare), read_radiograph(src))
    assert read_dicom_header(bare)["PatientID"] == "TEST0001"


def test_pydicom_files_without_meta_are_dicom_without_pixels():
    for name in ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"]:
        with pytest.raises(RadiographReadError, match="no pixel data"):
            read_radiograph(pydicom_file(name))


def test_headerless_detection_does_not_take_other_files(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "a.png")
    (tmp_path / "notes").write_text("not DICOM, just text that is long enough\n" * 4)
    (tmp_path / "zeros").write_bytes(b"\0" * 300)
    (tmp_path / "png_renamed").write_bytes((tmp_path / "a.png").read_bytes())
    for name in ["notes", "zeros", "png_renamed"]:
        assert not is_dicom(tmp_path / name)


# --------------------------------------------------------------------------- size limit


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(gradient(16, 24)).save(tmp_path / "a.png")
    dcm = make_dicom(tmp_path / "a.dcm", RAW)  # 2 x 3
    cine = make_dicom(tmp_path / "cine.dcm", np.stack([RAW] * 4))  # 2 x 3 x 4 frames
    with pytest.raises(RadiographReadError, match=r"16 x 24 = 384 pixels .* limit of 100"):
        read_radiograph(tmp_path / "a.png", max_pixels=100)
    with pytest.raises(RadiographReadError, match=r"2 x 3 x 4 frames = 24 pixels"):
        read_radiograph(cine, max_pixels=20)
    with pytest.warns(UserWarning, match="4 frames"):
        assert_contract(read_radiograph(cine, max_pixels=24))
    with pytest.raises(RadiographReadError, match="REGIONNET_MAX_PIXELS"):
        dicom_pixels(pydicom.dcmread(dcm), "retrieved", max_pixels=5)
    monkeypatch.setattr(regionnet.io, "MAX_PIXELS", 5)  # what REGIONNET_MAX_PIXELS sets
    with pytest.raises(RadiographReadError, match="limit of 5 pixels"):
        read_radiograph(dcm)
    assert_contract(read_radiograph(dcm, max_pixels=0))  # 0: no limit


def test_pixel_limit_becomes_an_error_sample_in_batch_jobs(tmp_path, monkeypatch):
    from regionnet.data.dataset import RadiographDataset

    big = make_dicom(tmp_path / "big.dcm", np.zeros((40, 40), np.uint16))
    small = make_dicom(tmp_path / "small.dcm", RAW)
    monkeypatch.setattr(regionnet.io, "MAX_PIXELS", 100)
    data = RadiographDataset(pd.DataFrame({"path": [str(big), str(small)]}), [], lambda x: x)
    assert "over the limit" in data[0]["error"]
    assert data[1]["image"].shape == (1, *RAW.shape)


def test_deflated_bomb_is_refused_without_inflating_it(tmp_path):
    """A small deflated file whose image inflates to 32 MB: refused after reading its header
    (at most a few MB inflated), not after inflating everything."""
    src = make_dicom(tmp_path / "big.dcm", np.zeros((4000, 4000), np.uint16))
    bomb = compress(src, DeflatedExplicitVRLittleEndian)
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    with pytest.raises(RadiographReadError, match=r"4000 x 4000 = 16,000,000 pixels"):
        read_radiograph(bomb, max_pixels=1_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12_000_000
    np.testing.assert_array_equal(read_radiograph(bomb, max_pixels=0), read_radiograph(src))


def test_deflated_file_that_inflates_past_its_header_is_refused(tmp_path):
    src = make_dicom(tmp_path / "a.dcm", np.zeros((4000, 4000), np.uint16))  # 32 MB
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = 20, 20  # the header promises 800 bytes of pixels
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "liar.dcm", enforce_file_format=True)
    with pytest.raises(RadiographReadError, match="inflates to more than"):
        read_radiograph(tmp_path / "liar.dcm", max_pixels=1000)


# --------------------------------------------------------------------------- DICOM folders


def test_read_dicom_header_reads_only_the_tags_asked(tmp_path):
    path = make_dicom(tmp_path / "h.dcm", RAW, PatientID="P-7", BodyPartExamined="KNEE")
    header = read_dicom_header(path, ("PatientID", "StudyInstanceUID"))
    assert set(header) == {"PatientID", "StudyInstanceUID"}
    assert header["PatientID"] == "P-7" and header["StudyInstanceUID"].startswith("1.2.")


def test_folder_source_groups_dicom_by_patient_then_study(tmp_path):
    from regionnet.data.sources import folder_records

    root = tmp_path / "hospital"
    (root / "knee").mkdir(parents=True)
    (root / "hand").mkdir()
    make_dicom(root / "knee" / "a.dcm", RAW, PatientID="P1", StudyInstanceUID="1.2.3")
    make_dicom(root / "knee" / "b", RAW, suffix="", PatientID="P1", StudyInstanceUID="1.2.4")
    make_dicom(root / "hand" / "c.dcm", RAW, PatientID="P2", StudyInstanceUID="1.2.5")
    make_dicom(root / "hand" / "d.dcm", RAW, PatientID="", StudyInstanceUID="1.2.6")
    make_dicom(root / "hand" / "e.dcm", RAW, PatientID="", StudyInstanceUID="1.2.6")
    Image.fromarray(gradient()).save(root / "hand" / "f.png")
    df = folder_records(root, ("hand", "knee"))
    names = {Path(row["path"]).name: row for _, row in df.iterrows()}
    assert names["a.dcm"]["patient_id"] == names["b"]["patient_id"] == "P1"
    assert names["c.dcm"]["patient_id"] == "P2"
    assert names["d.dcm"]["patient_id"] == names["e.dcm"]["patient_id"] == "study:1.2.6"
    assert names["f.png"]["patient_id"] == str((root / "hand" / "f.png").resolve())
    assert names["a.dcm"]["study_id"] == "1.2.3" and names["f.png"]["study_id"] == ""
