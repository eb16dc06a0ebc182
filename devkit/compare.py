"""Compare two ``results/`` trees: ``python -m devkit.compare A B`` prints every difference.

Tables, JSON and figures must be the same bytes; HDF5 files the same datasets with the same values
(floats bit for bit). Used by the reproducibility tests and to check that a refactor left the
default run's outputs unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path


def result_differences(a: Path, b: Path) -> list[str]:
    """Every way two ``results/`` trees differ: missing files, differing bytes of tables, JSON and
    figures, and HDF5 datasets whose values (floats compared bit for bit) are not the same."""
    import h5py

    diffs = []
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    diffs += [f"only in {a}: {p}" for p in sorted(set(files_a) - set(files_b))]
    diffs += [f"only in {b}: {p}" for p in sorted(set(files_b) - set(files_a))]
    for rel in sorted(set(files_a) & set(files_b)):
        pa, pb = a / rel, b / rel
        if rel.suffix != ".h5":
            if pa.read_bytes() != pb.read_bytes():
                diffs.append(f"bytes differ: {rel}")
            continue
        with h5py.File(pa) as fa, h5py.File(pb) as fb:
            names_a, names_b = _dataset_names(fa), _dataset_names(fb)
            if names_a != names_b:
                diffs.append(f"datasets differ: {rel}: {names_a} vs {names_b}")
                continue
            for name in names_a:
                x, y = fa[name][()], fb[name][()]
                same = (
                    x.dtype == y.dtype
                    and x.shape == y.shape
                    and (
                        x.tolist() == y.tolist()
                        if x.dtype.kind == "O"
                        else x.tobytes() == y.tobytes()
                    )
                )
                if not same:
                    diffs.append(f"values differ: {rel}:{name}")
    return diffs


def _dataset_names(f) -> list[str]:
    """Names of every dataset in an open HDF5 file, in visiting order."""
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def main(argv: list[str] | None = None) -> int:
    """Print the differences of two results trees (``--ignore NAME`` skips files of that name)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore", action="append", default=[], help="file name to skip")
    args = parser.parse_args(argv)
    diffs = [
        d
        for d in result_differences(args.a, args.b)
        if Path(d.split(": ")[-1]).name not in args.ignore
    ]
    for line in diffs:
        print(line)
    print(f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
