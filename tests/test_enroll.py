"""enroll on real celeba-wild photos: a weights_only gallery with a calibrated threshold, recorded skips, and a
clear error (exit 2 or 3, never a traceback) for every kind of bad input of issue 16.

The encoder is a random-init ResNet18 saved as a pretrain-simclr run at 32 px: what enroll reads, not what it
knows, so these tests stay fast; benchmarks/open_set.py measures real encoders."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import CASES, SHARED
from facessl.common.gallery import load_gallery
from facessl.common.models import build_encoder
from facessl.jobs.enroll import main as enroll_main

BIN = Path(sys.executable).parent
CELEBA = SHARED / "data" / "faces" / "celeba-wild"
PROTOCOL = CELEBA / "open-set" / "celeba-open"
# three known identities of celeba-open; 7209's 013036.jpg shows two faces of similar size (78 and 70 px)
PEOPLE = ("7201", "7206", "7209")
AMBIGUOUS = "7209/013036.jpg"
SIZE = 32


def invoke(cmd, *args):
    """Run a click command in-process; a traceback (an exception other than SystemExit) fails the test."""
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def save_encoder_run(folder: Path, seed: int = 0, size: int = SIZE) -> Path:
    """A pretrain-simclr run layout holding a random-init encoder.pt and the config.json with its image size."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_encoder().state_dict(), folder / "encoder.pt")
    (folder / "config.json").write_text(json.dumps({"image_size": size}))
    return folder


def enrolment_rows(identities=PEOPLE) -> list[dict]:
    return [r for r in csv.DictReader((PROTOCOL / "enroll.csv").open()) if r["identity"] in identities]


def probe_rows(identities) -> list[dict]:
    return [r for r in csv.DictReader((PROTOCOL / "probes.csv").open()) if r["identity"] in identities]


def copy_rows(rows: list[dict], dst: Path, per_identity: int | None = None) -> Path:
    """Copy each row's photo (relative to celeba-wild/) to ``dst/<identity>/<file>``."""
    taken: dict[str, int] = {}
    for r in rows:
        if per_identity is not None and taken.get(r["identity"], 0) >= per_identity:
            continue
        taken[r["identity"]] = taken.get(r["identity"], 0) + 1
        (dst / r["identity"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CELEBA / r["image"], dst / r["identity"] / Path(r["image"]).name)
    return dst


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    return save_encoder_run(tmp_path_factory.mktemp("encoder") / "simclr")


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """The celeba-open enrolment photos of three known people, plus files that must become recorded skips."""
    root = copy_rows(enrolment_rows(), tmp_path_factory.mktemp("people") / "people")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "no_face_noise.jpg", root / "7201" / "no_face.jpg")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "notes.jpg", root / "7206" / "notes.jpg")
    (root / "7206" / "readme.txt").write_text("not a photo")
    # the same photo twice would be a free genuine match of similarity 1
    shutil.copyfile(root / "7201" / "018834.jpg", root / "7201" / "copy.jpg")
    (root / "loose.jpg").write_bytes((root / "7201" / "018834.jpg").read_bytes())
    return root


@pytest.fixture(scope="module")
def gallery(people, encoder_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery") / "gallery"
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", out, "--workers", 1)
    assert r.exit_code == 0, r.output
    return out


def test_enroll_writes_a_weights_only_gallery_with_a_calibrated_threshold(gallery, people, encoder_run):
    saved = torch.load(gallery / "gallery.pt", weights_only=True)
    assert saved["format"] == "facessl-gallery" and saved["people"] == list(PEOPLE)
    emb, labels = saved["embeddings"], saved["labels"]
    # 15 reference photos less the ambiguous one; the copy, the no-face photo and the non-images are skipped
    assert emb.shape == (14, 512) and emb.dtype == torch.float32 and labels.tolist().count(2) == 4
    assert torch.allclose(emb.norm(dim=1), torch.ones(14), atol=1e-5)
    assert all(photo.split("/")[0] == PEOPLE[i] for photo, i in zip(saved["photos"], labels.tolist()))
    assert AMBIGUOUS not in saved["photos"] and "7201/copy.jpg" not in saved["photos"]
    encoder_file = encoder_run / "encoder.pt"
    assert saved["encoder"]["location"] == str(encoder_file)
    assert saved["encoder"]["sha256"] == hashlib.sha256(encoder_file.read_bytes()).hexdigest()
    assert saved["image_size"] == SIZE and saved["flip"] is True and saved["template"] == "best"
    assert saved["detection"]["margin"] == 0.2 and saved["detection"]["image_size"] == SIZE
    # identify detects as the gallery records: phone-sized photos searched on a 2-megapixel copy
    assert saved["detection"]["detect_max_pixels"] == 2_000_000
    assert load_gallery(str(gallery)).detect_config.detect_max_pixels == 2_000_000
    threshold = saved["threshold"]
    assert threshold["method"] == "leave-one-person-out" and threshold["far"] == 0.01
    assert threshold["impostor_scores"] == 14 and threshold["genuine_scores"] == 14
    assert 0 <= threshold["genuine_acceptance"] <= 1 and threshold["impostor_acceptance"] == 0
    # 14 impostor scores cannot resolve 1%: the threshold is above all of them, and the gallery says so
    assert "cannot resolve" in threshold["note"]
    reasons = {s["photo"]: s["reason"] for s in saved["skipped"]}
    assert "2 faces of similar size" in reasons[AMBIGUOUS]
    assert reasons["7201/no_face.jpg"] == "no face detected"
    assert reasons["7201/copy.jpg"] == "the same file as 7201/018834.jpg"
    assert "not an image" in reasons["7206/notes.jpg"] and "not an image" in reasons["7206/readme.txt"]
    assert reasons["loose.jpg"] == "not inside an identity folder"
    summary = json.loads((gallery / "enrolment.json").read_text())
    assert summary["photos_per_person"] == {"7201": 5, "7206": 5, "7209": 4} and summary["threshold"] == threshold


def test_a_search_copy_too_small_for_any_face_is_refused_before_any_work(people, encoder_run, tmp_path):
    out = tmp_path / "gallery"
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", out, "--detect-max-pixels", 9)
    assert r.exit_code == 2 and "give 0 (search at full size) or at least 250000" in r.output
    assert not out.exists()


def test_leave_one_person_out_calibration_takes_each_photos_best_other_person():
    """Three people on a line: the impostor score of each photo is its best match among the other people."""
    from facessl.common.gallery import calibrate, leave_one_out_scores, threshold_at_far

    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    impostor, genuine = leave_one_out_scores(emb, labels, 3, "best")
    sims = (emb @ emb.T).tolist()
    assert impostor.tolist() == pytest.approx([sims[0][2], sims[1][2], max(sims[2][0], sims[2][1]), sims[3][2]])
    assert genuine.tolist() == pytest.approx([sims[0][1], sims[0][1]])
    # 4 scores, FAR 0.5: two may pass, the threshold lies halfway between the second and the third
    t = threshold_at_far(impostor, 0.5)
    assert (impostor >= t).sum() == 2 and t == pytest.approx((sims[1][2] + sims[0][2]) / 2)
    # FAR 0.25: one may pass, but the two highest are tied: "at most" lets neither in
    assert (impostor >= threshold_at_far(impostor, 0.25)).sum() == 0
    assert threshold_at_far(impostor, 0.01) > impostor.max()
    result = calibrate(emb, labels, 3, "mean", 0.5)
    assert result["impostor_acceptance"] <= 0.5 and result["method"] == "leave-one-person-out"


def test_threshold_given_or_taken_from_evaluate_pairs(encoder_run, tmp_path):
    people = copy_rows(enrolment_rows(("7201", "7206")), tmp_path / "people", per_identity=2)
    out = tmp_path / "given"
    r = invoke(
        enroll_main, "--people", people, "--encoder", encoder_run, "--output", out, "--threshold", 0.5, "--workers", 1
    )
    assert r.exit_code == 0, r.output
    threshold = torch.load(out / "gallery.pt", weights_only=True)["threshold"]
    assert threshold["value"] == 0.5 and threshold["method"] == "given (--threshold)"
    # with what it does on the enrolment photos: a random network's embeddings are all alike
    assert threshold["impostor_acceptance"] == 1.0 and threshold["genuine_acceptance"] == 1.0
    # an evaluate-pairs threshold.json of this encoder at this size
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    encoder_file = encoder_run / "encoder.pt"
    record = {
        "at_far": {"0.01": {"threshold": 0.97, "tar": 0.4}, "0.001": {"threshold": 0.99, "tar": 0.1}},
        "encoder": str(encoder_file),
        "encoder_sha256": hashlib.sha256(encoder_file.read_bytes()).hexdigest(),
        "image_size": SIZE,
    }
    (pairs / "threshold.json").write_text(json.dumps(record))
    args = ["--people", people, "--encoder", encoder_run, "--threshold-from", pairs / "threshold.json", "--workers", 1]
    r = invoke(enroll_main, *args, "--output", tmp_path / "from", "--far", 0.001)
    assert r.exit_code == 0, r.output
    threshold = torch.load(tmp_path / "from" / "gallery.pt", weights_only=True)["threshold"]
    assert threshold["value"] == 0.99 and threshold["method"] == "threshold-from" and threshold["pair_tar"] == 0.1
    # --threshold overrides it
    r = invoke(enroll_main, *args, "--output", tmp_path / "both", "--threshold", 0.3)
    assert (
        r.exit_code == 0
        and torch.load(tmp_path / "both" / "gallery.pt", weights_only=True)["threshold"]["value"] == 0.3
    )
    # no entry at that FAR, or another encoder's file: refused before any detection
    r = invoke(enroll_main, *args, "--output", tmp_path / "x", "--far", 0.05)
    assert r.exit_code == 3 and "no threshold at FAR 0.05" in r.stderr
    # a threshold no cosine reaches: refused at enrolment, not by identify afterwards
    seven = {**record, "at_far": {"0.01": {"threshold": 7, "tar": 0.4}}}
    (pairs / "threshold.json").write_text(json.dumps(seven))
    r = invoke(enroll_main, *args, "--output", tmp_path / "seven")
    assert r.exit_code == 3 and "threshold 7 at FAR 0.01 is not a cosine similarity" in r.stderr, r.stderr
    assert not (tmp_path / "seven" / "gallery.pt").exists()
    (pairs / "threshold.json").write_text(json.dumps({**record, "encoder_sha256": "0" * 64}))
    r = invoke(enroll_main, *args, "--output", tmp_path / "y")
    assert r.exit_code == 3 and "a threshold holds only for the embeddings it was measured on" in r.stderr


def test_evaluate_pairs_writes_threshold_json(encoder_run, tmp_path):
    from facessl.jobs.evaluate_pairs import main as evaluate_main

    rows = list(csv.DictReader((CELEBA / "pairs.csv").open()))
    same = [r for r in rows if r["same_identity"] == "1"][:6]
    different = [r for r in rows if r["same_identity"] == "0"][:6]
    images = tmp_path / "images"
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        w.writeheader()
        w.writerows(same + different)
    for r in same + different:
        for name in (r["image_a"], r["image_b"]):
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CELEBA / name, images / name)
    out = tmp_path / "eval"
    args = ["--pairs", tmp_path / "pairs.csv", "--images", images, "--encoder", encoder_run, "--output", out]
    r = invoke(evaluate_main, *args, "--image-size", SIZE, "--folds", 2)
    assert r.exit_code == 0, r.output
    t = json.loads((out / "threshold.json").read_text())
    assert t["encoder_sha256"] == hashlib.sha256((encoder_run / "encoder.pt").read_bytes()).hexdigest()
    assert t["image_size"] == SIZE and t["same_pairs"] == 6 and t["different_pairs"] == 6
    assert set(t["at_far"]) == {"0.01", "0.001"} and 0 <= t["accuracy_max"]["accuracy"] <= 1
    # 6 different pairs: not one may pass at 1%
    different_scores = [
        float(r["cosine_similarity"]) for r in csv.DictReader((out / "scores.csv").open()) if r["same_identity"] == "0"
    ]
    assert t["at_far"]["0.01"]["far"] == 0 and t["at_far"]["0.01"]["threshold"] > max(different_scores)


def test_one_person_none_or_an_empty_person_folder_is_an_error(encoder_run, tmp_path):
    one = copy_rows(enrolment_rows(("7201",)), tmp_path / "one")
    r = invoke(enroll_main, "--people", one, "--encoder", encoder_run, "--output", tmp_path / "g1")
    assert r.exit_code == 3 and "holds only '7201' of the person folders a gallery needs, at least two" in r.stderr
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "photo.jpg").write_bytes((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    r = invoke(enroll_main, "--people", tmp_path / "none", "--encoder", encoder_run, "--output", tmp_path / "g2")
    assert r.exit_code == 3 and "holds none of the person folders" in r.stderr
    r = invoke(enroll_main, "--people", tmp_path / "missing", "--encoder", encoder_run, "--output", tmp_path / "g3")
    assert r.exit_code == 3 and "empty or does not exist" in r.stderr
    (one / "Ada Lovelace").mkdir()
    copy_rows(enrolment_rows(("7206",)), one)
    r = invoke(enroll_main, "--people", one, "--encoder", encoder_run, "--output", tmp_path / "g4")
    assert r.exit_code == 3 and "person folder(s) with no photo: Ada Lovelace" in r.stderr
    assert not (tmp_path / "g4" / "gallery.pt").exists()
    # a folder named in Latin-1 bytes: every file in it is left out, and the message says why
    os.rmdir(one / "Ada Lovelace")
    latin1 = os.path.join(os.fsencode(one), b"Jos\xe9")
    os.mkdir(latin1)
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", os.path.join(latin1, b"a.jpg"))
    r = invoke(enroll_main, "--people", one, "--encoder", encoder_run, "--output", tmp_path / "g5")
    assert r.exit_code == 3 and "Traceback" not in r.stderr, r.stderr
    assert "Jos\ufffd (every file left out: file name is not valid UTF-8)" in r.stderr, r.stderr


def test_a_person_left_with_no_usable_photo_is_named(encoder_run, tmp_path):
    people = copy_rows(enrolment_rows(("7201", "7206")), tmp_path / "people")
    (people / "Nobody").mkdir()
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "no_face_noise.jpg", people / "Nobody" / "noise.jpg")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "truncated.jpg", people / "Nobody" / "cut.jpg")
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", tmp_path / "g", "--workers", 1)
    assert r.exit_code == 3 and "1 person(s) left with no usable photo: Nobody" in r.stderr
    assert "noise.jpg (no face detected)" in r.stderr and "cut.jpg (corrupt or truncated image" in r.stderr


def test_an_encoder_that_is_not_one_or_has_another_size_is_refused(people, encoder_run, tmp_path):
    bare = tmp_path / "bare.pt"
    shutil.copyfile(encoder_run / "encoder.pt", bare)
    r = invoke(enroll_main, "--people", people, "--encoder", bare, "--output", tmp_path / "g")
    assert r.exit_code == 2 and "records no image size" in r.stderr
    r = invoke(
        enroll_main, "--people", people, "--encoder", encoder_run, "--output", tmp_path / "g", "--image-size", 64
    )
    assert r.exit_code == 2 and f"was trained at {SIZE} px, not 64" in r.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    r = invoke(enroll_main, "--people", people, "--encoder", tmp_path / "other.pt", "--output", tmp_path / "g")
    assert r.exit_code == 3 and "is not a ResNet18 backbone" in r.stderr
    r = invoke(
        enroll_main,
        "--people",
        people,
        "--encoder",
        encoder_run,
        "--output",
        tmp_path / "g",
        "--representation",
        "head",
    )
    assert r.exit_code == 2 and "projection_head.pt" in r.stderr
    # a model.pt whose recorded size was altered: named as such, not taken for a bare file
    weights = torch.load(encoder_run / "encoder.pt", weights_only=True)
    model = {"model": {f"encoder.{k}": v for k, v in weights.items()}, "classes": ["a", "b"], "image_size": "64"}
    torch.save(model, tmp_path / "model.pt")
    r = invoke(enroll_main, "--people", people, "--encoder", tmp_path / "model.pt", "--output", tmp_path / "g")
    assert r.exit_code == 3 and "records image_size '64'" in r.stderr, r.stderr


def test_outputs_that_overlap_the_people_or_another_job_are_refused(people, encoder_run, tmp_path):
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", people / "gallery")
    assert r.exit_code == 2 and "overlap" in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", tmp_path / "run")
    assert r.exit_code == 2 and "holds a prepare-data output" in r.stderr


def tamper(gallery: Path, dst: Path, **changes) -> Path:
    saved = torch.load(gallery / "gallery.pt", weights_only=True)
    saved.update(changes)
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(saved, dst / "gallery.pt")
    return dst


class Payload:
    """Any class instance: a pickle that weights_only loading must refuse."""


def test_a_tampered_gallery_is_refused_with_the_field_named(gallery, tmp_path):
    from facessl.jobs.identify import main as identify_main

    saved = torch.load(gallery / "gallery.pt", weights_only=True)
    emb = saved["embeddings"]
    nan = emb.clone()
    nan[0, 0] = float("nan")
    cases = {
        "pickle": ({"format": "facessl-gallery", "payload": Payload()}, "holds pickled objects"),
        "shape": ({"embeddings": torch.nn.functional.normalize(emb[:, :100], dim=1)}, "the encoder record"),
        "rows": ({"embeddings": emb[:5]}, "labels are not an int64 (5,) tensor"),
        "nan": ({"embeddings": nan}, "embeddings hold NaN or infinite values"),
        "scale": ({"embeddings": emb * 2}, "not of unit length"),
        "labels": ({"labels": saved["labels"] + 5}, "labels outside 0..2"),
        "people": ({"people": ["a", "a", "b"]}, "not distinct non-empty names"),
        "threshold": ({"threshold": {"value": float("nan")}}, "is not a cosine similarity"),
        "detection": ({"detection": {**saved["detection"], "margin": "big"}}, "detection setting margin='big'"),
        # in range for the type, not for a detector: every photo would be skipped, or detection would never end
        "max_pixels": ({"detection": {**saved["detection"], "max_pixels": 0}}, "detection setting max_pixels=0"),
        "neighbors": (
            {"detection": {**saved["detection"], "min_neighbors": 10**12}},
            "detection setting min_neighbors=1000000000000",
        ),
        "pyramid": ({"detection": {**saved["detection"], "scale_factor": 1e300}}, "detection setting scale_factor"),
        # crops of another size than the embeddings were made from
        "crop": ({"detection": {**saved["detection"], "image_size": SIZE * 2}}, "detection setting image_size"),
        "format": ({"format": "other"}, "is not a facessl gallery"),
    }
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", photos / "plain.jpg")
    for name, (change, message) in cases.items():
        if name == "pickle":
            (tmp_path / name).mkdir()
            torch.save(change, tmp_path / name / "gallery.pt")
        else:
            tamper(gallery, tmp_path / name, **change)
        r = invoke(
            identify_main, "--gallery", tmp_path / name, "--photos", photos, "--output", tmp_path / f"{name}-out"
        )
        assert r.exit_code == 3 and message in r.stderr, (name, r.stderr)
    r = invoke(identify_main, "--gallery", tmp_path / "nowhere", "--photos", photos, "--output", tmp_path / "o")
    assert r.exit_code == 3 and "no gallery at" in r.stderr


def test_identify_refuses_an_encoder_that_does_not_fit_the_gallery(gallery, encoder_run, tmp_path):
    from facessl.jobs.identify import main as identify_main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", photos / "plain.jpg")
    other = save_encoder_run(tmp_path / "other", seed=1)
    args = ["--gallery", gallery, "--photos", photos]
    r = invoke(identify_main, *args, "--output", tmp_path / "o1", "--encoder", other)
    assert r.exit_code == 3 and "is not the one the gallery was enrolled with" in r.stderr
    # the same weights, recorded at another image size
    resized = save_encoder_run(tmp_path / "resized", seed=0, size=64)
    r = invoke(identify_main, *args, "--output", tmp_path / "o2", "--encoder", resized)
    assert (
        r.exit_code == 3
        and "gives 512-d embeddings of 64 px crops; the gallery holds 512-d embeddings of 32 px" in r.stderr
    )
    # the encoder file the gallery names was replaced
    moved = tamper(
        gallery,
        tmp_path / "moved",
        encoder={
            **torch.load(gallery / "gallery.pt", weights_only=True)["encoder"],
            "location": str(other / "encoder.pt"),
        },
    )
    r = invoke(identify_main, "--gallery", moved, "--photos", photos, "--output", tmp_path / "o3")
    assert r.exit_code == 3 and "is not the one the gallery was enrolled with" in r.stderr


@pytest.mark.slow
def test_enroll_and_identify_on_s3(s3_env, people, encoder_run, tmp_path):
    """A real S3 server process: people, encoder, gallery, photos and results all in the bucket."""
    from facessl.common.storage import open_storage

    s3 = open_storage(f"s3://{s3_env}")
    for photo in sorted(people.rglob("*")):
        if photo.is_file():
            s3.upload_file(photo, f"people/{photo.relative_to(people).as_posix()}")
    for name in ("encoder.pt", "config.json"):
        s3.upload_file(encoder_run / name, f"simclr/{name}")
    probes = copy_rows(probe_rows(("7201", "7203")), tmp_path / "probes", per_identity=2)
    for photo in sorted(probes.rglob("*.jpg")):
        s3.upload_file(photo, f"photos/{photo.relative_to(probes).as_posix()}")
    bucket = f"s3://{s3_env}"
    r = subprocess.run(
        [
            BIN / "enroll",
            "--people",
            f"{bucket}/people",
            "--encoder",
            f"{bucket}/simclr",
            "--output",
            f"{bucket}/gallery",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 7209/013036.jpg: 2 faces of similar size" in r.stderr
    gallery = torch.load(s3.local_copy("gallery/gallery.pt", tmp_path / "cache"), weights_only=True)
    assert gallery["encoder"]["location"] == f"{bucket}/simclr/encoder.pt" and len(gallery["photos"]) == 14
    r = subprocess.run(
        [
            BIN / "identify",
            "--gallery",
            f"{bucket}/gallery",
            "--photos",
            f"{bucket}/photos",
            "--output",
            f"{bucket}/results",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in s3.read_text("results/results.jsonl").splitlines()]
    assert [row["photo"] for row in rows] == sorted(p.relative_to(probes).as_posix() for p in probes.rglob("*.jpg"))
    assert json.loads(s3.read_text("results/summary.json"))["photos"] == 4


def test_s3_failures_exit_4(people, encoder_run, tmp_path):
    """An S3 endpoint nobody answers: a retryable failure, exit 4 after botocore's retries."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }
    r = subprocess.run(
        [BIN / "enroll", "--people", "s3://nobody/people", "--encoder", encoder_run, "--output", tmp_path / "g"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 4 and "s3://nobody/people" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(
        [BIN / "identify", "--gallery", "s3://nobody/gallery", "--photos", people, "--output", tmp_path / "o"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr


def test_an_ambiguous_photo_made_of_two_real_faces_is_skipped_not_guessed(tmp_path):
    """Two copies of one real face side by side: the same size, so which is the person cannot be told."""
    from facessl.common.faces import DetectConfig
    from facessl.common.gallery import _ambiguity
    from facessl.common.photos import faces_of_photo

    face = Image.open(CASES / "raw" / "Tom Hanks" / "plain.jpg").convert("RGB")
    pair = Image.new("RGB", (face.width * 2, face.height))
    pair.paste(face, (0, 0))
    pair.paste(face, (face.width, 0))
    pair.save(tmp_path / "pair.jpg")
    result = faces_of_photo((tmp_path / "pair.jpg").read_bytes(), DetectConfig(image_size=SIZE), crops="largest")
    assert len(result.faces) == 2 and result.faces[0].crop.shape == (SIZE, SIZE, 3) and result.faces[1].crop is None
    assert "2 faces of similar size" in _ambiguity(result.faces, 0.8)
    single = faces_of_photo((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes(), DetectConfig(image_size=SIZE))
    assert len(single.faces) == 1 and _ambiguity(single.faces, 0.8) is None


def test_eye_alignment_measures_and_levels_a_tilted_face(encoder_run, tmp_path):
    """A real face turned 10 degrees counter-clockwise: the eye cascade measures about -10 degrees relative to
    the upright photo, and enroll --align eyes records the alignment for identify to repeat."""
    from facessl.common.faces import DetectConfig, decode_image, detect_faces
    from facessl.common.photos import aligned_crop, eye_tilt

    cfg = DetectConfig(image_size=64)
    upright = decode_image((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    turned = upright.rotate(10, resample=Image.Resampling.BICUBIC)
    base = eye_tilt(upright, detect_faces(upright, cfg)[0][0], cfg)
    box = detect_faces(turned, cfg)[0][0]
    tilt = eye_tilt(turned, box, cfg)
    assert abs(tilt - base + 10) < 3, (tilt, base)
    crop = aligned_crop(turned, box, cfg, "eyes")
    assert crop.size == (64, 64) and crop.tobytes() != aligned_crop(turned, box, cfg, "none").tobytes()
    people = copy_rows(enrolment_rows(("7201", "7206")), tmp_path / "people", per_identity=2)
    r = invoke(enroll_main, "--people", people, "--encoder", encoder_run, "--output", tmp_path / "g", "--align", "eyes")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "g" / "gallery.pt", weights_only=True)["detection"]["align"] == "eyes"


def save_model(folder, whitening, size: int = 32):
    """A train-classifier model.pt layout with random weights and the given whitening record."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {f"encoder.{k}": v for k, v in build_encoder().state_dict().items()}
    state.update({"fc.weight": torch.zeros(2, 512), "fc.bias": torch.zeros(2)})
    record = {"model": state, "classes": ["a", "b"], "image_size": size, "head": "linear"}
    if whitening is not None:
        record["whitening"] = whitening
    torch.save(record, folder / "model.pt")
    return folder


def test_enroll_takes_the_whitening_by_default_and_refuses_a_tampered_one(people, encoder_run, tmp_path):
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(512, 512, generator=gen)).Q
    good = {"mean": torch.zeros(512), "matrix": (q @ torch.diag(torch.linspace(0.5, 2, 512)) @ q.T).float()}
    model = save_model(tmp_path / "cls", good)
    r = invoke(enroll_main, "--people", people, "--encoder", model, "--output", tmp_path / "g", "--workers", 1)
    assert r.exit_code == 0, r.output
    assert "representation whitened" in r.output
    whitened = load_gallery(str(tmp_path / "g"))
    assert whitened.encoder["representation"] == "whitened"
    r = invoke(
        enroll_main, "--people", people, "--encoder", model, "--output", tmp_path / "g2", "--workers", 1,
        "--representation", "encoder",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    plain = load_gallery(str(tmp_path / "g2"))
    assert plain.encoder["representation"] == "encoder" and plain.photos == whitened.photos
    # identify embeds with the gallery's representation: an enrolled photo finds itself (score 1)
    from facessl.jobs.identify import main as identify_main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(people / whitened.photos[0], photos / "again.jpg")
    r = invoke(identify_main, "--gallery", tmp_path / "g", "--photos", photos, "--output", tmp_path / "o")
    assert r.exit_code == 0, r.output
    face = json.loads((tmp_path / "o" / "results.jsonl").read_text())["faces"][0]
    assert face["top3"][0] == [whitened.photos[0].split("/")[0], pytest.approx(1.0, abs=1e-3)], face
    # the same crops, another geometry: whitening changes which photos look alike
    assert not torch.allclose(whitened.embeddings @ whitened.embeddings.T, plain.embeddings @ plain.embeddings.T)
    # evaluate-pairs' thresholds are cosines of the encoder's own output, not of whitened embeddings
    (tmp_path / "threshold.json").write_text(json.dumps({"at_far": {"0.01": {"threshold": 0.5}}}))
    r = invoke(
        enroll_main, "--people", people, "--encoder", model, "--output", tmp_path / "g4", "--threshold-from",
        tmp_path / "threshold.json",
    )  # fmt: skip
    assert r.exit_code == 2 and "--representation encoder" in r.stderr, r.stderr
    # a SimCLR encoder has no whitening: auto falls back to the encoder output, whitened is refused
    r = invoke(
        enroll_main, "--people", people, "--encoder", encoder_run, "--output", tmp_path / "g3",
        "--representation", "whitened",
    )  # fmt: skip
    assert r.exit_code == 2 and "holding a whitening" in r.stderr, r.stderr
    for name, bad in (
        ("nan", {**good, "mean": torch.full((512,), float("nan"))}),
        ("shape", {**good, "matrix": torch.eye(3)}),
        ("type", "a string"),
    ):
        r = invoke(
            enroll_main, "--people", people, "--encoder", save_model(tmp_path / name, bad), "--output",
            tmp_path / f"g-{name}",
        )  # fmt: skip
        assert r.exit_code == 3 and "damaged whitening" in r.stderr, (name, r.stderr)


def test_enroll_crops_at_the_margin_the_encoder_was_trained_with(people, tmp_path):
    run = save_encoder_run(tmp_path / "tight")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "crop_margin": 0.0}))
    r = invoke(enroll_main, "--people", people, "--encoder", run, "--output", tmp_path / "g", "--workers", 1)
    assert r.exit_code == 0 and "crop margin 0 (the encoder's training crops)" in r.output, r.output
    tight = load_gallery(str(tmp_path / "g"))
    assert tight.detection["margin"] == 0.0
    # --margin overrides; a run that records no margin gets prepare-data's default 0.2
    r = invoke(
        enroll_main, "--people", people, "--encoder", run, "--output", tmp_path / "g2", "--workers", 1,
        "--margin", 0.3,
    )  # fmt: skip
    assert r.exit_code == 0 and load_gallery(str(tmp_path / "g2")).detection["margin"] == 0.3, r.output
    r = invoke(enroll_main, "--people", people, "--encoder", run / "encoder.pt", "--output", tmp_path / "g3",
               "--image-size", SIZE, "--workers", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert load_gallery(str(tmp_path / "g3")).detection["margin"] == 0.0, "config.json beside the file still counts"
    plain = save_encoder_run(tmp_path / "plain")
    r = invoke(enroll_main, "--people", people, "--encoder", plain, "--output", tmp_path / "g4", "--workers", 1)
    assert r.exit_code == 0 and load_gallery(str(tmp_path / "g4")).detection["margin"] == 0.2, r.output
    # the crops differ, so do the embeddings of the same photos
    wide = load_gallery(str(tmp_path / "g2"))
    assert tight.photos == wide.photos and not torch.allclose(tight.embeddings, wide.embeddings, atol=1e-3)


def test_a_negative_margin_crops_inside_the_box_and_the_gallery_keeps_it(people, tmp_path):
    from facessl.common.faces import crop_face

    # a 100 px box whose central half is white and whose rim is black, on a grey photo
    img = Image.new("RGB", (300, 300), (128, 128, 128))
    img.paste((0, 0, 0), (100, 100, 200, 200))
    img.paste((255, 255, 255), (125, 125, 175, 175))
    inner = torch.from_numpy(np.array(crop_face(img, (100, 100, 100, 100), -0.25, 32))).float()
    box = torch.from_numpy(np.array(crop_face(img, (100, 100, 100, 100), 0.0, 32))).float()
    assert inner.min() > 240, "margin -0.25 is the box's central half: all white"
    assert box.min() < 10 and box.max() > 240, "margin 0 is the whole box: rim and centre"
    run = save_encoder_run(tmp_path / "enc")
    r = invoke(
        enroll_main, "--people", people, "--encoder", run, "--output", tmp_path / "g", "--workers", 1,
        "--margin", -0.1,
    )  # fmt: skip
    assert r.exit_code == 0 and "crop margin -0.1" in r.output, r.output
    assert load_gallery(str(tmp_path / "g")).detection["margin"] == -0.1
    # below a quarter of the box on each side, nothing would be left of a face
    r = invoke(enroll_main, "--people", people, "--encoder", run, "--output", tmp_path / "g2", "--margin", -0.3)
    assert r.exit_code == 2 and "-0.3" in r.stderr and not (tmp_path / "g2" / "gallery.pt").exists(), r.stderr


def test_the_gallery_records_a_relative_encoder_at_its_absolute_path(people, encoder_run, tmp_path, monkeypatch):
    # identify may run from another directory than enroll did
    monkeypatch.chdir(encoder_run.parent)
    r = invoke(
        enroll_main, "--people", people, "--encoder", encoder_run.name, "--output", tmp_path / "g", "--workers", 1
    )
    assert r.exit_code == 0, r.output
    assert load_gallery(str(tmp_path / "g")).encoder["location"] == str(encoder_run / "encoder.pt")


def test_sigterm_stops_enroll_and_its_detection_workers(encoder_run, tmp_path):
    import os
    import signal
    import time

    people = copy_rows(enrolment_rows(("7201", "7206", "7209", "7222")), tmp_path / "people")
    cmd = [BIN / "enroll", "--people", people, "--encoder", encoder_run, "--output", tmp_path / "g", "--workers", 2]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the detection workers: this process's children that multiprocessing spawned (not its resource tracker)
    deadline, children = time.time() + 120, []
    while not children and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        found = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "spawn_main"], capture_output=True, text=True)
        children = [int(pid) for pid in found.stdout.split()]
    assert children, "enroll finished before its workers could be seen"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4 and "stopped by SIGTERM before the gallery was written" in stderr, stderr
    assert "Traceback" not in stderr and not (tmp_path / "g" / "gallery.pt").exists()
    time.sleep(1)
    alive = []
    for pid in children:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"detection workers {alive} outlived enroll"
