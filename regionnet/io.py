"""Read radiographs (DICOM, PNG, JPEG, TIFF) into one array convention.

Every reader returns a C-contiguous float32 array of shape (H, W) with values in [0, 1],
in the MONOCHROME2 display convention: 0 is black (no attenuation, e.g. air) and 1 is
white (high attenuation, e.g. bone). MONOCHROME1 DICOMs are inverted to match.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")
HEADER_TAGS = (
    "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "Modality",
    "PhotometricInterpretation", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "PatientID",
)  # fmt: skip
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights
_EIGHT_BIT_MODES = {
    "1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
}  # fmt: skip
_PILLOW_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
)  # fmt: skip
SUPPORTED_FORMATS = ", ".join(IMAGE_EXTENSIONS) + " (DICOM also without suffix)"
_SUPPORTED = "Supported formats: " + SUPPORTED_FORMATS
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class RadiographReadError(ValueError):
    """A radiograph could not be read; ``str()`` is ``"<path>: <reason>. <fix>"``."""

    def __init__(self, path: str | Path, reason: str, fix: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}." + (f" {fix}" if fix else ""))


def is_dicom(path: str | Path) -> bool:
    """True for a .dcm/.dicom suffix or a ``DICM`` magic at byte 128 (suffix-less exports)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_radiograph_file(path: str | Path) -> bool:
    """The one rule for which files are radiographs: a suffix in `IMAGE_EXTENSIONS` (any
    case), or DICOM by its `DICM` magic whatever the name. Folder listings
    (`regionnet.data.files.list_radiographs`) skip other files and `read_radiograph` refuses
    them, so a file listed in a CSV gets the same answer as one found in a folder."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)


def read_radiograph(path: str | Path) -> np.ndarray:
    """Read a radiograph as float32 (H, W) in [0, 1], 0 = black, 1 = white (MONOCHROME2)."""
    path = Path(path)
    _check_file(path)
    if not is_radiograph_file(path):
        what = (
            f"file type {path.suffix!r}" if path.suffix else "a file without suffix or DICM magic"
        )
        raise RadiographReadError(path, f"{what} is not a radiograph format ({_SUPPORTED})")
    arr = _read_dicom(path) if is_dicom(path) else _read_pillow(path)
    return _checked(path, arr)


def dicom_pixels(ds: pydicom.Dataset, name: str) -> np.ndarray:
    """`read_radiograph` for a DICOM dataset already in memory (retrieved over DICOMweb);
    `name` stands for the path in errors."""
    return _checked(name, _dicom_array(ds, name))


def _checked(path: str | Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2 or arr.size == 0:
        raise RadiographReadError(path, f"expected a non-empty 2-D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise RadiographReadError(path, "image contains NaN or infinite values")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def read_dicom_header(path: str | Path) -> dict[str, str]:
    """The region-audit tags of a DICOM file as plain strings (missing tags -> "")."""
    path = Path(path)
    _check_file(path)
    return dataset_header(_dcmread(path, stop_before_pixels=True))


def dataset_header(ds: pydicom.Dataset) -> dict[str, str]:
    """`read_dicom_header` for a DICOM dataset already in memory."""
    return {tag: str(ds.get(tag, "") or "") for tag in HEADER_TAGS}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RadiographReadError(path, "file not found", "check the path / data.root")
    if not path.is_file():
        raise RadiographReadError(path, "not a regular file (directory?)", "pass an image file")
    if path.stat().st_size == 0:
        raise RadiographReadError(path, "file is empty", "re-export or remove the file")


def _dcmread(path: Path, **kwargs) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as exc:
        raise RadiographReadError(path, f"not a valid DICOM file ({exc})", _SUPPORTED) from exc
    except Exception as exc:  # pydicom raises many exception types on corrupt input
        raise RadiographReadError(path, f"corrupt DICOM file ({exc!r})") from exc


def _read_dicom(path: Path) -> np.ndarray:
    return _dicom_array(_dcmread(path), path)


def _dicom_array(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        fix = "It is likely a structured report or presentation state; skip it"
        raise RadiographReadError(path, "DICOM has no pixel data", fix)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated or malformed pixel data
        raise _decode_error(path, ds, exc) from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        _warn_first_frame(path, f"{ds.NumberOfFrames} frames")
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB (pydicom converts YBR to RGB)
        return _normalise(arr.astype(np.float64) @ _LUMA)
    arr = apply_modality_lut(arr, ds)  # RescaleSlope/Intercept or Modality LUT
    if ds.get("VOILUTSequence"):
        out = _normalise(apply_voi_lut(np.rint(arr).astype(np.int64), ds, prefer_lut=True))
    else:
        out = _window(np.asarray(arr, dtype=np.float64), ds)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def _decode_error(path: Path, ds: pydicom.Dataset, exc: Exception) -> RadiographReadError:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = uid is not None and uid.is_compressed
    except ValueError:  # private / unknown transfer syntax
        compressed = True
    if not compressed:
        return RadiographReadError(path, f"cannot decode DICOM pixel data ({exc})")
    fix = (
        "Install a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, "
        "or python-gdcm) or re-export the file uncompressed"
    )
    return RadiographReadError(path, f"cannot decode transfer syntax {uid.name} ({exc})", fix)


def _window(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply WindowCenter/Width (DICOM PS3.3 C.11.2.1.2) into [0, 1]; min-max if absent.

    The window's own output range is mapped to [0, 1] (no re-stretching afterwards), so a
    narrow window saturates to exactly 0 / 1 and a wide one keeps its contrast as intended.
    pydicom's `apply_voi_lut` windows a copy of the VOI attributes whose output range is
    declared [0, 1] (unsigned, BitsStored 1). Multi-valued windows use the first; an unknown
    VOILUTFunction is LINEAR, the standard's default; an invalid width is ignored.
    """
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:  # absent or empty
        return _normalise(arr)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    voi = pydicom.Dataset()
    voi.add(ds["WindowCenter"])
    voi.add(ds["WindowWidth"])
    voi.VOILUTFunction = func if func in _VOI_FUNCTIONS else "LINEAR"
    voi.PhotometricInterpretation = "MONOCHROME2"  # MONOCHROME1 is inverted by the caller
    voi.PixelRepresentation, voi.BitsStored = 0, 1  # output range [0, 2**1 - 1]
    try:
        return apply_voi_lut(np.asarray(arr, dtype=np.float64), voi, prefer_lut=False)
    except ValueError as exc:  # LINEAR width < 1, LINEAR_EXACT or SIGMOID width <= 0
        logger.debug("ignoring the window (%s); using the full range", exc)
        return _normalise(arr)


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                _warn_first_frame(path, f"{im.n_frames} pages")
            im.load()
            im = ImageOps.exif_transpose(im)  # honour camera/scanner orientation tags
            mode = im.mode
            # 8-bit files keep their stored exposure (/255). Deeper files (16-bit containers
            # usually hold 10-14 bit data, float TIFFs arbitrary ranges) are windowed to their
            # own min/max, like DICOM without a VOI window.
            if mode in _EIGHT_BIT_MODES:
                return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
            arr = np.asarray(im, dtype=np.float64)
    except _PILLOW_ERRORS as exc:
        raise RadiographReadError(
            path, f"not an image Pillow or pydicom can read ({exc})", _SUPPORTED
        ) from exc
    if arr.ndim == 3:  # exotic multi-channel deep modes
        arr = arr[..., :3] @ _LUMA if arr.shape[-1] >= 3 else arr[..., 0]
    logger.debug("%s: mode %s min-max normalised", path, mode)
    return _normalise(arr)


def _normalise(arr: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant image becomes zeros (never NaN)."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.size == 0 or not np.isfinite(arr).all():
        return arr  # rejected with a clear message by read_radiograph
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)


def _warn_first_frame(path: Path, what: str) -> None:
    warnings.warn(f"{path}: {what}; using only the first", UserWarning, stacklevel=4)
