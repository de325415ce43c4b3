"""celeba-open: open-set identification through the real ``enroll`` and ``identify`` (not a test).

The protocol (../shared/data/faces/README.md, "Open-set identification"): 50 known celeba-wild identities with 5
enrolment photos each (``enroll.csv``) and 2,000 probes (``probes.csv``): the other 25 photos of each known
identity and all 30 photos of 25 unknown identities. This script

1. links the enrolment photos into ``<out>/people/<identity>/`` and the probes into ``<out>/probes/<identity>/``
   (hard links, else copies; the shared data is never written);
2. runs ``enroll --people <out>/people --encoder ENCODER --output <out>/gallery`` and
   ``identify --gallery <out>/gallery --photos <out>/probes --output <out>/results`` as subprocesses of this
   interpreter, this checkout's code (``python -m facessl.jobs.enroll``...), timing each;
3. scores ``results.jsonl``: a probe's face is its largest face (listed first); a probe with no face found is a
   miss if known and a rejection if unknown. Metrics (common.gallery.open_set_metrics): rank-1, DIR@FAR=1%
   and 10%, and at the gallery's calibrated threshold the known probes named correctly and the unknown probes
   accepted; identify's speed in photos per second, detection included: measured (wall clock, which other
   processes on the machine slow down: the load average is recorded) and per CPU-second of identify and its
   detection workers (what an idle machine gives per core).

Writes ``<out>/metrics.json`` and ``<out>/dir_far.png`` (DIR against FAR), and prints one table row.

Usage:
  python benchmarks/open_set.py --encoder runs/glint24/classifier --out runs/open-set/glint24-sup
  python benchmarks/open_set.py --encoder rand/encoder.pt --image-size 64 --out runs/open-set/random -- --no-flip
  python benchmarks/open_set.py ... --known 10 --unknown 5       # a reduced protocol (the slow test)
Options after ``--`` go to enroll unchanged (--template mean, --representation head, --no-flip, --far ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from checkout import facessl_path

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_PATH = facessl_path()
FACES = Path(os.environ.get("FACESSL_SHARED") or REPO.parent / "shared") / "data" / "faces"
PROTOCOL = Path("celeba-wild") / "open-set" / "celeba-open"


def read_protocol(faces: Path, known: int | None = None, unknown: int | None = None) -> tuple[list, list]:
    """``(enrolment rows, probe rows)`` of celeba-open as dicts, optionally reduced to the first ``known`` known
    and ``unknown`` unknown identities (sorted by id).

    Raises:
        FileNotFoundError: the protocol files are missing.
    """
    root = faces / PROTOCOL
    enrol = list(csv.DictReader((root / "enroll.csv").open()))
    probes = list(csv.DictReader((root / "probes.csv").open()))
    known_ids = sorted({r["identity"] for r in enrol})[:known]
    unknown_ids = sorted({r["identity"] for r in probes if r["known"] == "0"})[:unknown]
    enrol = [r for r in enrol if r["identity"] in known_ids]
    probes = [r for r in probes if r["identity"] in (known_ids if r["known"] == "1" else unknown_ids)]
    return enrol, probes


def training_raw_folder(out: Path, faces: Path = FACES) -> Path:
    """``out/celeba-open-train-raw``: what an encoder for celeba-open may train on, one folder per identity (hard
    links, else copies): every glint24 identity, and the celeba-wild identities with fewer than 20 photos
    (folders ``celeba-<id>``), none of which is in celeba-open (its identities have 30). Rebuilt every time."""
    dst = out / "celeba-open-train-raw"
    shutil.rmtree(dst, ignore_errors=True)
    folders = [(d, d.name) for d in sorted((faces / "glint24").iterdir()) if d.is_dir()]
    for d in sorted((faces / "celeba-wild").iterdir()):
        if d.is_dir() and d.name != "open-set" and sum(f.is_file() for f in d.iterdir()) < 20:
            folders.append((d, f"celeba-{d.name}"))
    for src, name in folders:
        (dst / name).mkdir(parents=True)
        for photo in sorted(p for p in src.iterdir() if p.is_file()):
            try:
                os.link(photo, dst / name / photo.name)
            except OSError:
                shutil.copyfile(photo, dst / name / photo.name)
    return dst


def link_photos(rows: list[dict], src: Path, dst: Path) -> None:
    """Hard-link (else copy) each row's ``image`` (relative to ``src``) to ``dst/<identity>/<file name>``;
    ``dst`` is rebuilt from scratch."""
    shutil.rmtree(dst, ignore_errors=True)
    for r in rows:
        target = dst / r["identity"] / Path(r["image"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / r["image"], target)
        except OSError:
            shutil.copyfile(src / r["image"], target)


def run_job(name: str, *args) -> float:
    """Run one job of this checkout with this interpreter; returns its wall time in seconds. Exits with the
    job's exit code when it fails."""
    started = time.time()
    cmd = [sys.executable, "-m", f"facessl.jobs.{name}", *map(str, args)]
    print("$ " + " ".join([name, *map(str, args)]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [CHECKOUT_PATH, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"{name} failed with exit code {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", file=sys.stderr)
        sys.exit(r.returncode)
    print(r.stdout.strip(), flush=True)
    return time.time() - started


def score_results(results: Path, probes: list[dict], threshold: float) -> dict:
    """The open-set metrics of identify's ``results.jsonl`` over the probe rows (module docstring)."""
    import numpy as np

    from facessl.common.gallery import open_set_metrics

    by_photo = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        by_photo[row["photo"]] = row
    correct, known_scores, unknown_scores, no_face = [], [], [], {"known": 0, "unknown": 0}
    for p in probes:
        row = by_photo[f"{p['identity']}/{Path(p['image']).name}"]
        face = row["faces"][0] if row.get("faces") else None
        score = face["score"] if face else -np.inf
        kind = "known" if p["known"] == "1" else "unknown"
        no_face[kind] += face is None
        if kind == "known":
            correct.append(face is not None and face["top3"][0][0] == p["identity"])
            known_scores.append(score)
        else:
            unknown_scores.append(score)
    metrics = open_set_metrics(np.array(correct), np.array(known_scores), np.array(unknown_scores), threshold)
    return {**metrics, "probes_without_face": no_face}


def plot_dir_far(curves: dict[str, dict], path: Path, title: str = "celeba-open") -> None:
    """DIR against FAR (log scale) for each named curve (``{"far": [...], "dir": [...]}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, c in curves.items():
        pts = [(f, d) for f, d in zip(c["far"], c["dir"]) if f > 0]
        ax.plot([f for f, _ in pts], [d for _, d in pts], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("false-accept rate (unknown probes accepted)")
    ax.set_ylabel("detection and identification rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: open-set identification")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    encoder: str,
    out: Path,
    enroll_args: list[str],
    known: int | None = None,
    unknown: int | None = None,
    workers: int = 0,
    device: str = "auto",
    faces: Path = FACES,
    job=None,
) -> dict:
    """The whole benchmark (module docstring); returns what ``metrics.json`` holds. ``job(name, *args)`` runs a
    job and returns its wall time (default :func:`run_job`; the suite passes its own)."""
    job = job or run_job
    enrol, probes = read_protocol(faces, known, unknown)
    src = faces / "celeba-wild"
    out.mkdir(parents=True, exist_ok=True)
    link_photos(enrol, src, out / "people")
    link_photos(probes, src, out / "probes")
    for old in ("gallery", "results"):
        shutil.rmtree(out / old, ignore_errors=True)
    common = ["--workers", workers, "--device", device]
    enroll_s = job(
        "enroll", "--people", out / "people", "--encoder", encoder, "--output", out / "gallery", *common, *enroll_args
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    identify_s = job(
        "identify", "--gallery", out / "gallery", "--photos", out / "probes", "--output", out / "results", *common
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the CPU time of identify and its detection workers (waited for, so counted): the speed on an idle machine
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    gallery = json.loads((out / "gallery" / "enrolment.json").read_text())
    summary = json.loads((out / "results" / "summary.json").read_text())
    threshold = gallery["threshold"]["value"]
    metrics = score_results(out / "results" / "results.jsonl", probes, threshold)
    result = {
        "encoder": encoder,
        "enroll_args": enroll_args,
        "known_identities": len({r["identity"] for r in enrol}),
        "enrolled_photos": gallery["photos"],
        "enrolment_skipped": len(gallery["skipped"]),
        "threshold": gallery["threshold"],
        "image_size": gallery["image_size"],
        **metrics,
        "identify_photos_per_second": summary["photos_per_second"],
        "identify_wall_s": round(identify_s, 1),
        "identify_photos_per_second_wall": round(summary["photos"] / identify_s, 2),
        "identify_cpu_s": round(cpu_s, 1),
        "identify_photos_per_cpu_second": round(summary["photos"] / cpu_s, 2),
        "enroll_wall_s": round(enroll_s, 1),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    plot_dir_far({Path(encoder).name or encoder: metrics["curve"]}, out / "dir_far.png")
    return result


def table_row(name: str, m: dict) -> str:
    """One markdown row: rank-1, DIR@FAR 1% / 10%, named and accepted at the calibrated threshold, photos/s."""
    return (
        f"| {name} | {m['rank1']:.3f} | {m['dir_at_far']['0.01']:.3f} | {m['dir_at_far']['0.1']:.3f} | "
        f"{m['known_named_correctly']:.3f} | {m['unknown_accepted']:.3f} "
        f"(target FAR {m['threshold'].get('far', '-')}) | "
        f"{m['identify_photos_per_second']} |"
    )


def main() -> None:
    argv = sys.argv[1:]
    enroll_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="what enroll's --encoder takes")
    parser.add_argument("--out", required=True, help="folder for the links, the gallery, the results and metrics.json")
    parser.add_argument("--image-size", type=int, default=None, help="enroll's --image-size (a bare encoder.pt)")
    parser.add_argument("--known", type=int, default=None, help="only the first N known identities")
    parser.add_argument("--unknown", type=int, default=None, help="only the first N unknown identities")
    parser.add_argument("--workers", type=int, default=0, help="detection processes (0: one per core)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default=None, help="the row's name in the printed table")
    args = parser.parse_args(argv)
    if not (FACES / PROTOCOL / "probes.csv").is_file():
        parser.error(f"celeba-open not found under {FACES} (set FACESSL_SHARED to the folder holding data/faces)")
    if args.image_size:
        enroll_args = ["--image-size", str(args.image_size), *enroll_args]
    m = run(args.encoder, Path(args.out), enroll_args, args.known, args.unknown, args.workers, args.device)
    print("| encoder | rank-1 | DIR@FAR=1% | DIR@FAR=10% | known named at threshold | unknown accepted | photos/s |")
    print("|---|---|---|---|---|---|---|")
    print(table_row(args.name or args.encoder, m))


if __name__ == "__main__":
    main()
