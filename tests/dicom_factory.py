"""Build tiny but complete DICOM files for tests (no real data needed).

Import from test modules as ``from dicom_factory import make_dicom`` (pytest puts the
``tests`` directory on ``sys.path`` in its default "prepend" import mode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

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
