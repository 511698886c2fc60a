"""Read radiographs (DICOM, PNG, JPEG, TIFF) into one array convention.

Every reader returns a C-contiguous float32 array of shape (H, W) with values in [0, 1],
in the MONOCHROME2 display convention: 0 is black (no attenuation, e.g. air) and 1 is
white (high attenuation, e.g. bone). MONOCHROME1 DICOMs are inverted to match.

Intensity rule (`INTENSITY`, recorded in every checkpoint as `hparams.intensity`): the same
pixels give the same array whatever the container (PNG, TIFF, JPEG, DICOM, an array in memory).

1. A display window stored with the image wins. A DICOM VOI LUT Sequence is applied and its
   output scaled from the LUT's lowest to its highest entry; otherwise WindowCenter/WindowWidth
   (the first of several; LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2) maps onto [0, 1].
   Both act on the modality values (RescaleSlope/Intercept or the Modality LUT Sequence).
2. Without a window, the stored values are divided by the full scale of their bit depth b:
   v / (2**b - 1), or (v + 2**(b-1)) / (2**b - 1) for signed values. b is 8 for 8-bit files
   (PNG, JPEG, TIFF, colour converted to luma) and uint8 arrays; BitsStored for DICOM (a
   negative RescaleSlope inverts; a Modality LUT Sequence is scaled by its entries' range);
   for files and arrays that do not declare it (16-/32-bit PNG and TIFF, deeper integer
   arrays), the smallest of 8, 10, 12, 14, 16, 32 bits that holds the brightest value, so 12-bit
   data saved raw in a 16-bit PNG reads like the 12-bit DICOM it came from.
   Float files carry no scale: taken as they are when inside [0, 1], else min-max scaled.
3. MONOCHROME1 is inverted (1 - y); colour becomes luma (ITU-R BT.601, as Pillow's "L").

Why this rule: training data is unchanged, so existing checkpoints keep working: every shared
film is an 8-bit PNG or JPEG, read as v / 255 before and after (bit-identical, all 6,331). The
container becomes irrelevant: 8-bit v, 16-bit 257 v and a DICOM of the same pixels read
bit-identically (tests/test_intensity.py). It does not depend on the image: the old min-max
stretch of windowless 8-bit DICOM turned radoss_ddh_jordan/pelvis/331_DDH_116.png (pixels
0-149) from pelvis 0.98 into knee 0.97; a percentile window (0.5-99.5 %) would change 81 % of
300 shared films by more than 0.1 (median 0.21) and need retraining. The cost: a deep file
without a window that uses a small part of its declared range reads dark (a viewer would
auto-window it); give such files a window (WindowCenter/WindowWidth), or re-export them.

Size limit: every reader refuses a file whose header declares more than `MAX_PIXELS` pixels
(Rows x Columns x NumberOfFrames for DICOM, width x height for PNG/JPEG/TIFF), before decoding:
a small compressed file can inflate to gigabytes. The default is `DEFAULT_MAX_PIXELS`; set the
environment variable `REGIONNET_MAX_PIXELS` (0: no limit; read at import, so data loader
workers and subprocesses see it too), assign `regionnet.io.MAX_PIXELS`, or pass `max_pixels=`.
Decoding keeps one frame and works in float32: a 6000 x 6000 16-bit DICOM peaks at about 8
bytes per pixel (raw bytes included; 10 deflated), where the float64 steps before took 20.

Reduced-size reads (`read_radiograph(path, target=S)`, for callers that resize the longest
side to S with `transforms.resize_pad(S)`: predict, the Python API). A larger image comes back
at exactly the size `resize_pad(S)` gives it (its arithmetic, torchvision's antialiased
bilinear filter, which is a port of Pillow's), so the transform's resize has nothing left to
do; a smaller one as it is (never upsampled). Same intensity rule; the cheap work first:
JPEG files and grey JPEG Baseline DICOMs are decoded at 1/2, 1/4 or 1/8 by libjpeg's DCT
scaling (Pillow `draft`), grey JPEG 2000 DICOMs at a lower wavelet resolution level (Pillow's
OpenJPEG `reduce`; pylibjpeg-openjpeg 2.x has no such option), and the rest is decoded in
full and resized, in float32, before anything else: 8-bit grey and luma (converted in 8
bits, as before), deep PNG/TIFF, and DICOM (rounded back to its integers, which its LUTs
index) before the modality/VOI step. Rule 2 takes the full image's extremes where it was
decoded in full, the stored range clipped to BitsStored after a reduced JPEG 2000 decode.
After `resize_pad(S)`
PNGs agree with the full read to float rounding, DICOMs to integer rounding, reduced JPEG and
JPEG 2000 decodes to about 0.001-0.004 on average (tests/test_decode.py). PNG and
uncompressed DICOM gain little: inflating and unfiltering (PNG) stay the floor of their
time, and Pillow's resize costs what torchvision's did (regionnet.bench.decode).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

logger = logging.getLogger(__name__)

INTENSITY = "bit_depth"  # the rule above; module.RegionNet records it in checkpoints
DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000; the largest detectors are ~4,300 x 4,300
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")
HEADER_TAGS = (
    "BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName", "Modality",
    "PhotometricInterpretation", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "PatientID",
)  # fmt: skip
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance weights
_EIGHT_BIT_MODES = {
    "1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
}  # fmt: skip
_PILLOW_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
)  # fmt: skip
SUPPORTED_FORMATS = ", ".join(IMAGE_EXTENSIONS) + " (DICOM also without suffix)"
_SUPPORTED = "Supported formats: " + SUPPORTED_FORMATS
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_DEPTHS = (8, 10, 12, 14, 16, 32, 64)  # bit depths tried for data that does not declare one
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_DEFER = 1 << 20  # DICOM values above 1 MiB (the pixel data) stay on disk until decoded
_DEFLATE_HEADER = 4 << 20  # inflated bytes read to find a deflated file's image size
_ORIENTATION = 0x0112  # the EXIF orientation tag
_DECODER_FIX = (
    "The decoders come with regionnet (python-gdcm, pylibjpeg-openjpeg, pylibjpeg-rle); "
    "reinstall it (pip install -e .) or re-export the file uncompressed"
)


def _env_max_pixels() -> int:
    value = os.environ.get("REGIONNET_MAX_PIXELS", "").strip()
    try:
        return int(float(value)) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        logger.warning(
            "REGIONNET_MAX_PIXELS=%r is not a number; using %d", value, DEFAULT_MAX_PIXELS
        )
        return DEFAULT_MAX_PIXELS


MAX_PIXELS: int = _env_max_pixels()  # 0 or less: no limit


class RadiographReadError(ValueError):
    """A radiograph could not be read; ``str()`` is ``"<path>: <reason>. <fix>"``."""

    def __init__(self, path: str | Path, reason: str, fix: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path}: {reason}." + (f" {fix}" if fix else ""))


def is_dicom(path: str | Path) -> bool:
    """True for a .dcm/.dicom suffix, a ``DICM`` magic at byte 128 (suffix-less exports), or a
    data set written without preamble and file meta that starts with a group 0002 or 0008
    element (what dicomweb-client's `store_instances` and some PACS exports write)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:] == b"DICM" or _headerless_dicom(head)


def _headerless_dicom(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) opens a DICOM data set without preamble: a group
    0002 or 0008 tag, then a known VR (explicit VR, little or big endian) or a short, even
    value length (implicit VR little endian)."""
    if len(head) < 8:
        return False
    if head[:2] in (b"\x02\x00", b"\x08\x00"):
        if head[4:6] in _VRS:
            return True
        length = int.from_bytes(head[4:8], "little")
        return length == 0xFFFFFFFF or (length < 0x1000 and length % 2 == 0)
    return head[:2] in (b"\x00\x02", b"\x00\x08") and head[4:6] in _VRS


def is_radiograph_file(path: str | Path) -> bool:
    """The one rule for which files are radiographs: a suffix in `IMAGE_EXTENSIONS` (any
    case), or DICOM by its content whatever the name (`is_dicom`). Folder listings
    (`regionnet.data.files.list_radiographs`) skip other files and `read_radiograph` refuses
    them, so a file listed in a CSV gets the same answer as one found in a folder."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)


def read_radiograph(
    path: str | Path, *, max_pixels: int | None = None, target: int | None = None
) -> np.ndarray:
    """Read a radiograph as float32 (H, W) in [0, 1], 0 = black, 1 = white (MONOCHROME2), by
    the intensity rule of the module docstring. `max_pixels`: the size limit (default
    `MAX_PIXELS`; 0 = none). `target`: the longest side the caller resizes to (the model's
    `image_size`); the file is then decoded or reduced to a longest side between `target` and
    about twice that where it is larger (module docstring). None: full size."""
    path = Path(path)
    _check_file(path)
    if not is_radiograph_file(path):
        what = (
            f"file type {path.suffix!r}" if path.suffix else "a file without suffix or DICM magic"
        )
        raise RadiographReadError(path, f"{what} is not a radiograph format ({_SUPPORTED})")
    limit = _limit(max_pixels)
    if is_dicom(path):
        arr = _dicom_array(_dcmread(path, pixels=True, limit=limit), path, limit, target)
    else:
        arr = _read_pillow(path, limit, target)
    return _checked(path, arr)


def dicom_pixels(
    ds: pydicom.Dataset, name: str, *, max_pixels: int | None = None, target: int | None = None
) -> np.ndarray:
    """`read_radiograph` for a DICOM dataset already in memory (retrieved over DICOMweb);
    `name` stands for the path in errors."""
    return _checked(name, _dicom_array(ds, name, _limit(max_pixels), target))


def integer_pixels(arr: np.ndarray) -> np.ndarray:
    """Integer pixels that declare no bit depth (a 16-bit PNG, an array in memory) as float32
    in [0, 1]: divided by the full scale of the smallest of 8, 10, 12, 14, 16, 32, 64 bits that
    holds them (signed when any value is negative). uint8 is therefore v / 255."""
    if arr.size == 0:
        return arr.astype(np.float32)
    return _integer_scale(arr, int(arr.min()), int(arr.max()))


def _integer_scale(arr: np.ndarray, lo_value: int, hi_value: int) -> np.ndarray:
    """`integer_pixels` with the extremes given (those of the full image, for a reduced one)."""
    lo, hi = _full_scale(lo_value, hi_value)
    return _scale(arr, lo, hi)


def _checked(path: str | Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2 or arr.size == 0:
        raise RadiographReadError(path, f"expected a non-empty 2-D image, got shape {arr.shape}")
    if not (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # NaN and inf propagate
        raise RadiographReadError(path, "image contains NaN or infinite values")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, dtype=np.float32, order="C")
    return np.clip(arr, 0.0, 1.0, out=arr)


def read_dicom_header(path: str | Path, tags: Sequence[str] = HEADER_TAGS) -> dict[str, str]:
    """The `tags` (default: the region-audit tags) of a DICOM file as plain strings (missing
    tags -> ""), reading nothing but those elements of the header."""
    path = Path(path)
    _check_file(path)
    return dataset_header(_dcmread(path, specific_tags=list(tags)), tags)


def dataset_header(ds: pydicom.Dataset, tags: Sequence[str] = HEADER_TAGS) -> dict[str, str]:
    """`read_dicom_header` for a DICOM dataset already in memory."""
    return {tag: str(ds.get(tag, "") or "") for tag in tags}


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RadiographReadError(path, "file not found", "check the path / data.root")
    if not path.is_file():
        raise RadiographReadError(path, "not a regular file (directory?)", "pass an image file")
    if path.stat().st_size == 0:
        raise RadiographReadError(path, "file is empty", "re-export or remove the file")
    if not os.access(path, os.R_OK):
        raise RadiographReadError(path, "permission denied", "make the file readable")


def _limit(max_pixels: int | None) -> int:
    return int(MAX_PIXELS if max_pixels is None else max_pixels)


def _check_size(path: str | Path, pixels: int, what: str, limit: int) -> None:
    if limit > 0 and pixels > limit:
        raise RadiographReadError(
            path,
            f"image of {what} = {pixels:,} pixels is over the limit of {limit:,} pixels",
            "If the file is genuine, raise the limit: REGIONNET_MAX_PIXELS=N (0: none)",
        )


# --------------------------------------------------------------------------- DICOM files


def _dcmread(path: Path, pixels: bool = False, limit: int = 0, **kwargs) -> pydicom.Dataset:
    """The data set of a DICOM file: the header only, or (`pixels`) with the pixel data left
    on disk until decoded. A data set without preamble and file meta is read with
    `force=True` when its first bytes are DICOM; a deflated one is inflated within `limit`."""
    if pixels:
        kwargs["defer_size"] = _DEFER
    else:
        kwargs["stop_before_pixels"] = True
    try:
        try:
            if pixels and _deflated(path):
                return _read_deflated(path, limit)
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            with path.open("rb") as fh:
                if not _headerless_dicom(fh.read(8)):
                    raise
            return _with_syntax(pydicom.dcmread(path, force=True, **kwargs))
    except RadiographReadError:
        raise
    except InvalidDicomError as exc:
        raise RadiographReadError(path, f"not a valid DICOM file ({exc})", _SUPPORTED) from exc
    except PermissionError as exc:
        raise RadiographReadError(path, "permission denied", "make the file readable") from exc
    except Exception as exc:  # pydicom raises many exception types on corrupt input
        raise RadiographReadError(path, f"corrupt DICOM file ({exc!r})") from exc


def _with_syntax(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A data set read without file meta gets the transfer syntax pydicom parsed it with, so
    its (native) pixel data can be decoded."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if little is not None:
            meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
    return ds


def _deflated(path: Path) -> bool:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # no preamble / file meta: not deflated, or dcmread says what is wrong
        return False
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def _read_deflated(path: Path, limit: int) -> pydicom.Dataset:
    """A Deflated Explicit VR Little Endian file, inflated in two steps (pydicom inflates the
    whole file at once): the first `_DEFLATE_HEADER` bytes for the image size, checked against
    `limit`, then the rest, never more than the header promised. The data set comes back with
    Explicit VR Little Endian as its transfer syntax (what it is once inflated)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    if "FileMetaInformationGroupLength" not in meta:
        raise RadiographReadError(path, "deflated DICOM without a file meta group length")
    with path.open("rb") as fh:
        fh.seek(132 + 12 + int(meta.FileMetaInformationGroupLength))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(fh.read(), _DEFLATE_HEADER)
    tail = inflater.unconsumed_tail
    if tail:
        header = pydicom.dcmread(BytesIO(data), force=True, stop_before_pixels=True)
        rows, cols, frames = _image_size(header)
        _check_size(path, rows * cols * frames, _size_text(rows, cols, frames), limit)
        per_pixel = max(1, int(header.get("BitsAllocated", 16) or 16) // 8)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        room = rows * cols * frames * per_pixel * samples + _DEFLATE_HEADER
        data += inflater.decompress(tail, room if limit > 0 else 0)
        if limit > 0 and inflater.unconsumed_tail:
            raise RadiographReadError(
                path, f"deflated data set inflates to more than its {room:,}-byte image"
            )
    ds = pydicom.dcmread(BytesIO(data), force=True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _image_size(ds: pydicom.Dataset) -> tuple[int, int, int]:
    rows, cols = (int(ds.get(tag) or 0) for tag in ("Rows", "Columns"))
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    return rows, cols, frames


def _size_text(rows: int, cols: int, frames: int) -> str:
    return f"{rows} x {cols}" + (f" x {frames} frames" if frames > 1 else "")


def _dicom_array(
    ds: pydicom.Dataset, path: str | Path, limit: int, target: int | None = None
) -> np.ndarray:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        fix = "It is likely a structured report or presentation state; skip it"
        raise RadiographReadError(path, "DICOM has no pixel data", fix)
    rows, cols, frames = _image_size(ds)
    _check_size(path, rows * cols * frames, _size_text(rows, cols, frames), limit)
    _with_syntax(ds)
    reduced = _reduced_frame(ds, max(rows, cols), target) if target else None
    arr, scale = reduced or (None, 1.0)
    if arr is None:
        try:
            arr = _first_frame(ds)
        except Exception as exc:  # missing decoder plugin, truncated or malformed pixel data
            raise _decode_error(path, ds, exc) from exc
    if frames > 1:
        _warn_first_frame(path, f"{frames} frames")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # indices are not averaged: colours are
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB (pydicom converts YBR to RGB)
        return _luma(_fit_array(arr, (cols, rows), scale, target, integer=True))
    extremes = None  # rule 2 takes the full image's extremes, not the reduced one's
    if target and scale == 1.0 and arr.dtype.kind in "iu" and max(arr.shape) > target:
        extremes = int(arr.min()), int(arr.max())
    out = _grey(_fit_array(arr, (cols, rows), scale, target, integer=True), ds, extremes)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    return out


def _first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame only (a multi-frame file decodes one frame, not all)."""
    try:
        return pixel_array(ds, index=0)
    except Exception:
        arr = _gdcm_jpeg12(ds)
        if arr is None:
            raise
        return arr


def _reduced_frame(
    ds: pydicom.Dataset, longest: int, target: int
) -> tuple[np.ndarray, float] | None:
    """The first frame of a grey JPEG Baseline (8-bit, DCT scaling) or JPEG 2000 (a lower
    resolution level) DICOM decoded at a reduced size whose longest side stays >= `target`,
    with its scale (2, 4, 8: original pixels per decoded pixel); None where that does not
    apply or fails (the full decode then says what is wrong)."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid not in (JPEGBaseline8Bit, JPEG2000Lossless, JPEG2000) or longest < 2 * target:
        return None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0):
        return None
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=_image_size(ds)[2])
        if uid == JPEGBaseline8Bit:
            return _jpeg_draft(frame, target)
        return _j2k_reduced(frame, target, int(ds.get("BitsStored") or 16))
    except Exception as exc:  # the full decode tries again and names the problem
        logger.debug("reduced decode failed (%s); decoding in full", exc)
        return None


def _jpeg_draft(data: bytes, target: int) -> tuple[np.ndarray, float] | None:
    with Image.open(BytesIO(data)) as im:
        if im.format != "JPEG" or im.mode != "L":
            return None
        scale = _draft(im, target)
        im.load()
        return np.asarray(im), scale


def _j2k_reduced(data: bytes, target: int, bits: int) -> tuple[np.ndarray, float] | None:
    """A JPEG 2000 codestream at the lowest resolution level whose longest side is >= target
    (at most its number of decomposition levels), unsigned grey only, clipped to `bits` bits:
    the low-pass band rings past the stored range at hard edges (burned-in text). Pillow
    scales deep samples up to 16 bits; the shift is undone, so values are the stored ones."""
    levels, precision, signed = _j2k_header(data)
    with Image.open(BytesIO(data)) as im:
        if im.mode not in ("L", "I;16") or signed or not levels:
            return None
        reduce = 0
        for r in range(1, levels + 1):
            if -(-max(im.size) // (1 << r)) < target:
                break
            if all((n + (1 << r >> 1)) >> r == -(-n // (1 << r)) for n in im.size):
                reduce = r  # Pillow sizes its buffer by rounding, OpenJPEG by ceiling
        if not reduce:
            return None
        im.reduce = reduce  # Jpeg2KImageFile: resolution levels to discard, set before load
        im.load()
        arr = np.asarray(im)
    if arr.dtype != np.uint8 and precision < 16:
        arr = arr >> (16 - precision)
    top = (1 << min(bits, precision, arr.dtype.itemsize * 8)) - 1
    return np.minimum(arr, top, dtype=arr.dtype), float(1 << reduce)


def _j2k_header(data: bytes) -> tuple[int | None, int, bool]:
    """(decomposition levels of the COD marker, precision, signed) of the first component
    of a JPEG 2000 codestream's main header; levels None without a COD marker."""
    if data[:4] != b"\xff\x4f\xff\x51":
        return None, 0, False
    ssiz = data[4 + 38]  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
    precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
    pos = 2
    while pos + 4 <= len(data):
        marker, length = data[pos : pos + 2], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == b"\xff\x52":  # COD: Lcod Scod SGcod(4) then SPcod's levels
            return data[pos + 9], precision, signed
        if marker == b"\xff\x90":  # SOT: the main header is over
            break
        pos += 2 + length
    return None, precision, signed


def _gdcm_jpeg12(ds: pydicom.Dataset) -> np.ndarray | None:
    """JPEG Extended with 12-bit samples (1.2.840.10008.1.2.4.51) through GDCM, whose pydicom
    plugin refuses it: pylibjpeg-libjpeg, the other decoder, is GPL. None where it does not
    apply (another transfer syntax, colour, no GDCM)."""
    meta = getattr(ds, "file_meta", None)
    bits = int(ds.get("BitsStored", 8) or 8)
    if meta is None or meta.get("TransferSyntaxUID") != JPEGExtended12Bit or bits <= 8:
        return None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    try:
        import gdcm
    except ImportError:
        return None
    rows, cols, frames = _image_size(ds)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=frames))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    # the pixel format first: GDCM then picks its 12-bit JPEG codec at once, without trying
    # (and printing an error from) the 8-bit one
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, signed))
    image.SetPhotometricInterpretation(
        gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2)
    )
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    image.SetDataElement(element)
    buffer = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM returns str
    if len(buffer) != rows * cols * 2:
        raise ValueError(f"GDCM decoded {len(buffer)} bytes for a {rows} x {cols} 16-bit frame")
    return np.frombuffer(buffer, dtype="<i2" if signed else "<u2").reshape(rows, cols)


def _decode_error(path: str | Path, ds: pydicom.Dataset, exc: Exception) -> RadiographReadError:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = uid is not None and uid.is_compressed
    except ValueError:  # private / unknown transfer syntax
        compressed = True
    if not compressed:
        return RadiographReadError(path, f"cannot decode DICOM pixel data ({exc})")
    return RadiographReadError(
        path, f"cannot decode transfer syntax {uid.name} ({exc})", _DECODER_FIX
    )


def _grey(
    arr: np.ndarray, ds: pydicom.Dataset, extremes: tuple[int, int] | None = None
) -> np.ndarray:
    """Stored grey values -> [0, 1] by the intensity rule (MONOCHROME1 not yet inverted).
    `extremes`: the lowest and highest stored value of the full image when `arr` is reduced."""
    voi_lut = bool(ds.get("VOILUTSequence"))
    window = None if voi_lut else _window_of(ds)
    if not voi_lut and window is None:
        return _stored_range(arr, ds, extremes)
    values = _modality(arr, ds)
    if voi_lut:
        if values.dtype.kind == "f":
            values = np.rint(values).astype(np.int64)
        lo, hi = _lut_range(apply_voi, ds, ds.VOILUTSequence[0])
        return _scale(apply_voi(values, ds), lo, hi)
    return _apply_window(values, *window)


def _stored_range(
    arr: np.ndarray, ds: pydicom.Dataset, extremes: tuple[int, int] | None = None
) -> np.ndarray:
    """Rule 2 for DICOM: v / (2**BitsStored - 1) (signed: from -2**(b-1)); the data's own bit
    depth where values lie outside BitsStored (a malformed header)."""
    if arr.dtype.kind == "f":
        return _float_pixels(arr)
    if ds.get("ModalityLUTSequence"):
        lo, hi = _lut_range(apply_modality_lut, ds, ds.ModalityLUTSequence[0])
        return _scale(apply_modality_lut(arr, ds), lo, hi)
    bits = int(ds.get("BitsStored") or 0)
    bits = min(bits, arr.dtype.itemsize * 8) if bits > 0 else arr.dtype.itemsize * 8
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    amin, amax = extremes or (int(arr.min()), int(arr.max()))
    if amin < lo or amax > hi:
        logger.debug("pixel values %d..%d outside BitsStored %d", amin, amax, bits)
        lo, hi = _full_scale(amin, amax)
    out = _scale(arr, lo, hi)
    if _rescale(ds)[0] < 0:  # a negative slope inverts the modality values
        np.subtract(1.0, out, out=out)
    return out


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    """(slope, intercept); like pydicom, only when both are present."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        return 1.0, 0.0
    return float(slope), float(intercept)


def _modality(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality values (PS3.3 C.11.1): the Modality LUT, or the rescale in float32."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)
    slope, intercept = _rescale(ds)
    if (slope, intercept) == (1.0, 0.0) and arr.dtype.kind in "iu":
        return arr
    out = arr.astype(np.float64 if arr.dtype.itemsize > 2 else np.float32)
    if slope != 1.0:
        out *= slope
    if intercept:
        out += intercept
    return out


def _lut_range(apply, ds: pydicom.Dataset, item: pydicom.Dataset) -> tuple[int, int]:
    """The lowest and highest output of a Modality or VOI LUT (its entries' range)."""
    n, first = int(item.LUTDescriptor[0]) or 1 << 16, int(item.LUTDescriptor[1])
    entries = apply(np.arange(first, first + n, dtype=np.int64), ds)
    return int(entries.min()), int(entries.max())


def _window_of(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """(center, width, function) of the first WindowCenter/WindowWidth; None if absent or
    invalid (LINEAR width < 1, LINEAR_EXACT or SIGMOID width <= 0). An unknown
    VOILUTFunction is LINEAR, the standard's default."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    try:
        center, width = (
            float(v[0] if isinstance(v, MultiValue | list) else v) for v in (center, width)
        )
    except (TypeError, ValueError, IndexError):
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    func = func if func in _VOI_FUNCTIONS else "LINEAR"
    if not np.isfinite([center, width]).all() or width < (1.0 if func == "LINEAR" else 1e-12):
        logger.debug("ignoring the window (center %s, width %s, %s)", center, width, func)
        return None
    return center, width, func


def _apply_window(values: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 onto [0, 1] in float32: a narrow window saturates to exactly 0 / 1, a
    wide one keeps the contrast it was given (no stretching afterwards)."""
    x = values.astype(np.float32 if values.dtype.itemsize <= 4 else np.float64, copy=False)
    if func == "SIGMOID":
        x -= center
        x *= -4.0 / width
        with np.errstate(over="ignore"):
            np.exp(x, out=x)
        x += 1.0
        return np.reciprocal(x, out=x)
    if func == "LINEAR_EXACT":
        x -= center
        x /= width
    elif width == 1.0:  # LINEAR with width 1: a threshold at center - 0.5
        return (x > center - 0.5).astype(np.float32)
    else:
        x -= center - 0.5
        x /= width - 1.0
    x += 0.5
    return np.clip(x, 0.0, 1.0, out=x)


# --------------------------------------------------------------------------- Pillow files


def _read_pillow(path: Path, limit: int, target: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            _check_size(path, im.width * im.height, f"{im.height} x {im.width}", limit)
            if getattr(im, "n_frames", 1) > 1:
                _warn_first_frame(path, f"{im.n_frames} pages")
            size, scale = im.size, 1.0
            if target and im.format == "JPEG" and im.mode in ("L", "RGB"):
                scale = _draft(im, target)  # DCT scaling; a colour JPEG's Y is BT.601 luma
            im.load()
            if im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # transposed below
                size = size[::-1]
            ImageOps.exif_transpose(im, in_place=True)  # orientation tags; no copy without
            if im.mode in _EIGHT_BIT_MODES:  # colour -> luma like Pillow's "L", in 8 bits
                grey = _fit(im.convert("L") if im.mode != "L" else im, size, scale, target)
                return _scale(np.asarray(grey), 0, 255)
            mode, arr = im.mode, np.asarray(im)
    except RadiographReadError:
        raise
    except PermissionError as exc:
        raise RadiographReadError(path, "permission denied", "make the file readable") from exc
    except _PILLOW_ERRORS as exc:
        raise RadiographReadError(
            path, f"not an image Pillow or pydicom can read ({exc})", _SUPPORTED
        ) from exc
    if arr.ndim == 3:  # exotic multi-channel deep modes
        grey = arr[..., :3] @ _LUMA if arr.shape[-1] >= 3 else arr[..., 0]
        arr = np.rint(grey).astype(arr.dtype) if arr.dtype.kind in "iu" else grey
    logger.debug("%s: mode %s, depth from its values", path, mode)
    if arr.dtype.kind == "f" or arr.size == 0:
        return _float_pixels(arr) if arr.dtype.kind == "f" else integer_pixels(arr)
    fitted = _fit_array(arr, size, scale, target)
    return _integer_scale(fitted, int(arr.min()), int(arr.max()))


def _draft(im: Image.Image, target: int) -> float:
    """Ask libjpeg (Pillow's `draft`) for the smallest DCT scaling (1/2, 1/4, 1/8) whose
    longest side stays >= `target`; the scale chosen (1, 2, 4, 8)."""
    scale = target / max(im.size)
    want = max(1, math.ceil(im.width * scale)), max(1, math.ceil(im.height * scale))
    width = im.width
    drafted = im.draft("L", want)  # (mode, the original's box in decoded pixels) or None
    return width / drafted[1][2] if drafted else 1.0


def _resized_size(width: int, height: int, target: int) -> tuple[int, int] | None:
    """The (width, height) `transforms.resize_pad(target)` resizes a width x height image to
    (its arithmetic, so the result is the same to the pixel); None when it would not shrink."""
    if max(width, height) <= target:
        return None
    short, long = (width, height) if width <= height else (height, width)
    new_short = int(target * short / long)
    return (new_short, target) if width <= height else (target, new_short)


def _fit(im: Image.Image, size: tuple[int, int], scale: float, target: int | None) -> Image.Image:
    """Resize `im` (the image of original `size` (width, height), decoded at 1/`scale`) to the
    size `resize_pad(target)` gives the original, with the same antialiased bilinear filter
    (torchvision's is a port of Pillow's). The transform's resize then has nothing left to
    do, and its padding is the same. Grey values are resized in float32 (mode "F", as
    torchvision does; also the fastest of Pillow's modes here), colour in 8 bits."""
    out = _resized_size(*size, target) if target else None
    if out is None:
        return im
    box = (0.0, 0.0, min(im.width, size[0] / scale), min(im.height, size[1] / scale))
    if im.mode in ("L", "I", "I;16"):
        im = im.convert("F")
    return im.resize(out, Image.Resampling.BILINEAR, box=box)


def _fit_array(
    arr: np.ndarray,
    size: tuple[int, int],
    scale: float,
    target: int | None,
    integer: bool = False,
) -> np.ndarray:
    """`_fit` for an integer array: uint8 RGB in 8 bits, grey integers up to 16 bits in
    float32, which come back as float32 or (`integer`: DICOM LUTs index integers) rounded to
    their dtype. Floats and deeper data come back as they are (the transform resizes them)."""
    if not target or _resized_size(*size, target) is None:
        return arr
    if arr.dtype == np.uint8 and (arr.ndim == 3 and arr.shape[-1] == 3):
        return np.asarray(_fit(Image.fromarray(arr), size, scale, target))  # rounded
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return arr
    if arr.dtype in (np.uint8, np.dtype("<u2")):
        im = Image.fromarray(arr)  # L or I;16, no copy
    else:
        im = Image.fromarray(arr.astype(np.int32), "I")
    fitted = np.asarray(_fit(im, size, scale, target))
    return np.rint(fitted).astype(arr.dtype) if integer else fitted


# --------------------------------------------------------------------------- shared steps


def _full_scale(lo_value: int, hi_value: int) -> tuple[int, int]:
    """The full range [lo, hi] of the smallest depth in `_DEPTHS` that holds the values."""
    for bits in _DEPTHS:
        if lo_value >= 0 and hi_value <= (1 << bits) - 1:
            return 0, (1 << bits) - 1
        half = 1 << (bits - 1)
        if lo_value < 0 and -half <= lo_value and hi_value <= half - 1:
            return -half, half - 1
    return lo_value, hi_value


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(arr - lo) / (hi - lo) as a new float32 array: one copy, correctly rounded, so v / 255
    and 257 v / 65535 give the same float. lo == hi gives zeros."""
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    wide = arr.dtype == np.float64 or max(abs(lo), abs(hi)) >= 1 << 24  # float32 not exact
    out = arr.astype(np.float64 if wide else np.float32)
    if lo:
        out -= lo
    out /= hi - lo
    return out.astype(np.float32, copy=False)


def _float_pixels(arr: np.ndarray) -> np.ndarray:
    """Float pixels (no bit depth): as they are inside [0, 1], else min-max scaled."""
    if arr.size == 0 or not np.isfinite(arr).all():
        return arr  # rejected with a clear message by _checked
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr.astype(np.float32)
    return _scale(arr, lo, hi)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Colour -> grey in [0, 1]: 8-bit exactly as Pillow's "L" (so an RGB PNG and an RGB
    DICOM of the same pixels agree), deeper data by BT.601 weights over its 16 bits."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
        grey = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
        return _scale(grey, 0, 255)
    return _scale(rgb.astype(np.float32) @ _LUMA, 0, (1 << (rgb.dtype.itemsize * 8)) - 1)


def _warn_first_frame(path: str | Path, what: str) -> None:
    warnings.warn(f"{path}: {what}; using only the first", UserWarning, stacklevel=4)
