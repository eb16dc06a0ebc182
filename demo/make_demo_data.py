#!/usr/bin/env python
"""(Re)write the demo data files in demo/data deterministically.

    python demo/make_demo_data.py [--out demo/data]

The logic lives in ``devkit.demo_data``; see ``demo/data/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# devkit/ (tiny test models, the demo model and data) sits at the repository root, outside the
# package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", default=str(HERE / "data"), help="output directory (default: demo/data)"
    )
    args = ap.parse_args(argv)

    from devkit.demo_data import write_demo_data

    for p in write_demo_data(args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
