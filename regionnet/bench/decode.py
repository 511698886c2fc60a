"""Decode rate per core of full-resolution radiographs: today's full read against the reduced
read (`read_radiograph(path, target=S)`), each followed by the evaluation resize
(`resize_pad(S)`), i.e. what one predict reader worker does per film.

Inputs: the full-resolution originals (`<data>/fullres/<region>/*.png`: chest about 2400 x
2000 RGB, hands about 800 px grey) and files made from them in a temporary folder: JPEG
(quality 90) and DICOMs of their luma: uncompressed (12-bit values in 16 bits), JPEG 2000
lossless (pylibjpeg-openjpeg's encoder) and JPEG Baseline 8-bit (Pillow's encoder,
encapsulated). Rates are films per CPU second of this process on one torch thread
(`time.process_time`, the best of `repeats` per film), so other load on a shared machine
slows them less than wall time would.

    python -m regionnet.bench.decode ../shared/data/fullres

Results (`decode_section`): `<format>_per_s_per_core`, `<format>_reduced_per_s_per_core`
and `<format>_speedup` (also per region: `<format>_speedup_chest`) for `fullres_png`,
`fullres_jpeg`, `fullres_dicom` (uncompressed), `fullres_dicom_j2k` and
`fullres_dicom_jpeg`; scripts/benchmark.py would keep them under `speed.decode`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from regionnet.data.transforms import resize_pad
from regionnet.io import read_radiograph

_DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(path: Path, pixels: np.ndarray, syntax: str = ExplicitVRLittleEndian) -> Path:
    """A grey DX DICOM of `pixels` (uint8: 8-bit; uint16: 12 bits stored) in `syntax`:
    uncompressed, JPEG 2000 lossless or (uint8 only) JPEG Baseline."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = _DX, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "DX", "BENCH"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = 8 if pixels.dtype == np.uint8 else 12
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if syntax == JPEGBaseline8Bit:
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        ds.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_inputs(pngs: list[Path], folder: Path) -> dict[str, list[Path]]:
    """The originals and the JPEG and DICOM files made from them, by format name."""
    files: dict[str, list[Path]] = {
        "fullres_png": list(pngs),
        "fullres_jpeg": [],
        "fullres_dicom": [],
        "fullres_dicom_j2k": [],
        "fullres_dicom_jpeg": [],
    }
    for k, png in enumerate(pngs):
        with Image.open(png) as im:
            im.load()
            im.convert("RGB" if im.mode == "RGB" else "L").save(folder / f"{k}.jpg", quality=90)
            grey = np.asarray(im.convert("L"))
        files["fullres_jpeg"].append(folder / f"{k}.jpg")
        deep = grey.astype(np.uint16) * 16 + 7  # 12-bit values
        files["fullres_dicom"].append(write_dicom(folder / f"{k}.dcm", deep))
        j2k = write_dicom(folder / f"{k}_j2k.dcm", deep, JPEG2000Lossless)
        files["fullres_dicom_j2k"].append(j2k)
        jpeg = write_dicom(folder / f"{k}_jpeg.dcm", grey, JPEGBaseline8Bit)
        files["fullres_dicom_jpeg"].append(jpeg)
    return files


def cpu_seconds_per_film(paths: list[Path], size: int, reduced: bool, repeats: int) -> np.ndarray:
    """Per film, the best of `repeats` CPU times of read + resize_pad(size)."""
    transform = resize_pad(size)
    target = size if reduced else None
    best = []
    for path in paths:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            transform(torch.from_numpy(read_radiograph(path, target=target))[None])
            times.append(time.process_time() - start)
        best.append(min(times))
    return np.asarray(best)


def decode_section(fullres: Path, size: int = 224, repeats: int = 2) -> dict:
    """Films per CPU second, full read vs reduced read, per format (module docstring)."""
    pngs = sorted(Path(fullres).glob("*/*.png"))
    if not pngs:
        raise FileNotFoundError(f"{fullres}: no <region>/*.png full-resolution films")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="regionnet-decode-") as tmp:
            files = make_inputs(pngs, Path(tmp))
            out: dict = {"image_size": size, "films": len(pngs), "repeats": repeats}
            regions = np.array([png.parent.name for png in pngs])
            for name, paths in files.items():
                full = cpu_seconds_per_film(paths, size, False, repeats)
                reduced = cpu_seconds_per_film(paths, size, True, repeats)
                out[f"{name}_per_s_per_core"] = round(1 / full.mean(), 2)
                out[f"{name}_reduced_per_s_per_core"] = round(1 / reduced.mean(), 2)
                out[f"{name}_speedup"] = round(full.mean() / reduced.mean(), 2)
                for region in sorted(set(regions)):  # chest films are the large ones
                    pick = regions == region
                    ratio = full[pick].mean() / reduced[pick].mean()
                    out[f"{name}_speedup_{region}"] = round(float(ratio), 2)
    finally:
        torch.set_num_threads(threads)
    out["method"] = (
        "read_radiograph + resize_pad per film, CPU seconds of one process on one torch "
        "thread, best of the repeats; rates are films / mean CPU seconds; DICOMs made from "
        "the PNGs' luma"
    )
    return out


if __name__ == "__main__":
    import json

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/fullres")
    print(json.dumps(decode_section(folder), indent=2))
