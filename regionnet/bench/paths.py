"""Paths in committed reports: every absolute path of a run named relative to the repository
(`benchmarks/...`), the shared data (`../shared/data/...`, or `<data>/...` when the data lay
elsewhere) or the output folder (`<out>/...`), never by this machine's absolute paths.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from regionnet.bench.settings import REPO

# An absolute path in running text: starts at a "/" that follows no word character, dot, ">",
# "~" or "/" (so `GFLOP/s`, `../shared/data` and `<data>/x` are left alone).
_ABS_PATH = re.compile(r"(?<![\w.~/>-])/[^\s`'\"<>|,;()\[\]{}]+")


def _under(path: PurePosixPath, base: str | None) -> PurePosixPath | None:
    if not base:
        return None
    try:
        return path.relative_to(PurePosixPath(base))
    except ValueError:
        return None


def _join(prefix: str, rel: PurePosixPath) -> str:
    rel = str(rel)
    return prefix if rel == "." else (f"{prefix}/{rel}" if prefix else rel)


def relativise(text: str, paths: list[dict]) -> str:
    """`text` with every absolute path made relative: to the repository (`benchmarks/...`),
    the data folder (`../shared/data/...` when it is the repository's sibling `shared/data`,
    else `<data>/...`), the output folder (`<out>/...`). `paths` are the runs' recorded
    `{repo, out, data}`; results from before they were recorded fall back on the path's own
    parts (`.../shared/data/x` -> `../shared/data/x`, `.../benchmarks/x` -> `benchmarks/x`)."""
    repos = {str(REPO)} | {p["repo"] for p in paths if p.get("repo")}
    sibling = {str(PurePosixPath(r).parent / "shared" / "data") for r in repos}

    def one(path: str) -> str:
        pp = PurePosixPath(path)
        for p in paths:
            rel = _under(pp, p.get("data"))
            if rel is not None and not any(_under(pp, r) is not None for r in repos):
                return _join("../shared/data" if p["data"] in sibling else "<data>", rel)
        for r in sorted(repos, key=len, reverse=True):
            if (rel := _under(pp, r)) is not None:
                return _join("", rel) or "."
        for p in paths:
            if (rel := _under(pp, p.get("out"))) is not None:
                return _join("<out>", rel)
        parts = pp.parts
        for i in range(1, len(parts) - 1):
            if parts[i : i + 2] == ("shared", "data"):
                return _join("../shared/data", PurePosixPath(*parts[i + 2 :]))
        if "benchmarks" in parts:
            return str(PurePosixPath(*parts[parts.index("benchmarks") :]))
        return f"<elsewhere>/{pp.name}"

    def sub(m: re.Match) -> str:
        path = m.group(0)
        tail = path[len(path.rstrip(".:")) :]  # sentence punctuation is not part of the path
        return one(path[: len(path) - len(tail)]) + tail

    return _ABS_PATH.sub(sub, text)


def run_paths(res: dict) -> list[dict]:
    return [res[k] for k in ("paths", "paths_of_skipped") if k in res]


def portable_json(res: dict) -> str:
    """results.json as committed: every absolute path relative to the repository, the data
    folder or the output folder (`<out>/...`), as in RESULTS.md. The run's own folders are
    kept under `paths` as `.`, `<out>` and `../shared/data` (or `<data>`)."""
    return relativise(json.dumps(res, indent=2, default=str) + "\n", run_paths(res))
