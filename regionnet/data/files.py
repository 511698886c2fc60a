"""The one folder walk that lists radiographs, and the one rule for what a radiograph file is.

Every folder input uses `list_radiographs`: training folders (`regionnet.data.sources`),
prediction folders (`regionnet.predict`), pretraining folders (`regionnet.ssl.data`), the
dataset adapters (`regionnet.datasets.manifest.find_images`) and the DICOM archive index
(`regionnet.datasets.dicom_index`). Its rules:

- Format: `is_radiograph_file` (from `regionnet.io`, so the reader applies the same rule: a
  file listed by hand in a CSV that is not a radiograph file is refused with the supported
  formats): a suffix in `IMAGE_EXTENSIONS` (any case), or the DICOM `DICM` magic at byte 128
  for any other name (PACS exports without a suffix, or named by UID like `1.2.840.5.320`).
- Hidden: names starting with '.' are skipped below the listed folder, files (`.DS_Store`,
  AppleDouble `._x.png`) and folders with everything in them (`.git/`, `.cache/`). The listed
  folder itself may be hidden.
- Symlinks: a symlinked *file* is listed (by the link's path; callers that resolve paths get
  the target). A symlinked *folder* below the listed folder is not entered, so a link back up
  the tree cannot loop and a link elsewhere cannot pull in a second copy of an archive (the
  same as `pathlib.Path.rglob` in Python < 3.13). The listed folder itself may be a symlink:
  link a whole folder in, or list the target.
- Order: sorted by path.
- Skips: files that are not radiographs (and dangling links) are counted and logged in one line
  per listing; hidden files are skipped silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from regionnet.io import IMAGE_EXTENSIONS, SUPPORTED_FORMATS, is_radiograph_file

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "SUPPORTED_FORMATS", "is_radiograph_file", "list_radiographs"]


def list_radiographs(root: str | Path, suffixes: Iterable[str] | None = None) -> list[Path]:
    """Radiograph files under `root`, recursively, sorted; see the module docstring for the
    hidden-file, symlink and format rules.

    Paths are `root` joined with the path below it (not resolved). `suffixes` narrows the rule
    to files with one of those suffixes (an adapter that knows its publisher's format): no
    `DICM` sniffing then. Raises NotADirectoryError when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder")
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)
    found, skipped, links = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=_warn_unlistable):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            if (here / d).is_symlink():
                links += 1
                continue
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these
        for name in filenames:
            if name.startswith("."):
                continue
            f = here / name
            if wanted is not None:
                ok = f.suffix.lower() in wanted and f.is_file()
            else:
                ok = f.is_file() and is_radiograph_file(f)
            if ok:
                found.append(f)
            else:
                skipped += 1
    if skipped or links:
        log.info(
            "%s: skipped %d files that are not radiographs (%s)%s",
            root,
            skipped,
            ", ".join(wanted) if wanted is not None else SUPPORTED_FORMATS,
            f" and {links} symlinked folders (not followed)" if links else "",
        )
    return sorted(found)


def _warn_unlistable(err: OSError) -> None:
    log.warning("cannot list %s: %s", err.filename, err.strerror or err)
