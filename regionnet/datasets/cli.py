"""`regionnet-data`: index public datasets into manifests, merge them, print counts.

    regionnet-data index --dataset mura --root /data/MURA-v1.1 --out mura.csv
    regionnet-data index --dataset unifesp --root /data/unifesp --out unifesp.csv [--multilabel]
    regionnet-data index --dataset generic --root /data/xr --label-map map.yaml --out xr.csv
    regionnet-data index --dataset dicom --root /pacs/export --keywords kw.yaml --out pacs.csv
    regionnet-data merge mura.csv knee.csv ddh.csv --out all.csv [--balance | --per-region N]
    regionnet-data stats all.csv

A plain argparse tool (not a Hydra app): it writes the CSV that `data=csv data.csv=...` trains
from. Exit status 2 with a one-line message for a wrong root, option or manifest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from regionnet.datasets import ADAPTERS, index_dataset
from regionnet.datasets.manifest import (
    merge_manifests,
    print_stats,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("regionnet.datasets")

# CLI flag -> adapter keyword (only flags the user gave are passed on)
INDEX_OPTIONS = ("source", "multilabel", "csv", "label_map", "label_column", "patient_column",
                 "view_column", "keywords", "classes")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regionnet-data", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="walk a dataset in its publisher's layout -> manifest CSV")
    p.add_argument("--dataset", required=True, choices=sorted(ADAPTERS))
    p.add_argument("--root", help="the dataset folder (layout: see docs/datasets.md)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--source", help="source name in the manifest (default: the dataset name)")
    p.add_argument(
        "--multilabel",
        action="store_true",
        default=None,
        help="unifesp: keep multi-label rows as one 0/1 column per region (no region column)",
    )
    p.add_argument("--csv", help="generic: a CSV with path and label columns")
    p.add_argument("--label-map", help="generic: YAML {label: region or null}")
    p.add_argument("--label-column", help="generic --csv: label column (default label/region)")
    p.add_argument("--patient-column", help="generic --csv: patient id column")
    p.add_argument("--view-column", help="generic --csv: view column")
    p.add_argument("--keywords", help="dicom: YAML {keyword: region or null} added to the defaults")
    p.add_argument("--classes", nargs="+", help="mednist: classes to index (Hand CXR)")

    m = sub.add_parser("merge", help="combine manifests, optionally balanced per region")
    m.add_argument("manifests", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument(
        "--balance", action="store_true", help="downsample patients to the smallest region"
    )
    m.add_argument("--per-region", type=int, help="downsample patients to <= N images per region")
    m.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("stats", help="counts per region x source (rich table)")
    s.add_argument("manifest")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "index":
        opts = {k: getattr(args, k) for k in INDEX_OPTIONS if getattr(args, k) is not None}
        df = index_dataset(args.dataset, args.root, **opts)
        write_manifest(df, args.out)
        print_stats(df, title=f"{args.dataset}: radiographs per region x source")
        excluded = df.attrs.get("excluded") or {}
        if excluded:
            print(f"excluded: {sum(excluded.values())} ({excluded})")
        print(f"wrote {args.out}: {len(df)} radiographs")
    elif args.command == "merge":
        frames = [read_manifest(p) for p in args.manifests]
        df = merge_manifests(frames, args.balance, args.per_region, args.seed)
        write_manifest(df, args.out)
        print_stats(df, title="merged: radiographs per region x source")
        print(f"wrote {args.out}: {len(df)} radiographs")
    else:
        print_stats(read_manifest(args.manifest), title=str(args.manifest))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"regionnet-data {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
