#!/usr/bin/env python
"""Train the bundled demo model (tiny GPT-2) from scratch on CPU, deterministically.

    python demo/train_demo_model.py [--out demo/model]   # (re)train and save
    python demo/train_demo_model.py --check             # retrain into a temp dir, compare to
    shipped weights
    python demo/train_demo_model.py --eval              # only evaluate the shipped model
                                                        # (accuracies, chain-of-thought regimes)

The logic lives in ``devkit.demo_model``; see ``demo/model/TRAINING.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# devkit/ (tiny test models, the demo model and data) sits at the repository root, outside the
# package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent


def _print_acc(acc: dict) -> None:
    for k, v in acc.items():
        print(f"  {k:48s} {v:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", default=str(HERE / "model"), help="output directory (default: demo/model)"
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="retrain into a temp dir and compare every tensor to OUT",
    )
    ap.add_argument("--tol", type=float, default=1e-6, help="max abs diff allowed by --check")
    ap.add_argument(
        "--eval", action="store_true", help="evaluate the model in OUT without training"
    )
    args = ap.parse_args(argv)

    from devkit import demo_model as dm

    if args.eval:
        from devkit.demo_data import load_demo_model

        model, tok = load_demo_model(args.out)
        print("accuracy (greedy decoding):")
        _print_acc(dm.evaluate(model, tok))
        return 0

    tok = dm.build_demo_tokenizer()
    model, info = dm.train(tok, log=lambda m: print(m, flush=True))
    print(json.dumps(info, indent=2))
    acc = dm.evaluate(model, tok)
    print("accuracy (greedy decoding):")
    _print_acc(acc)

    out = Path(args.out)
    if not args.check:
        dm.save_model(model, tok, out)
        print(f"saved to {out}")
        return 0

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        dm.save_model(model, tok, tmp)
        new = load_file(str(Path(tmp) / "model.safetensors"))
        old = load_file(str(out / "model.safetensors"))
        if set(new) != set(old):
            print(f"tensor names differ: {sorted(set(new) ^ set(old))}")
            return 1
        max_diff = 0.0
        for k in sorted(old):
            if new[k].shape != old[k].shape:
                print(f"shape mismatch for {k}: {tuple(new[k].shape)} vs {tuple(old[k].shape)}")
                return 1
            max_diff = max(max_diff, float((new[k].double() - old[k].double()).abs().max()))
        tok_same = (Path(tmp) / "tokenizer.json").read_bytes() == (
            out / "tokenizer.json"
        ).read_bytes()
    print(f"max abs diff vs {out / 'model.safetensors'}: {max_diff:.3e} (tolerance {args.tol:g})")
    print(f"tokenizer.json identical: {tok_same}")
    ok = max_diff <= args.tol and tok_same
    print("CHECK OK" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
