"""Re-render RESULTS.md from a results.json (after a change to the report's layout only).

    python scripts/bench_report.py [benchmarks/results.json]

Writes RESULTS.md next to the results.json; the layout is `regionnet.bench.report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regionnet.bench.report import markdown_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=Path("benchmarks/results.json"))
    src = p.parse_args(argv).results
    (src.parent / "RESULTS.md").write_text(markdown_report(json.loads(src.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
