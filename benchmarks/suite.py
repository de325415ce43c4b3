"""Benchmark suite (not a test): the benchmarks of ../shared/data/faces/README.md through the real jobs.

For each benchmark: prepare-data once (one split shared by every arm), pretrain-simclr on the train split
only (labels unused; val and test images never enter pretraining; --unlabeled-pool adds the photos of the
raw set's identities outside glint6 / celeba-wild-75, beyond the benchmark's own raw input, as a lever),
then the arms, each a train-classifier run on the same prepared data:
    scratch              supervised fine-tuning from random weights
    random + linear      linear probe on a random-init encoder's features
    SimCLR + kNN         weighted kNN vote of the SimCLR train embeddings (no training)
    SimCLR + linear      linear probe on the SimCLR encoder
    SimCLR + fine-tune   fine-tuning from the SimCLR encoder
    SimCLR + distill     SimCLRv2's distillation: a student from the SimCLR encoder learns the SimCLR +
                         fine-tune model's predictions on every train image, beside the labelled subset
    ImageNet + fine-tune fine-tuning from torchvision's ImageNet ResNet18 file, when --imagenet-weights is given
``celeba-pairs`` pretrains on the celeba-wild photos that are in no pair and runs evaluate-pairs.
``celeba-open`` (open-set identification, benchmarks/open_set.py) prepares what its encoders may see (glint24 and
the celeba-wild identities with fewer than 20 photos), pretrains SimCLR on it, fine-tunes a supervised backbone on
its labels (train-classifier), and runs each encoder (random-init, SimCLR, supervised) through the real enroll
and identify on the protocol: rank-1, DIR@FAR=1% and 10%, the rates at the calibrated threshold, identify's
photos/s, and a figure of DIR against FAR. Its train stage also needs the raw celeba-wild photos.

Writes ``results.md`` and ``results.json`` under --out (plus every job's own outputs), one row per
benchmark and arm: test top-1, top-3, macro-F1 (verification: 10-fold accuracy and ROC AUC), labelled
images, pretraining images and time, epochs, wall time, hardware, and the command and commit that made the
row. A later run into the same --out replaces the rows of the benchmarks it runs and keeps the others.

Two stages, run together by default: ``--stage prepare`` is the CPU work (prepare-data, and for
celeba-pairs the face crops of the pair photos, made once), ``--stage train`` everything after it on the
prepared data found under --out (pretraining, the arms, evaluate-pairs on those crops). Split, they let the
detection run where the photos are and the training on a GPU machine that receives only the prepared data
(benchmarks/gpu/).

Usage:
  python benchmarks/suite.py --out runs/suite                        # full settings (for a GPU)
  python benchmarks/suite.py --out runs/suite-cpu --reduced          # CPU: small images, few epochs
  python benchmarks/suite.py --out runs/suite --benchmarks glint24-20 --imagenet-weights resnet18-f37072fd.pth
  python benchmarks/suite.py --out runs/suite --stage prepare        # then, elsewhere: --stage train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from checkout import facessl_path

REPO = Path(__file__).resolve().parents[1]
# facessl from this checkout, installed or not (a GPU machine's own python has no install)
CHECKOUT_PATH = facessl_path()
# the shared data: FACESSL_SHARED, or ../shared beside the checkout
FACES = Path(os.environ.get("FACESSL_SHARED") or REPO.parent / "shared") / "data" / "faces"
GLINT6 = "Leonardo DiCaprio,Barack Obama,Keanu Reeves,Tom Hanks,Keira Knightley,Jennifer Aniston"

# name -> (raw folder, prepare-data options, labels per class for the arms or None for all)
BENCHMARKS = {
    "glint6": ("glint24", ["--classes", GLINT6, "--on-no-face", "keep-full"], None),
    "glint24-20": ("glint24", ["--on-no-face", "keep-full"], 20),
    # + --classes: the 75 with 30 photos
    "celeba-wild-75": ("celeba-wild", ["--min-images", "10"], None),
    "celeba-pairs": ("celeba-wild", [], None),
    # the training input is benchmarks/open_set.py's training_raw_folder; celeba-wild's raw photos are probed.
    # Margin 0: the training jobs record it and enroll crops the probes' faces the same way (docs/open-set.md)
    "celeba-open": ("celeba-wild", ["--on-no-face", "keep-full", "--min-images", "5", "--margin", "0"], None),
}
# full: the GPU recipe of the shared README; reduced: what a 2-core CPU finishes in minutes
SETTINGS = {
    "full": {
        "size": 112,
        "simclr_epochs": 200,
        "simclr_batch": 512,
        "warmup": 10,
        "ft_epochs": 30,
        "probe_epochs": 100,
        "ft_batch": 128,
        "checkpoint_every": 25,
    },
    "reduced": {
        "size": 32,
        "simclr_epochs": 8,
        "simclr_batch": 128,
        "warmup": 1,
        "ft_epochs": 10,
        "probe_epochs": 30,
        "ft_batch": 64,
        "checkpoint_every": 0,
    },
}
FINETUNE = [
    "--mode",
    "finetune",
    "--optimizer",
    "adamw",
    "--lr",
    "1e-3",
    "--weight-decay",
    "0.05",
    "--label-smoothing",
    "0.1",
    "--warmup-epochs",
    "1",
]
# the fine-tune recipe; the teacher is the SimCLR + fine-tune run
DISTILL = ["--mode", "distill", *FINETUNE[2:]]
PROBE = ["--mode", "linear-probe", "--optimizer", "adamw", "--lr", "1e-2", "--weight-decay", "0"]
ARMS = (
    "scratch",
    "random + linear",
    "SimCLR + kNN",
    "SimCLR + linear",
    "SimCLR + fine-tune",
    "SimCLR + distill",
    "ImageNet + fine-tune",
)


def job(name: str, *args, log) -> float:
    """Run one job (``prepare-data`` -> ``python -m facessl.jobs.prepare_data``, this checkout's code with this
    interpreter); returns its wall time in seconds. Exits the suite with the job's exit code on failure."""
    started = time.time()
    cmd = [sys.executable, "-m", "facessl.jobs." + name.replace("-", "_"), *map(str, args)]
    log(f"{name} " + " ".join(cmd[3:]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [CHECKOUT_PATH, os.environ.get("PYTHONPATH")]))}
    proc = _RUNNING["job"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate()
    # Ctrl-C: the job stops at its own safe point (a checkpoint) before the suite
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        print(
            f"interrupted during {name}: run the same command again to go on (pretraining resumes from its checkpoint)",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        _RUNNING["job"] = None
    # the job's own exit code, so bad input (3) and transient failures (4) stay apart
    if proc.returncode != 0:
        code = proc.returncode
        # ended by a signal before its own handler was installed (a SIGTERM then is still a retry)
        if code < 0:
            code = 4 if -code == signal.SIGTERM else 128 - code
            signame = next((sig.name for sig in signal.Signals if sig == -proc.returncode), str(-proc.returncode))
            print(f"{name} was ended by signal {signame}", file=sys.stderr)
        print(f"{name} failed with exit code {code}:\n{stdout[-3000:]}\n{stderr[-3000:]}", file=sys.stderr)
        sys.exit(code)
    return time.time() - started


_RUNNING: dict = {"job": None}


def _on_sigterm(signum, frame):
    """SIGTERM (a preemption) goes to the running job, which stops at its own safe point and exits 4 (that
    exit ends the suite, with the job's output); between jobs the suite exits 4 at once."""
    if (proc := _RUNNING["job"]) is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    else:
        print("stopped by SIGTERM between jobs: run the same command again to go on", file=sys.stderr)
        sys.exit(4)


def pairs_raw_folder(out: Path) -> Path:
    """celeba-wild without the photos of pairs.csv (hard links or copies), the pretraining input of celeba-pairs."""
    from facessl.common.verify import read_pairs_file

    src = FACES / "celeba-wild"
    in_pairs = {name for a, b, _ in read_pairs_file(str(src / "pairs.csv")) for name in (a, b)}
    dst = out / "celeba-pairs-pretrain-raw"
    # rebuilt every time: a changed pairs.csv must not leave pair photos in
    shutil.rmtree(dst, ignore_errors=True)
    for photo in sorted(src.glob("*/*")):
        rel = f"{photo.parent.name}/{photo.name}"
        if rel not in in_pairs and photo.is_file():
            (dst / photo.parent.name).mkdir(parents=True, exist_ok=True)
            # prepare-data refuses symlinks out of its input: hard link, else copy
            try:
                os.link(photo, dst / rel)
            except OSError:
                shutil.copyfile(photo, dst / rel)
    return dst


def arm_slug(arm: str) -> str:
    """'SimCLR + fine-tune' -> 'simclr-fine-tune': the arm's output folder and its name for --arms."""
    return arm.replace(" + ", "-").replace(" ", "-").lower()


def prepare_benchmark(name: str, out: Path, s: dict, log, unlabeled_pool: bool = False) -> None:
    """The CPU stage of one benchmark under out/<name>/: prepare-data into ``prepared/`` (and for
    celeba-pairs the pairs file and the face crops of its photos, ``pairs.csv`` and ``pair-crops/``), with
    the time it took in ``prepare.json``."""
    raw_name, prepare_opts, _ = BENCHMARKS[name]
    root = out / name
    raw = pairs_raw_folder(out) if name == "celeba-pairs" else FACES / raw_name
    if name == "celeba-open":
        import open_set

        raw = open_set.training_raw_folder(out, FACES)
    extra = ["--split", "1,0,0", "--min-images", "1"] if name == "celeba-pairs" else []
    # chosen by photos in the raw folder, not by faces found (a miss must not drop one)
    if name == "celeba-wild-75":
        extra = [
            "--classes",
            ",".join(
                sorted(d.name for d in raw.iterdir() if d.is_dir() and sum(f.is_file() for f in d.iterdir()) >= 30)
            ),
        ]
    pool = uses_pool(name, unlabeled_pool)
    seconds = job(
        "prepare-data",
        "--input",
        raw,
        "--output",
        root / "prepared",
        "--image-size",
        s["size"],
        *prepare_opts,
        *extra,
        *(["--unlabeled-pool"] if pool else []),
        log=log,
    )
    # detection is CPU work: crop the pair photos once, here, with prepare-data's chain
    if name == "celeba-pairs":
        from facessl.common.verify import write_pair_crops

        started = time.time()
        shutil.copyfile(FACES / "celeba-wild" / "pairs.csv", root / "pairs.csv")
        write_pair_crops(
            str(root / "pairs.csv"), str(FACES / "celeba-wild"), str(root / "pair-crops"), s["size"], log=log
        )
        seconds += time.time() - started
    (root / "prepare.json").write_text(
        json.dumps({"seconds": round(seconds), "image_size": s["size"], "unlabeled_pool": pool})
    )


def uses_pool(name: str, unlabeled_pool: bool) -> bool:
    """Benchmarks that take some identities of their raw set may pretrain on the others' photos too."""
    return unlabeled_pool and name in ("glint6", "celeba-wild-75")


def prepared_problem(name: str, out: Path, s: dict, unlabeled_pool: bool) -> str | None:
    """Why out/<name>/ does not hold this benchmark's CPU stage at these settings, or None when it does."""
    root = out / name
    needed = [root / "prepared" / "manifest.json", root / "prepare.json"]
    if name == "celeba-pairs":
        needed += [root / "pairs.csv", root / "pair-crops" / "crops.json"]
    if missing := [str(p) for p in needed if not p.is_file()]:
        return f"{name}: {', '.join(missing)} missing"
    try:
        done = json.loads((root / "prepare.json").read_text())
        crops = json.loads((root / "pair-crops" / "crops.json").read_text()) if name == "celeba-pairs" else {}
        if not (
            isinstance(done, dict)
            and isinstance(done["seconds"], (int, float))
            and isinstance(crops, dict)
            and (name != "celeba-pairs" or isinstance(crops["without_detected_face"], list))
        ):
            # (not assert: python -O would drop the check)
            raise ValueError("damaged")
    except (ValueError, KeyError, TypeError, OSError):
        return f"{name}: its prepare.json or crops.json is damaged: run --stage prepare again"
    if (done.get("image_size"), done.get("unlabeled_pool")) != (s["size"], uses_pool(name, unlabeled_pool)):
        return (
            f"{name} was prepared at {done.get('image_size')} px, unlabeled pool {done.get('unlabeled_pool')}; "
            f"this run needs {s['size']} px, unlabeled pool {uses_pool(name, unlabeled_pool)}"
        )
    return None


def run_benchmark(
    name: str,
    out: Path,
    s: dict,
    device: str,
    imagenet: str | None,
    log,
    only: set[str] | None = None,
    unlabeled_pool: bool = False,
) -> list[dict]:
    """The training stage of one benchmark on what :func:`prepare_benchmark` left under out/<name>/:
    pretrain-simclr, then the arms (or evaluate-pairs); returns the table rows."""
    root = out / name
    per_class = BENCHMARKS[name][2]
    pool = uses_pool(name, unlabeled_pool)
    prepared = root / "prepared"
    simclr = root / "simclr"
    job(
        "pretrain-simclr",
        "--data",
        prepared,
        "--output",
        simclr,
        "--epochs",
        s["simclr_epochs"],
        "--batch-size",
        s["simclr_batch"],
        "--image-size",
        s["size"],
        "--warmup-epochs",
        s["warmup"],
        "--checkpoint-every",
        s["checkpoint_every"],
        "--device",
        device,
        "--log-every",
        0,
        *(["--use-unlabeled"] if pool else []),
        log=log,
    )
    # its training time, also when reused
    summary = json.loads((simclr / "summary.json").read_text())
    base = {
        "benchmark": name,
        "image_size": s["size"],
        "simclr_epochs": s["simclr_epochs"],
        "pretraining_images": summary["images"],
        "unlabeled_pool": pool,
        "prepare_s": json.loads((root / "prepare.json").read_text())["seconds"],
        "simclr_s": round(summary["seconds"]),
    }
    if name == "celeba-pairs":
        t = job(
            "evaluate-pairs",
            "--pairs",
            root / "pairs.csv",
            "--images",
            root / "pair-crops",
            "--no-detect",
            "--encoder",
            simclr,
            "--output",
            root / "pairs",
            "--image-size",
            s["size"],
            "--device",
            device,
            log=log,
        )
        m = json.loads((root / "pairs" / "metrics.json").read_text())
        crops = json.loads((root / "pair-crops" / "crops.json").read_text())
        return [
            {
                **base,
                "arm": "SimCLR embeddings",
                "accuracy": m["accuracy"],
                "accuracy_std": m["accuracy_std"],
                "roc_auc": m["roc_auc"],
                "pairs": m["pairs_evaluated"],
                "labelled_images": 0,
                "epochs": 0,
                "photos_without_detected_face": len(crops["without_detected_face"]),
                "seconds": round(t),
                "outputs": str(root / "pairs"),
            }
        ]

    if name == "celeba-open":
        return run_open_set(root, s, device, base, log)
    labels = ["--labels-per-class", per_class] if per_class else []
    arms = [
        ("scratch", [*FINETUNE, "--epochs", s["ft_epochs"]]),
        ("random + linear", [*PROBE, "--epochs", s["probe_epochs"]]),
        ("SimCLR + kNN", ["--mode", "knn", "--encoder", simclr]),
        ("SimCLR + linear", [*PROBE, "--epochs", s["probe_epochs"], "--encoder", simclr]),
        ("SimCLR + fine-tune", [*FINETUNE, "--epochs", s["ft_epochs"], "--encoder", simclr]),
        (
            "SimCLR + distill",
            [
                *DISTILL,
                "--epochs",
                s["ft_epochs"],
                "--encoder",
                simclr,
                "--teacher",
                root / arm_slug("SimCLR + fine-tune"),
            ],
        ),
    ]
    if imagenet:
        arms.append(("ImageNet + fine-tune", [*FINETUNE, "--epochs", s["ft_epochs"], "--init", imagenet]))
    rows = []
    for arm, opts in arms:
        if only and arm_slug(arm) not in only:
            continue
        run = root / arm_slug(arm)
        t = job(
            "train-classifier",
            "--data",
            prepared,
            "--output",
            run,
            "--image-size",
            s["size"],
            "--batch-size",
            s["ft_batch"],
            "--device",
            device,
            *labels,
            *opts,
            log=log,
        )
        m = json.loads((run / "metrics.json").read_text())
        epochs = 0 if arm == "SimCLR + kNN" else int(opts[opts.index("--epochs") + 1])
        rows.append(
            {
                **base,
                "arm": arm,
                "top1": m["test"]["top1"],
                "top3": m["test"]["top3"],
                "macro_f1": m["test"]["macro_f1"],
                "test_images": m["test"]["n"],
                "labelled_images": m["train_images"],
                "epochs": epochs,
                "seconds": round(t),
                "outputs": str(run),
            }
        )
    return rows


OPEN_SET_ENCODERS = ("random-init", "SimCLR", "supervised")


def run_open_set(root: Path, s: dict, device: str, base: dict, log) -> list[dict]:
    """celeba-open's rows: a supervised backbone fine-tuned on the prepared training identities (train-classifier,
    the fine-tune recipe), then random-init, SimCLR and that backbone each through benchmarks/open_set.py's real
    enroll and identify; the DIR-vs-FAR curves of all three in figures/celeba-open/dir_far.png."""
    import open_set
    import torch

    from facessl.common.models import build_encoder

    supervised = root / "supervised"
    train_s = job(
        "train-classifier",
        "--data",
        root / "prepared",
        "--output",
        supervised,
        "--image-size",
        s["size"],
        "--batch-size",
        s["ft_batch"],
        "--device",
        device,
        *FINETUNE,
        "--epochs",
        s["ft_epochs"],
        log=log,
    )
    random_init = root / "random-init"
    random_init.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_encoder().state_dict(), random_init / "encoder.pt")
    (random_init / "config.json").write_text(json.dumps({"image_size": s["size"]}))
    labelled = json.loads((supervised / "metrics.json").read_text())["train_images"]
    encoders = {"random-init": random_init, "SimCLR": root / "simclr", "supervised": supervised}
    rows, curves = [], {}
    for arm, encoder in encoders.items():
        m = open_set.run(
            str(encoder),
            root / f"open-set-{arm_slug(arm)}",
            # faces cut inside the box: the backbone's training crops (scale 0.6-1) showed them larger than the
            # whole box does (docs/open-set.md, the crop margin)
            ["--margin=-0.15"] if arm == "supervised" else [],
            device=device,
            faces=FACES,
            job=lambda name, *args: job(name, *args, log=log),
        )
        curves[arm] = m["curve"]
        rows.append(
            {
                **base,
                "arm": arm,
                "rank1": m["rank1"],
                "dir_far_1": m["dir_at_far"]["0.01"],
                "dir_far_10": m["dir_at_far"]["0.1"],
                "known_named": m["known_named_correctly"],
                "unknown_accepted": m["unknown_accepted"],
                "target_far": m["threshold"]["far"],
                "photos_per_second": m["identify_photos_per_second"],
                "labelled_images": labelled if arm == "supervised" else 0,
                "epochs": s["ft_epochs"] if arm == "supervised" else 0,
                "seconds": round((train_s if arm == "supervised" else 0) + m["enroll_wall_s"] + m["identify_wall_s"]),
                "outputs": str(root / f"open-set-{arm_slug(arm)}"),
            }
        )
    figure = root.parent / "figures" / "celeba-open" / "dir_far.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    open_set.plot_dir_far(curves, figure)
    return rows


def hardware(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device("cuda" if device == "auto" else device).index or 0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def collect_figures(out: Path, rows: list[dict]) -> dict[str, list[str]]:
    """Copy the plots of SimCLR (loss, kNN monitor), of SimCLR + fine-tune (confusion matrix, training
    curves) and of verification (ROC) into out/figures/<benchmark>/, so the table and its figures can be
    published together (every other arm's plots stay in its own folder); returns, per benchmark of
    ``rows``, the files in its figures folder relative to out (also those of rows made by an earlier run
    elsewhere whose figures folder was brought along)."""
    for r in rows:
        if r["arm"] not in FIGURE_ARMS:
            continue
        runs = [Path(r["outputs"]), Path(r["outputs"]).parent / "simclr"]
        for run in runs:
            for png in sorted(run.glob("*.png")):
                prefix = "simclr" if run.name == "simclr" else arm_slug(r["arm"])
                dst = out / "figures" / r["benchmark"] / f"{prefix}-{png.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, dst)
    benchmarks = dict.fromkeys(r["benchmark"] for r in rows)
    listed = {b: sorted(str(f.relative_to(out)) for f in (out / "figures" / b).glob("*.png")) for b in benchmarks}
    return {b: files for b, files in listed.items() if files}


def git_commit() -> str:
    """The checkout's commit (with '+changes' when it has uncommitted ones); where there is no git
    repository (a copy of the tree on a GPU machine), ``$FACESSL_COMMIT`` or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FACESSL_COMMIT", "unknown")


def merge_rows(out: Path, rows: list[dict], settings: str) -> list[dict]:
    """The rows of an earlier results.json in ``out`` (same settings) for the benchmarks not in ``rows``,
    followed by ``rows``: running a subset of the benchmarks updates the table instead of replacing it."""
    path = out / "results.json"
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if old.get("settings") != settings:
        return rows
    fresh = {r["benchmark"] for r in rows}
    kept = [r for r in old.get("rows", []) if r["benchmark"] not in fresh]
    order = list(BENCHMARKS)
    return sorted(kept + rows, key=lambda r: order.index(r["benchmark"]))


ROW_NUMBERS = {
    "classification": (
        "top1",
        "top3",
        "macro_f1",
        "labelled_images",
        "epochs",
        "pretraining_images",
        "simclr_epochs",
        "simclr_s",
        "seconds",
    ),
    "open-set": (
        "rank1",
        "dir_far_1",
        "dir_far_10",
        "known_named",
        "unknown_accepted",
        "photos_per_second",
        "pretraining_images",
        "simclr_epochs",
        "simclr_s",
        "seconds",
    ),
    "verification": (
        "accuracy",
        "accuracy_std",
        "roc_auc",
        "pretraining_images",
        "simclr_epochs",
        "simclr_s",
        "seconds",
    ),
}
# the rows whose run folders' plots are published
FIGURE_ARMS = ("SimCLR + fine-tune", "SimCLR embeddings")


def earlier_table_problem(path: Path) -> str | None:
    """Why ``path``, an earlier results.json that :func:`merge_rows` and :func:`write_tables` would read, is not
    one this suite wrote (None: absent, or usable): each row a JSON object of a known benchmark with the
    numbers its table line prints."""
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc}"
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        return "no list of rows"
    for i, row in enumerate(table["rows"]):
        if not isinstance(row, dict) or row.get("benchmark") not in BENCHMARKS or not isinstance(row.get("arm"), str):
            return f"row {i + 1} names no known benchmark and arm"
        kind = "verification" if "accuracy" in row else "open-set" if "rank1" in row else "classification"
        if bad := [
            k for k in ROW_NUMBERS[kind] if isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float))
        ]:
            return f"row {i + 1} has no number for {', '.join(bad)}"
        if row["arm"] in FIGURE_ARMS and not isinstance(row.get("outputs"), str):
            return f"row {i + 1} names no outputs folder"
    return None


def write_tables(out: Path, rows: list[dict], meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    runs = sorted({(r.get("command", "?"), r.get("commit", "?")) for r in rows})
    lines = [
        f"Settings: {meta['settings']} ({meta['settings_detail']}); hardware: {meta['hardware']}; "
        "made by " + "; ".join(f"`{cmd}` at commit {commit}" for cmd, commit in runs),
        "",
        "| benchmark | arm | test top-1 | top-3 | macro-F1 | labelled images | SimCLR images (time) | epochs "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        simclr = f"{r['pretraining_images']} ({r['simclr_s']} s)"
        if "rank1" in r:
            continue
        if "accuracy" in r:
            lines.append(
                f"| {r['benchmark']} | {r['arm']} | verification acc {r['accuracy']:.3f} +- "
                f"{r['accuracy_std']:.3f} | ROC AUC {r['roc_auc']:.3f} | - | 0 | {simclr} | "
                f"SimCLR {r['simclr_epochs']} | {r['seconds']} |"
            )
        else:
            lines.append(
                f"| {r['benchmark']} | {r['arm']} | {r['top1']:.3f} | {r['top3']:.3f} | {r['macro_f1']:.3f} | "
                f"{r['labelled_images']} | {simclr} | {r['epochs']} (SimCLR {r['simclr_epochs']}) | "
                f"{r['seconds']} |"
            )
    if open_rows := [r for r in rows if "rank1" in r]:
        lines += [
            "",
            "Open-set identification (celeba-open, through enroll and identify; unknown probes accepted at the "
            "gallery's calibrated threshold):",
            "",
            "| benchmark | encoder | rank-1 | DIR@FAR=1% | DIR@FAR=10% | known named | unknown accepted (target) "
            "| identify photos/s | labelled images | SimCLR images (time) | wall time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in open_rows:
            lines.append(
                f"| {r['benchmark']} | {r['arm']} | {r['rank1']:.3f} | {r['dir_far_1']:.3f} | {r['dir_far_10']:.3f} | "
                f"{r['known_named']:.3f} | {r['unknown_accepted']:.3f} ({r['target_far']}) | "
                f"{r['photos_per_second']} | {r['labelled_images']} | {r['pretraining_images']} ({r['simclr_s']} s) | "
                f"{r['seconds']} |"
            )
    for benchmark, files in collect_figures(out, rows).items():
        lines += ["", f"Figures, {benchmark}: " + ", ".join(f"[{Path(f).stem}]({f})" for f in files)]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for every run and results.md / results.json")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset")
    parser.add_argument("--reduced", action="store_true", help="CPU settings: 32 px, few epochs")
    parser.add_argument(
        "--stage",
        choices=["all", "prepare", "train"],
        default="all",
        help="prepare: the CPU stage only (prepare-data, pair crops); train: the rest, on what an "
        "earlier --stage prepare left in --out; all: both",
    )
    parser.add_argument("--simclr-epochs", type=int, default=None, help="override the settings' SimCLR epochs")
    parser.add_argument("--imagenet-weights", default=None, help="torchvision resnet18 ImageNet file: adds that arm")
    parser.add_argument(
        "--arms",
        default="",
        help="comma-separated subset of arms by folder name "
        "(scratch, random-linear, simclr-knn, simclr-linear, simclr-fine-tune, simclr-distill, imagenet-fine-tune); "
        "default all; celeba-pairs has its one arm, evaluate-pairs, whatever this says",
    )
    parser.add_argument(
        "--unlabeled-pool",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="glint6, celeba-wild-75: also pretrain on the photos of the raw set's other identities "
        "(beyond the benchmark's raw input: a lever to measure, not the benchmark)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (checked before any work)")
    args = parser.parse_args()
    names = list(dict.fromkeys(n.strip() for n in args.benchmarks.split(",") if n.strip()))
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown or not names:
        parser.error(f"unknown benchmarks {unknown or repr(args.benchmarks)}: choose from {', '.join(BENCHMARKS)}")
    known_arms = {arm_slug(arm) for arm in ARMS}
    only = {a.strip() for a in args.arms.split(",") if a.strip()} or None
    if only and only - known_arms:
        parser.error(f"unknown arms {sorted(only - known_arms)}: choose from {', '.join(sorted(known_arms))}")
    if only and "simclr-distill" in only and "simclr-fine-tune" not in only:
        if lacking := [
            n
            for n in names
            if n != "celeba-pairs" and not (Path(args.out) / n / "simclr-fine-tune" / "model.pt").is_file()
        ]:
            parser.error(
                f"--arms simclr-distill needs its teacher, the simclr-fine-tune arm: add it, or run it "
                f"first into this --out ({', '.join(lacking)} lack it)"
            )
    if only and "imagenet-fine-tune" in only and not args.imagenet_weights:
        parser.error("--arms imagenet-fine-tune needs --imagenet-weights")
    if args.imagenet_weights and not Path(args.imagenet_weights).is_file():
        parser.error(f"--imagenet-weights: no such file {args.imagenet_weights}")
    if args.simclr_epochs is not None and args.simclr_epochs < 1:
        parser.error("--simclr-epochs must be at least 1")
    settings = "reduced" if args.reduced else "full"
    s = {**SETTINGS[settings], **({"simclr_epochs": args.simclr_epochs} if args.simclr_epochs else {})}
    if args.stage != "train":
        needed = {FACES / BENCHMARKS[n][0] for n in names} | (
            {FACES / "celeba-wild" / "pairs.csv"} if "celeba-pairs" in names else set()
        )
        if "celeba-open" in names:
            protocol = FACES / "celeba-wild" / "open-set" / "celeba-open"
            needed |= {FACES / "glint24", protocol / "enroll.csv", protocol / "probes.csv"}
        if missing := sorted(str(p) for p in needed if not p.exists()):
            parser.error(f"benchmark data not found: {missing} (set FACESSL_SHARED to the folder holding data/faces)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: {exc.strerror}")
    if args.stage == "train":
        problems = [p for n in names if (p := prepared_problem(n, out, s, args.unlabeled_pool))]
        # its probes are raw photos, enrolled and identified in this stage
        if "celeba-open" in names and not (FACES / "celeba-wild" / "open-set" / "celeba-open" / "probes.csv").is_file():
            problems.append(f"celeba-open: its raw photos are not under {FACES} (set FACESSL_SHARED)")
        if problems:
            parser.error(
                "--stage train needs an earlier --stage prepare into the same --out with the same "
                "settings: " + "; ".join(problems)
            )
    # a subset run would merge into it: stop now,
    if problem := earlier_table_problem(out / "results.json"):
        parser.error(
            f"{out / 'results.json'} is not a results.json of this suite ({problem}): move it away or "
            "pick another --out"
            # not after hours of training
        )

    from facessl.common.errors import FacesslError

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # a wrong device or weights file fails now, not after the CPU stage
        if args.stage != "prepare":
            check_training_options(args.device, args.imagenet_weights)
        # nor a broken pairs.csv after other benchmarks
        if args.stage != "train" and "celeba-pairs" in names:
            check_pairs_file(FACES / "celeba-wild")
        if args.stage != "train":
            for name in names:
                prepare_benchmark(name, out, s, log, args.unlabeled_pool)
        if args.stage == "prepare":
            print(f"prepared {', '.join(names)} in {out}: run --stage train with the same --out and settings")
            return
        meta = {
            "settings": settings,
            "settings_detail": ", ".join(f"{k} {v}" for k, v in s.items()),
            "hardware": hardware(args.device),
        }
        made_by = {"command": "python " + " ".join(sys.argv), "commit": git_commit()}
        rows = []
        for name in names:
            started = time.time()
            rows += [
                {**r, **made_by}
                for r in run_benchmark(name, out, s, args.device, args.imagenet_weights, log, only, args.unlabeled_pool)
            ]
            log(f"== {name} done in {time.time() - started:.0f} s")
            write_tables(out, merge_rows(out, rows, settings), meta)
    # bad data found by the suite itself (a broken pairs.csv, unusable weights)
    except FacesslError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    # between jobs (a running job is stopped in job())
    except KeyboardInterrupt:
        print("interrupted: run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    print((out / "results.md").read_text())


def check_pairs_file(root: Path, folds: int = 10) -> None:
    """Raise BadInputError when ``root/pairs.csv`` is not a pairs file, names photos missing under ``root``,
    or has fewer than ``folds`` pairs of either kind (evaluate-pairs would refuse it after pretraining)."""
    from facessl.common.errors import BadInputError
    from facessl.common.verify import read_pairs_file

    pairs = read_pairs_file(str(root / "pairs.csv"))
    if missing := sorted({n for a, b, _ in pairs for n in (a, b) if not (root / n).is_file()}):
        raise BadInputError(f"{root / 'pairs.csv'} names {len(missing)} photos missing under {root}, e.g. {missing[0]}")
    same = sum(s for _, _, s in pairs)
    if min(same, len(pairs) - same) < folds:
        raise BadInputError(
            f"{root / 'pairs.csv'} has {same} same and {len(pairs) - same} different pairs: "
            f"{folds}-fold verification needs at least {folds} of each"
        )


def check_training_options(device: str, imagenet_weights: str | None) -> None:
    """Raise UsageError for a device this machine lacks and BadInputError for a weights file that is not a
    ResNet18, before any job runs."""
    from facessl.common.simclr import load_init_encoder
    from facessl.common.training import pick_device

    pick_device(device)
    if imagenet_weights:
        load_init_encoder(imagenet_weights)


if __name__ == "__main__":
    main()
