"""identify over a whole collection, open-set: every face of every photo (recursive), results.jsonl and
summary.json as issue 16 specifies, unreadable photos recorded, a rerun that resumes, shards that cover a
collection exactly once, and the refusals (results inside the photos, another gallery). The slow test runs a
reduced celeba-open through benchmarks/open_set.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_enroll import CELEBA, SIZE, copy_rows, enrolment_rows, probe_rows, save_encoder_run

from conftest import CASES, REPO
from facessl.jobs.enroll import main as enroll_main
from facessl.jobs.identify import main as identify_main

BIN = Path(sys.executable).parent


def invoke(cmd, *args, env=None):
    result = CliRunner().invoke(cmd, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Two known people (celeba-open's 7201 and 7206, five reference photos each), random-init encoder."""
    root = tmp_path_factory.mktemp("open-set")
    encoder = save_encoder_run(root / "simclr")
    people = copy_rows(enrolment_rows(("7201", "7206")), root / "people")
    r = invoke(enroll_main, "--people", people, "--encoder", encoder, "--output", root / "gallery", "--workers", 1)
    assert r.exit_code == 0, r.output
    return root / "gallery"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Probes of a known (7201) and an unknown (7203) person, a group photo two folders down, and files that
    cannot be read: not an image, truncated, too many pixels, too many bytes; a hidden file (ignored)."""
    root = copy_rows(probe_rows(("7201", "7203")), tmp_path_factory.mktemp("collection") / "photos", per_identity=2)
    (root / "trip" / "day 1").mkdir(parents=True)
    shutil.copyfile(CASES / "raw" / "Keanu Reeves" / "two_faces.jpg", root / "trip" / "day 1" / "group.jpg")
    (root / "notes.txt").write_text("not a photo")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "truncated.jpg", root / "truncated.jpg")
    # 56 megapixels of one colour: a small file over the 50-megapixel limit
    Image.new("L", (8000, 7000)).save(root / "huge.png")
    # sparse: 200 MiB that take no disk
    with open(root / "big.jpg", "wb") as f:
        f.truncate(200 * 1024 * 1024)
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


UNREADABLE = {
    "notes.txt": "not an image",
    "truncated.jpg": "corrupt or truncated image",
    "huge.png": "too large: 8000x7000 pixels exceeds the limit",
    "big.jpg": "over the 104,857,600-byte limit",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_face_of_every_photo_is_named_or_unknown(gallery, collection, tmp_path):
    out = tmp_path / "results"
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", out, "--workers", 2)
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out / "results.jsonl")
    listed = sorted(p.relative_to(collection).as_posix() for p in collection.rglob("*") if p.is_file())
    assert [row["photo"] for row in rows] == [k for k in listed if k != ".DS_Store"]
    by_photo = {row["photo"]: row for row in rows}
    for name, reason in UNREADABLE.items():
        assert reason in by_photo[name]["error"] and by_photo[name]["faces"] == [], by_photo[name]
    threshold = json.loads((gallery / "enrolment.json").read_text())["threshold"]["value"]
    group = by_photo["trip/day 1/group.jpg"]["faces"]
    assert len(group) == 2 and group[0]["box"][2] * group[0]["box"][3] >= group[1]["box"][2] * group[1]["box"][3]
    faces = [f for row in rows for f in row["faces"]]
    assert len(faces) >= 5
    for face in faces:
        assert set(face) == {"box", "identity", "score", "top3"} and len(face["box"]) == 4
        assert [n for n, _ in face["top3"]] in (["7201", "7206"], ["7206", "7201"])
        assert face["score"] == face["top3"][0][1] >= face["top3"][1][1]
        assert face["identity"] == (face["top3"][0][0] if face["score"] >= round(threshold, 4) else None)
    summary = json.loads((out / "summary.json").read_text())
    named = sum(f["identity"] is not None for f in faces)
    assert summary["photos"] == len(rows) and summary["faces"] == len(faces) and summary["errors"] == 4
    assert summary["named"] == named and summary["unknown"] == len(faces) - named and summary["seconds"] > 0
    # a lower threshold names more: --threshold overrides the gallery's
    r = invoke(
        identify_main, "--gallery", gallery, "--photos", collection, "--output", tmp_path / "all", "--threshold", -1
    )
    assert r.exit_code == 0 and json.loads((tmp_path / "all" / "summary.json").read_text())["unknown"] == 0


def test_two_shards_cover_the_collection_exactly_once(gallery, collection, tmp_path):
    from facessl.common.collection import shard_of

    out = tmp_path / "results"
    args = ["--gallery", gallery, "--photos", collection, "--output", out, "--num-shards", 2, "--workers", 1]
    r = invoke(identify_main, *args, "--shard-index", 1)
    assert r.exit_code == 0 and "results.jsonl comes with the last shard" in r.output, r.output
    assert not (out / "results.jsonl").exists()
    first = read_jsonl(next((out / "parts" / "1-of-2").glob("*.jsonl")))
    assert first and all(shard_of(row["photo"], 2) == 1 for row in first)
    # the other shard's index from an Indexed Job's environment
    r = invoke(identify_main, *args, env={"JOB_COMPLETION_INDEX": "0"})
    assert r.exit_code == 0 and "wrote" in r.output and "results.jsonl and summary.json" in r.output, r.output
    rows = read_jsonl(out / "results.jsonl")
    photos = [row["photo"] for row in rows]
    assert len(photos) == len(set(photos)) == 9 and json.loads((out / "summary.json").read_text())["shards"] == 2
    counts = [json.loads((out / "shards" / f"{i}-of-2.json").read_text())["photos"] for i in range(2)]
    assert sum(counts) == 9 and min(counts) > 0
    r = invoke(identify_main, *args, "--shard-index", 2)
    assert r.exit_code == 2 and "--shard-index 2 is not in 0..1" in r.stderr


def test_photos_added_after_a_sharded_run_hold_back_the_merge_until_their_shard_reruns(gallery, tmp_path):
    from facessl.common.collection import shard_of

    photos = copy_rows(probe_rows(("7201", "7203")), tmp_path / "photos", per_identity=3)
    out = tmp_path / "results"
    args = ["--gallery", gallery, "--photos", photos, "--output", out, "--num-shards", 2, "--workers", 1]
    for index in (0, 1):
        assert invoke(identify_main, *args, "--shard-index", index).exit_code == 0
    assert len(read_jsonl(out / "results.jsonl")) == 6
    copy_rows(probe_rows(("7206",)), photos / "more", per_identity=4)
    gone = sorted(p for p in photos.rglob("*.jpg") if "more" not in p.parts)[0]
    gone.unlink()
    added = [p.relative_to(photos).as_posix() for p in (photos / "more").rglob("*.jpg")]
    late = [k for k in added if shard_of(k, 2) == 1]
    assert late and len(late) < len(added), "the test needs new photos in both shards"
    r = invoke(identify_main, *args, "--shard-index", 0)
    assert r.exit_code == 0 and f"{len(late)} photos" in r.output and "run those shards again" in r.output, r.output
    assert not (out / "results.jsonl").exists(), "results of the collection as it was are not left to pass for it"
    r = invoke(identify_main, *args, "--shard-index", 1)
    assert r.exit_code == 0, r.output
    photos_done = [row["photo"] for row in read_jsonl(out / "results.jsonl")]
    assert len(photos_done) == 9 and gone.relative_to(photos).as_posix() not in photos_done
    assert set(added) <= set(photos_done)


def test_a_rerun_after_sigterm_resumes_and_skips_what_is_done(gallery, collection, tmp_path):
    photos = tmp_path / "photos"
    # (the 200 MiB sparse file would be copied whole)
    shutil.copytree(collection, photos, ignore=shutil.ignore_patterns("big.jpg", "huge.png"))
    copy_rows(probe_rows(("7201", "7206", "7203")), photos / "more", per_identity=4)
    out = tmp_path / "results"
    cmd = [BIN / "identify", "--gallery", gallery, "--photos", photos, "--output", out, "--chunk", 1, "--workers", 1]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((out / "parts").rglob("*.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 4 and "stopped by SIGTERM" in stderr and "run again to resume" in stderr, stderr
    assert not (out / "results.jsonl").exists()
    done = sum(len(read_jsonl(p)) for p in (out / "parts").rglob("*.jsonl"))
    total = sum(1 for p in photos.rglob("*") if p.is_file() and p.name != ".DS_Store")
    assert 0 < done < total
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{total} photos, {done} already done" in r.stdout, r.stdout + r.stderr
    photos_done = [row["photo"] for row in read_jsonl(out / "results.jsonl")]
    assert len(photos_done) == len(set(photos_done)) == total
    # a rerun of a finished collection does nothing new
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{total} photos, {total} already done" in r.stdout


def test_a_rerun_with_another_gallery_is_refused(gallery, collection, tmp_path):
    out = tmp_path / "results"
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", out, "--workers", 1)
    assert r.exit_code == 0, r.output
    other = tmp_path / "other-gallery"
    people = copy_rows(enrolment_rows(("7201", "7209")), tmp_path / "people", per_identity=2)
    r = invoke(
        enroll_main, "--people", people, "--encoder", gallery.parent / "simclr", "--output", other, "--workers", 1
    )
    assert r.exit_code == 0, r.output
    r = invoke(identify_main, "--gallery", other, "--photos", collection, "--output", out)
    assert r.exit_code == 2 and f"holds results made with another gallery ({gallery})" in r.stderr, r.stderr
    assert "delete that folder to start over" in r.stderr
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", out, "--threshold", 0.5)
    assert r.exit_code == 2 and "another threshold" in r.stderr


def test_refused_locations_and_mixed_modes(gallery, collection, tmp_path):
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", collection / "results")
    assert r.exit_code == 2 and "lies inside --photos" in r.stderr
    assert not (collection / "results").exists()
    before = sorted(p.name for p in collection.parent.iterdir())
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", collection.parent)
    assert r.exit_code == 2 and "contains --photos" in r.stderr
    assert sorted(p.name for p in collection.parent.iterdir()) == before
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection, "--output", gallery)
    assert r.exit_code == 2 and "holds a gallery" in r.stderr
    r = invoke(identify_main, "--gallery", gallery, "--photos", collection)
    assert r.exit_code == 2 and "--output missing" in r.stderr
    r = invoke(
        identify_main, "--gallery", gallery, "--photos", collection, "--output", tmp_path / "o", "--model", "m.pt"
    )
    assert r.exit_code == 2 and "--model belong to the one-photo mode" in r.stderr
    r = invoke(identify_main)
    assert r.exit_code == 2 and "give --model and --photo" in r.stderr
    (tmp_path / "empty").mkdir()
    r = invoke(identify_main, "--gallery", gallery, "--photos", tmp_path / "empty", "--output", tmp_path / "o")
    assert r.exit_code == 3 and "no photos under" in r.stderr


def test_roundabout_locations_damaged_parts_and_a_failed_first_run(gallery, collection, tmp_path):
    args = ["--gallery", gallery, "--workers", 1]
    # a first run that finds no photos must not tie its output to the wrong --photos
    r = invoke(identify_main, *args, "--photos", tmp_path / "typo", "--output", tmp_path / "real")
    assert r.exit_code == 3 and "no photos under" in r.stderr, r.stderr
    # the output given through a link, and the photos spelt another way, are the same folders
    (tmp_path / "real").mkdir(exist_ok=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = invoke(identify_main, *args, "--photos", collection, "--output", tmp_path / "link")
    assert r.exit_code == 0, r.output
    total = len(read_jsonl(tmp_path / "real" / "results.jsonl"))
    (tmp_path / "sub").mkdir()
    r = invoke(identify_main, *args, "--photos", f"{collection}/", "--output", tmp_path / "sub" / ".." / "real")
    assert r.exit_code == 0 and f"{total} photos, {total} already done" in r.output, r.output
    # a part line that is JSON but not a result: a clear refusal, never a traceback
    part = next((tmp_path / "real" / "parts").rglob("*.jsonl"))
    good = part.read_text().splitlines()[0]
    for bad in (
        {"photo": 5, "faces": []},
        {"photo": "zz.jpg", "faces": [{"box": [1, 2, 3, 4]}]},
        {"photo": "zz.jpg", "faces": "abc"},
    ):
        part.write_text(f"{good}\n{json.dumps(bad)}\n")
        r = invoke(identify_main, *args, "--photos", collection, "--output", tmp_path / "real")
        assert r.exit_code == 3 and "line 2 is not a result line" in r.stderr, (bad, r.output)
    # a device this machine does not have is the command's fault
    r = invoke(identify_main, *args, "--photos", collection, "--output", tmp_path / "o", "--device", "garbage")
    assert r.exit_code == 2 and "unknown device 'garbage'" in r.stderr, r.stderr


def test_a_file_name_that_is_not_utf8_is_left_out_with_a_warning(gallery, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", photos / "plain.jpg")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", photos / os.fsdecode(b"caf\xe9.jpg"))
    # a link to a folder is not walked either, and says so
    (photos / "album").symlink_to(CASES / "raw" / "Tom Hanks", target_is_directory=True)
    r = invoke(identify_main, "--gallery", gallery, "--photos", photos, "--output", tmp_path / "o", "--workers", 1)
    assert r.exit_code == 0 and "left out 1 files whose names are not valid UTF-8" in r.output, r.output
    assert "left out 1 links to folders" in r.output and "album" in r.output
    assert [row["photo"] for row in read_jsonl(tmp_path / "o" / "results.jsonl")] == ["plain.jpg"]


def test_shards_are_a_function_of_the_key_alone():
    from facessl.common.collection import shard_of

    keys = [f"album/{i:04d}.jpg" for i in range(400)]
    shards = [shard_of(k, 3) for k in keys]
    assert shards == [shard_of(k, 3) for k in reversed(keys)][::-1]
    assert all(shards.count(i) > 100 for i in range(3))


@pytest.mark.slow
def test_reduced_celeba_open_benchmark_through_the_real_jobs(tmp_path):
    """benchmarks/open_set.py on 5 known and 3 unknown identities (25 enrolment photos, 215 probes)."""
    encoder = save_encoder_run(tmp_path / "simclr", size=SIZE)
    out = tmp_path / "bench"
    cmd = [sys.executable, REPO / "benchmarks" / "open_set.py", "--encoder", encoder, "--out", out]
    r = subprocess.run(
        [str(c) for c in [*cmd, "--known", 5, "--unknown", 3, "--", "--template", "mean"]],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["known_probes"] == 125 and m["unknown_probes"] == 90 and m["known_identities"] == 5
    assert m["enroll_args"] == ["--template", "mean"]
    assert 0 <= m["dir_at_far"]["0.01"] <= m["dir_at_far"]["0.1"] <= m["rank1"] <= 1
    # five people: a random network's rank-1 is near chance (0.2), not near zero or one
    assert 0.05 < m["rank1"] < 0.6
    assert 0 <= m["unknown_accepted"] <= 1 and m["identify_photos_per_second"] > 0
    assert (out / "dir_far.png").stat().st_size > 5000
    assert "| " + str(encoder) + " | " in r.stdout
    # the probes are links to the shared photos, not copies
    probe = next((out / "probes" / "7201").iterdir())
    assert os.path.samefile(probe, CELEBA / "7201" / probe.name) or probe.stat().st_size > 0
