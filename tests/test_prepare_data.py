"""prepare-data on the tricky raw inputs of ../shared/cases/prepare-data and on real face photos."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import CASES, GLINT24, SHARED
from facessl.common.data import iter_shard_samples
from facessl.jobs.prepare_data import main as prepare_main


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "raw"
    shutil.copytree(CASES / "raw", raw)
    (raw / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (raw / "Tom Hanks" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (raw / "Tom Hanks" / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07")
    out = tmp_path_factory.mktemp("out") / "prepared"
    result = CliRunner().invoke(
        prepare_main,
        ["--input", str(raw), "--output", str(out), "--min-images", "1", "--image-size", "96", "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "manifest.json").read_text())


def crops_by_source(out, manifest):
    by_key = {}
    for split in ("train", "val", "test"):
        for shard in sorted((out / split).glob("shard-*.tar")):
            for key, jpeg, label in iter_shard_samples(shard):
                by_key[key] = (jpeg, label)
    return {r["source"]: by_key[r["key"]] for r in manifest["records"] if r["status"] == "ok"}


def test_every_case_has_its_expected_outcome(cases_run):
    out, manifest = cases_run
    expected = json.loads((CASES / "expected.json").read_text())
    records = {r["source"]: r for r in manifest["records"]}
    crops = crops_by_source(out, manifest)
    assert set(records) == set(expected), "every raw file is recorded, hidden/system files are not"
    for source, outcome in expected.items():
        rec = records[source]
        if outcome in ("face", "one"):
            assert rec["status"] == "ok", (source, rec)
            assert rec["split"] in ("train", "val", "test")
            assert source in crops
        else:
            assert rec["status"] == "skipped", (source, rec)
            assert rec["reason"], source
            assert source not in crops
    assert sum(src == "Keanu Reeves/two_faces.jpg" for src in crops) == 1


def test_crops_are_colour_at_the_requested_size(cases_run, tmp_path):
    out, manifest = cases_run
    for source, (jpeg, label) in crops_by_source(out, manifest).items():
        path = tmp_path / "c.jpg"
        path.write_bytes(jpeg)
        img = Image.open(path)
        assert img.size == (96, 96) and img.mode == "RGB", source
        assert manifest["classes"][label] == source.split("/")[0]
    gray = crops_by_source(out, manifest)["Tom Hanks/plain.jpg"][0]
    path.write_bytes(gray)
    r, g, b = Image.open(path).split()
    assert r.tobytes() != b.tobytes(), "colour photos stay in colour"


def test_skip_reasons_say_why(cases_run):
    _, manifest = cases_run
    reasons = {r["source"]: r["reason"] for r in manifest["records"] if r["status"] == "skipped"}
    assert reasons["Tom Hanks/empty.jpg"] == "empty file"
    assert "not an image" in reasons["Tom Hanks/notes.jpg"]
    assert "truncated" in reasons["Tom Hanks/truncated.jpg"]
    assert reasons["Tom Hanks/no_face_noise.jpg"] == "no face detected"
    assert reasons["Keanu Reeves/dup_b.jpg"] == "duplicate of Keanu Reeves/dup_a.jpg"


def test_oversized_image_refused_before_decoding(tmp_path):
    raw = tmp_path / "raw" / "Someone"
    raw.mkdir(parents=True)
    Image.new("RGB", (4000, 3000)).save(raw / "huge.png")
    shutil.copyfile(CASES / "raw" / "Tom Hanks" / "plain.jpg", raw / "ok.jpg")
    result = CliRunner().invoke(
        prepare_main,
        [
            "--input",
            str(tmp_path / "raw"),
            "--output",
            str(tmp_path / "o"),
            "--min-images",
            "1",
            "--max-pixels",
            "1000000",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    reasons = {
        r["source"]: r.get("reason") for r in json.loads((tmp_path / "o" / "manifest.json").read_text())["records"]
    }
    assert reasons["Someone/huge.png"].startswith("too large")
    assert reasons["Someone/ok.jpg"] is None


def test_unknown_class_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        prepare_main,
        ["--input", str(CASES / "raw"), "--output", str(tmp_path / "o"), "--classes", "Tom Hanks,Nobody At All"],
    )
    assert result.exit_code == 3
    assert "Nobody At All" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(prepare_main, ["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 3 and "empty" in result.output


def test_real_photos_split_stratified_without_overlap(prepared_subset):
    manifest = json.loads((prepared_subset / "manifest.json").read_text())
    ok = [r for r in manifest["records"] if r["status"] == "ok"]
    assert len(ok) == 240 and len({r["source"] for r in ok}) == 240
    for name, n in manifest["counts"]["per_class"]["test"].items():
        assert n == 8, name
        assert manifest["counts"]["per_class"]["val"][name] == 8
        assert manifest["counts"]["per_class"]["train"][name] == 64


def test_split_is_reproducible_and_seeded(glint_subset, tmp_path):
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    def splits(seed, name):
        cfg = PrepareConfig(
            detect=DetectConfig(image_size=32, on_no_face="keep-full"),
            seed=seed,
            workers=1,
            classes=("Tom Hanks",),
            min_images=1,
        )
        m = prepare_dataset(str(glint_subset), str(tmp_path / name), cfg, log=lambda *_: None)
        return {r["source"]: r.get("split") for r in m["records"]}, m["dataset_id"]

    (split_a, id_a), (split_b, id_b), (split_c, id_c) = splits(7, "a"), splits(7, "b"), splits(8, "c")
    assert split_a == split_b and split_a != split_c
    # the id is the content's: the same crops keep it (a rerun of the main job resumes its finished runs)
    assert id_a == id_b and id_a != id_c


def test_unlabeled_pool_keeps_other_identities(glint_subset, tmp_path):
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    cfg = PrepareConfig(
        detect=DetectConfig(image_size=32, on_no_face="keep-full"),
        workers=1,
        classes=("Tom Hanks", "Barack Obama"),
        unlabeled_pool=True,
    )
    m = prepare_dataset(str(glint_subset), str(tmp_path / "p"), cfg, log=lambda *_: None)
    assert m["classes"] == ["Barack Obama", "Tom Hanks"]
    assert m["counts"]["splits"]["unlabeled"] == 80
    assert set(m["counts"]["per_class"]["unlabeled"]) == {"Keira Knightley"}
    assert (tmp_path / "p" / "unlabeled" / "shard-000000.tar").is_file()


def test_small_photo_found_upscaled_unless_the_copy_exceeds_max_pixels():
    """A real celeba-wild photo shrunk to 53x80 px: only the 2x search finds its face, and a --max-pixels
    below the 2x copy's size skips that search rather than allocating past the bound."""
    from facessl.common.faces import DetectConfig, detect_face

    img = Image.open(SHARED / "data" / "faces" / "celeba-wild" / "7201" / "007710.jpg").convert("RGB")
    img.thumbnail((80, 80))
    found = detect_face(img, DetectConfig(min_face=20))
    assert found is not None and found[1].endswith("_x2"), found
    assert detect_face(img, DetectConfig(min_face=20, upscale_below=0)) is None
    assert detect_face(img, DetectConfig(min_face=20, max_pixels=4 * img.size[0] * img.size[1] - 1)) is None


def test_rerun_with_fewer_shards_removes_the_old_ones(tmp_path):
    """The output holds only the shards the new manifest lists (and the user's own files)."""
    out = tmp_path / "prepared"
    args = [
        "--input",
        str(CASES / "raw"),
        "--output",
        str(out),
        "--min-images",
        "1",
        "--image-size",
        "32",
        "--workers",
        "1",
    ]
    assert CliRunner().invoke(prepare_main, [*args, "--shard-size", "1"]).exit_code == 0
    assert len(list((out / "train").glob("shard-*.tar"))) > 1
    (out / "train" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(prepare_main, [*args, "--shard-size", "1000"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("*/shard-*.tar"))
    assert on_disk == sorted(k for keys in manifest["shards"].values() for k in keys)
    assert len(manifest["shards"]["train"]) == 1 and (out / "train" / "notes.txt").read_text() == "mine"
    assert "removed" in result.output


def test_keep_full_skips_photos_too_small_to_hold_a_face(tmp_path):
    """keep-full used to keep a 1x1 or a 5000x1 image, blown up to a crop of one smeared pixel row."""
    from PIL import Image

    raw = tmp_path / "raw" / "Someone"
    raw.mkdir(parents=True)
    Image.new("RGB", (1, 1), (200, 150, 120)).save(raw / "dot.png")
    Image.new("RGB", (5000, 1), (200, 150, 120)).save(raw / "line.png")
    shutil.copyfile(next(iter(sorted((GLINT24 / "Tom Hanks").iterdir()))), raw / "crop.jpg")
    result = CliRunner().invoke(
        prepare_main,
        [
            "--input",
            str(tmp_path / "raw"),
            "--output",
            str(tmp_path / "o"),
            "--min-images",
            "1",
            "--workers",
            "1",
            "--on-no-face",
            "keep-full",
        ],
    )
    assert result.exit_code == 0, result.output
    records = {r["source"]: r for r in json.loads((tmp_path / "o" / "manifest.json").read_text())["records"]}
    for name in ("dot.png", "line.png"):
        assert (
            records[f"Someone/{name}"]["reason"]
            == "no face, and a side under --min-face 30 px: too small to keep whole"
        )
    assert records["Someone/crop.jpg"]["status"] == "ok"


def test_empty_val_or_test_split_is_warned_about(tmp_path):
    result = CliRunner().invoke(
        prepare_main,
        [
            "--input",
            str(CASES / "raw"),
            "--output",
            str(tmp_path / "o"),
            "--min-images",
            "1",
            "--workers",
            "1",
            "--split",
            "1,0,0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: the val and test splits are empty: pretrain-simclr can use this dataset" in result.output


def test_a_phone_sized_photo_is_searched_scaled_down_and_cropped_at_full_size():
    """A real photo enlarged 6x (past a phone's 12 MP): the search runs on a copy scaled down to
    detect_max_pixels, the box comes back in the photo's pixels where the face is, and the crop cut from the
    full-size photo shows the face the original photo's crop shows."""
    import io

    import numpy as np

    from facessl.common.faces import DetectConfig, decode_image, detect_face, detect_faces, process_photo

    original = decode_image((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    factor = 6
    big = original.resize((original.width * factor, original.height * factor), Image.Resampling.BICUBIC)
    assert big.width * big.height > DetectConfig().detect_max_pixels
    cfg = DetectConfig(image_size=96)
    box, detector = detect_face(original, cfg)
    big_box, big_detector = detect_face(big, cfg)
    assert big_detector == detector == "frontal"
    # the same face: the box's centre and side agree with the original's scaled up, to a few percent of the side
    side = box[2] * factor
    centre = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2]) * factor
    big_centre = np.array([big_box[0] + big_box[2] / 2, big_box[1] + big_box[3] / 2])
    assert np.abs(big_centre - centre).max() < 0.1 * side and abs(big_box[2] - side) < 0.15 * side
    assert detect_faces(big, cfg)[0][0] == big_box
    # the crops agree to within JPEG and resampling differences (measured: 1.7 levels; the original's crop
    # shifted by a fifth of the face differs by 40)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    crops = [
        np.asarray(Image.open(io.BytesIO(process_photo(data, cfg).crop_jpeg)), dtype=float)
        for data in ((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes(), buf.getvalue())
    ]
    assert np.abs(crops[0] - crops[1]).mean() < 8


def test_a_panorama_keeps_its_height_in_the_search():
    """A 20000x300 strip with a real face 150 px tall: the search copy is bounded in pixels, not in its longest
    side, so the face stays large enough to find (measured: a copy 1600 px wide, 24 px tall, finds nothing)."""
    from facessl.common.faces import DetectConfig, decode_image, detect_face

    photo = decode_image((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    face = photo.crop((150, 80, 470, 400)).resize((150, 150), Image.Resampling.BICUBIC)
    strip = Image.new("RGB", (20000, 300), (128, 128, 128))
    strip.paste(face, (12000, 75))
    cfg = DetectConfig()
    assert strip.width * strip.height > cfg.detect_max_pixels
    found = detect_face(strip, cfg)
    assert found is not None
    (x, y, w, h), _ = found
    assert 12000 <= x + w / 2 <= 12150 and 75 <= y + h / 2 <= 225 and w > 75


@pytest.mark.parametrize("value", ["1", "8", "249999"])
def test_a_search_copy_too_small_for_any_face_is_refused(tmp_path, value):
    result = CliRunner().invoke(
        prepare_main,
        ["--input", str(CASES / "raw"), "--output", str(tmp_path / "out"), "--detect-max-pixels", value],
    )
    assert result.exit_code == 2
    assert "give 0 (search at full size) or at least 250000" in result.output
    assert not (tmp_path / "out").exists()
