"""Build tiny but complete DICOM files for tests (no real data needed).

Import from test modules as ``from dicom_factory import make_dicom`` (pytest puts the
``tests`` directory on ``sys.path`` in its default "prepend" import mode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Pres.
_COLOUR = ("RGB", "YBR_FULL")


def make_dicom(
    path: str | Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    frames: int | None = None,
    suffix: str | None = None,
    **tags: object,
) -> Path:
    """Write a DX DICOM to ``path`` and return the path actually written.

    pixels: (H, W) or (frames, H, W) for grey; (H, W, 3) uint8 for RGB; ``None`` writes a
        dataset without PixelData (like a structured report). uint8 -> 8-bit, uint16 ->
        16-bit container with BitsStored 12, int16 -> signed 16-bit (BitsStored 16).
    frames: repeat 2-D ``pixels`` this many times (multi-frame); 3-D grey pixels set it.
    suffix: replace the file suffix, e.g. ``""`` for an extension-less PACS export.
    tags: any further/overriding attributes, e.g. ``BodyPartExamined="CHEST"``,
        ``RescaleSlope=2``, ``WindowCenter=1000``, ``BitsStored=16``.
    """
    path = Path(path)
    if suffix is not None:
        path = path.with_suffix(suffix)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = "TEST0001"
    ds.PatientName = "Test^Patient"
    if pixels is not None:
        _set_pixels(ds, np.asarray(pixels), photometric, frames)
    for name, value in tags.items():
        setattr(ds, name, value)
    if "BitsStored" in tags and "HighBit" not in tags:
        ds.HighBit = int(ds.BitsStored) - 1
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pixels(ds: FileDataset, arr: np.ndarray, photometric: str, frames: int | None) -> None:
    colour = photometric in _COLOUR
    if frames is not None and frames > 1 and arr.ndim == (3 if colour else 2):
        arr = np.stack([arr] * frames)
    n_frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = (int(n) for n in (arr.shape[-3:-1] if colour else arr.shape[-2:]))
    if n_frames > 1:
        ds.NumberOfFrames = n_frames
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = 12 if arr.dtype == np.uint16 else bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# Transfer syntaxes GDCM (a regionnet dependency) can write, by pydicom UID.
_GDCM_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "JPEGBaselineProcess1",
    "1.2.840.10008.1.2.4.51": "JPEGExtendedProcess2_4",
    "1.2.840.10008.1.2.4.57": "JPEGLosslessProcess14",
    "1.2.840.10008.1.2.4.70": "JPEGLosslessProcess14_1",
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless",
    "1.2.840.10008.1.2.4.90": "JPEG2000Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG2000",
    "1.2.840.10008.1.2.5": "RLELossless",
}


def compress(src: str | Path, transfer_syntax: str, dst: str | Path | None = None) -> Path:
    """Re-encode the DICOM file `src` in `transfer_syntax` (a UID) and return the new file:
    GDCM for the JPEG family, JPEG-LS, JPEG 2000 and RLE, pydicom for Deflated Explicit VR
    Little Endian. `dst` defaults to `src` with the syntax's name in the stem."""
    src = Path(src)
    uid = UID(transfer_syntax)
    if dst is None:
        keyword = uid.keyword or uid.replace(".", "_")
        dst = src.with_name(f"{src.stem}_{keyword}{src.suffix}")
    dst = Path(dst)
    if uid == DeflatedExplicitVRLittleEndian:
        ds = pydicom.dcmread(src)
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(dst, enforce_file_format=True)
        return dst
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise ValueError(f"GDCM cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_SYNTAX[uid])))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"GDCM cannot encode {src} as {uid.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise ValueError(f"GDCM cannot write {dst}")
    if pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID != uid:
        raise ValueError(f"GDCM wrote {dst} in another transfer syntax than {uid.name}")
    return dst


def strip_header(
    src: str | Path, dst: str | Path, *, implicit_vr: bool = True, little_endian: bool = True
) -> Path:
    """Write the data set of `src` to `dst` without preamble, `DICM` prefix and file meta
    group, as `dicomweb-client`'s `store_instances` or some PACS exports do."""
    ds = pydicom.dcmread(src)
    plain = pydicom.Dataset(ds)
    if hasattr(plain, "file_meta"):
        del plain.file_meta
    pydicom.dcmwrite(dst, plain, implicit_vr=implicit_vr, little_endian=little_endian)
    data = Path(dst).read_bytes()
    if data[128:132] == b"DICM" or data[:4] == b"\x02\x00\x00\x00":
        raise ValueError(f"{dst} still has a file meta header")
    return Path(dst)
