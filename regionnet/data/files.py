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
- Skips: every skipped path is counted and logged with its reason. Files that are not
  radiographs: one DEBUG line each and their count in one INFO line per listing. Paths that
  look like a problem get a WARNING line each and are counted in that line too: a folder that
  cannot be listed (permission denied), a dangling symlink, a file that cannot be read to look
  for the `DICM` magic (permission denied), something that is not a regular file (a FIFO, a
  socket). Hidden files are skipped without a line.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from regionnet.io import IMAGE_EXTENSIONS, SUPPORTED_FORMATS, is_radiograph_file

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "SUPPORTED_FORMATS", "is_radiograph_file", "list_radiographs"]


def list_radiographs(root: str | Path, suffixes: Iterable[str] | None = None) -> list[Path]:
    """Radiograph files under `root`, recursively, sorted; see the module docstring for the
    hidden-file, symlink, format and skip rules.

    Paths are `root` joined with the path below it (not resolved). `suffixes` narrows the rule
    to files with one of those suffixes (an adapter that knows its publisher's format): no
    `DICM` sniffing then. Raises NotADirectoryError when `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder")
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)
    found, skipped, links = [], 0, 0
    problems: Counter[str] = Counter()

    def problem(path: str | Path, why: str) -> None:
        log.warning("skipping %s: %s", path, why)
        problems[why] += 1

    def unlistable(err: OSError) -> None:
        problem(err.filename, f"cannot list the folder ({err.strerror or err})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
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
            why = _unusable(f)
            if why is not None:
                problem(f, why)
                continue
            if wanted is not None:
                ok = f.suffix.lower() in wanted
            elif f.suffix.lower() not in IMAGE_EXTENSIONS and not os.access(f, os.R_OK):
                problem(f, "permission denied (cannot look for the DICM magic)")
                continue
            else:
                ok = is_radiograph_file(f)
            if ok:
                found.append(f)
            else:
                log.debug("skipping %s: not a radiograph", f)
                skipped += 1
    if skipped or links or problems:
        log.info(
            "%s: skipped %d files that are not radiographs (%s)%s%s",
            root,
            skipped,
            ", ".join(wanted) if wanted is not None else SUPPORTED_FORMATS,
            f" and {links} symlinked folders (not followed)" if links else "",
            "".join(f"; {n} x {why}" for why, n in sorted(problems.items())),
        )
    return sorted(found)


def _unusable(path: Path) -> str | None:
    """Why a listed name cannot be a radiograph file, or None: a dangling symlink, a
    permission error, not a regular file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "dangling symlink" if path.is_symlink() else "vanished while listing"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"cannot stat ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None
