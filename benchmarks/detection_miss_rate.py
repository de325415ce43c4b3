"""Benchmark (not a test): how often face detection finds no face in raw photos, per detector setting.

Runs prepare-data's detection (common.faces.process_photo) over the photos of the ``celeba-wild-75``
benchmark (the celeba-wild identities with 30 photos; ../shared/data/faces/README.md) with the original
single frontal cascade and with the fallback chain, and prints the miss rate, which detector found the
faces, and the time per photo.

Usage:
  python benchmarks/detection_miss_rate.py [--raw ../shared/data/faces/celeba-wild] [--per-identity 30]
      [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from checkout import facessl_path

facessl_path()
from facessl.common.faces import DetectConfig, process_photo


def detect(args):
    path, cfg = args
    result = process_photo(Path(path).read_bytes(), cfg)
    return result.detector or ("none" if result.reason == "no face detected" else f"skip: {result.reason}")


def main():
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("FACESSL_SHARED", here.parent / "shared"))
    parser.add_argument(
        "--raw", default=str(shared / "data" / "faces" / "celeba-wild"), help="raw photos, one folder per identity"
    )
    parser.add_argument("--per-identity", type=int, default=30, help="identities with exactly this many photos")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="detection processes")
    args = parser.parse_args()
    folders = [d for d in sorted(Path(args.raw).iterdir()) if d.is_dir()]
    photos = [str(p) for d in folders if len(list(d.iterdir())) == args.per_identity for p in sorted(d.iterdir())]
    print(f"{len(photos)} photos of {len(photos) // max(1, args.per_identity)} identities from {args.raw}")
    print("| detector | photos | no face | miss rate | found by | ms/photo (per worker) |")
    print("|---|---|---|---|---|---|")
    base = DetectConfig()
    for label, cfg in (
        ("frontal cascade only (the original)", replace(base, fallback=False)),
        ("fallback chain (default)", base),
    ):
        start = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            found = Counter(pool.map(detect, [(p, cfg) for p in photos], chunksize=16))
        seconds = time.perf_counter() - start
        misses = found.pop("none", 0)
        by = ", ".join(f"{k} {v}" for k, v in found.most_common())
        print(
            f"| {label} | {len(photos)} | {misses} | {misses / len(photos):.1%} | {by} | "
            f"{1000 * seconds * args.workers / len(photos):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
