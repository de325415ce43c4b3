"""evaluate-pairs: the LFW-style threshold protocol on known scores, and the job on real celeba-wild pairs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED
from facessl.common.errors import BadInputError, UsageError
from facessl.common.models import Classifier, build_encoder
from facessl.common.verify import best_threshold, fold_accuracy, read_pairs

CELEBA = SHARED / "data" / "faces" / "celeba-wild"


def test_best_threshold_separates_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 1, 1])
    t = best_threshold(scores, same)
    assert 0.3 < t < 0.7
    # best: all one kind
    assert best_threshold(scores, 1 - same) < 0.1 or best_threshold(scores, 1 - same) > 0.9


def test_fold_accuracy_is_perfect_on_separable_and_near_chance_on_noise():
    rng = np.random.default_rng(0)
    same = np.repeat([0, 1], 200)
    separable = fold_accuracy(np.where(same == 1, 0.8, 0.2) + rng.normal(0, 0.05, 400), same)
    assert separable["accuracy"] == 1.0 and len(separable["thresholds"]) == 10
    noise = fold_accuracy(rng.normal(0, 1, 400), same)
    # the threshold is chosen on other folds, so no fitting to noise
    assert 0.35 < noise["accuracy"] < 0.65


def test_fold_accuracy_needs_enough_pairs_of_each_kind():
    with pytest.raises(BadInputError):
        fold_accuracy(np.zeros(12), np.array([1] * 11 + [0]))


def test_read_pairs_rejects_bad_files():
    assert read_pairs("image_a,image_b,same_identity\na.jpg,b.jpg,1\n", "p.csv") == [("a.jpg", "b.jpg", 1)]
    # one spelling per photo: the suite keeps pair photos out of pretraining by name
    assert read_pairs("image_a,image_b,same_identity\n./7/a.jpg,7//b.jpg,0\n", "p.csv") == [("7/a.jpg", "7/b.jpg", 0)]
    # the line of the file, blank lines counted
    with pytest.raises(BadInputError, match="line 4"):
        read_pairs("image_a,image_b,same_identity\na.jpg,b.jpg,1\n\n../x.jpg,b.jpg,1\n", "p.csv")
    # over the csv module's field size limit
    with pytest.raises(BadInputError, match="after line 1 is not a CSV row"):
        read_pairs("image_a,image_b,same_identity\n" + "x" * 200_000 + ".jpg,b.jpg,1\n", "p.csv")
    for text in (
        "a,b,c\n1,2,3\n",
        "image_a,image_b,same_identity\na.jpg,b.jpg,yes\n",
        "image_a,image_b,same_identity\n",
        "image_a,image_b,same_identity\n   ,b.jpg,1\n",
    ):
        with pytest.raises(BadInputError):
            read_pairs(text, "p.csv")


def test_repeated_pairs_and_self_pairs_are_left_out_and_recorded():
    dropped = {}
    text = (
        "image_a,image_b,same_identity\na.jpg,b.jpg,1\nb.jpg,./a.jpg,1\nc.jpg,c.jpg,1\nc.jpg,d.jpg,0\na.jpg,b.jpg,1\n"
    )
    assert read_pairs(text, "p.csv", dropped) == [("a.jpg", "b.jpg", 1), ("c.jpg", "d.jpg", 0)]
    assert dropped == {
        "line 3": "the pair of line 2 again",
        "line 4": "c.jpg paired with itself",
        "line 6": "the pair of line 2 again",
    }
    with pytest.raises(
        BadInputError, match="line 3: b.jpg and a.jpg are labelled same_identity 0 here and 1 on line 2"
    ):
        read_pairs("image_a,image_b,same_identity\na.jpg,b.jpg,1\nb.jpg,a.jpg,0\n", "p.csv")


def test_evaluate_pairs_job_on_real_photos(tmp_path):
    """40 real celeba-wild pairs (20 same, 20 different), a random-init encoder: the job runs end to end,
    writes its three outputs, and an untrained network scores near chance."""
    rows = list(csv.DictReader((CELEBA / "pairs.csv").open()))
    chosen = [r for r in rows if r["same_identity"] == "1"][:20] + [r for r in rows if r["same_identity"] == "0"][:20]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        writer.writeheader()
        writer.writerows(chosen)
        writer.writerow({"image_a": "missing/x.jpg", "image_b": chosen[0]["image_b"], "same_identity": "1"})
        writer.writerow({"image_a": chosen[1]["image_b"], "image_b": chosen[1]["image_a"], "same_identity": "1"})
    torch.manual_seed(0)
    torch.save(build_encoder().state_dict(), tmp_path / "encoder.pt")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "evaluate-pairs"),
            "--pairs",
            str(pairs),
            "--images",
            str(CELEBA),
            "--encoder",
            str(tmp_path / "encoder.pt"),
            "--output",
            str(out),
            "--image-size",
            "48",
            "--folds",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # the repeated pair counted once
    assert metrics["pairs"] == 41 and metrics["pairs_evaluated"] == 40
    assert metrics["rows_left_out"] == {"line 43": "the pair of line 3 again"}
    assert list(metrics["unreadable_photos"]) == ["missing/x.jpg"]
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and 0.3 <= metrics["accuracy"] <= 0.9 and metrics["folds"] == 5
    assert (out / "roc.png").stat().st_size > 0
    assert len((out / "scores.csv").read_text().splitlines()) == 41
    assert "ROC AUC" in r.stdout


def _pairs_sample(n_each: int = 10) -> list[dict]:
    rows = list(csv.DictReader((CELEBA / "pairs.csv").open()))
    return [r for r in rows if r["same_identity"] == "1"][:n_each] + [r for r in rows if r["same_identity"] == "0"][
        :n_each
    ]


def _random_encoder(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(build_encoder().state_dict(), path)
    return path


def test_pair_crops_made_once_score_like_detecting_inside_evaluate_pairs(tmp_path):
    """The suite's CPU stage crops the pair photos once (write_pair_crops) and the GPU stage embeds the crops
    whole (--no-detect): the pair scores match those of evaluate-pairs detecting by itself, up to the JPEG
    re-encoding of the crops."""
    from click.testing import CliRunner

    from facessl.common.verify import evaluate_pairs, write_pair_crops
    from facessl.jobs.evaluate_pairs import main as evaluate_main

    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        writer.writeheader()
        writer.writerows(_pairs_sample())
    encoder = _random_encoder(tmp_path / "encoder.pt")
    direct = evaluate_pairs(
        str(pairs), str(CELEBA), str(encoder), str(tmp_path / "direct"), 48, 5, "cpu", log=lambda *a: None
    )
    crops = write_pair_crops(str(pairs), str(CELEBA), str(tmp_path / "crops"), 48, log=lambda *a: None)
    assert crops["photos"] == direct["photos"] and not crops["unreadable_photos"]
    assert len(crops["without_detected_face"]) == direct["photos_without_detected_face"]
    assert json.loads((tmp_path / "crops" / "crops.json").read_text())["image_size"] == 48
    r = CliRunner().invoke(
        evaluate_main,
        [
            "--pairs",
            str(pairs),
            "--images",
            str(tmp_path / "crops"),
            "--no-detect",
            "--encoder",
            str(encoder),
            "--output",
            str(tmp_path / "from-crops"),
            "--image-size",
            "48",
            "--folds",
            "5",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    from_crops = json.loads((tmp_path / "from-crops" / "metrics.json").read_text())
    assert from_crops["photos_without_detected_face"] == 0 and from_crops["detection"] is False
    scores = [
        np.array([float(row["cosine_similarity"]) for row in csv.DictReader((tmp_path / run / "scores.csv").open())])
        for run in ("direct", "from-crops")
    ]
    assert len(scores[0]) == len(scores[1]) == 20
    assert np.corrcoef(*scores)[0, 1] > 0.99 and np.abs(scores[0] - scores[1]).max() < 0.02


def test_messy_pairs_file_byte_order_mark_and_commas_in_paths(tmp_path):
    """Excel's UTF-8 CSV starts with a byte-order mark; a folder name may hold a comma: both work, and
    scores.csv quotes such paths so it reads back."""
    images = tmp_path / "images"
    chosen = _pairs_sample(5)
    for row in chosen:
        for key in ("image_a", "image_b"):
            dst = images / row[key].replace("/", ", the one/", 1)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((CELEBA / row[key]).read_bytes())
            row[key] = dst.relative_to(images).as_posix()
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        writer.writeheader()
        writer.writerows(chosen)
    assert pairs.read_bytes().startswith(b"\xef\xbb\xbf")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "evaluate-pairs"),
            "--pairs",
            str(pairs),
            "--images",
            str(images),
            "--encoder",
            str(_random_encoder(tmp_path / "encoder.pt")),
            "--output",
            str(out),
            "--image-size",
            "32",
            "--folds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 10 and rows[0]["image_a"] == chosen[0]["image_a"] and ", the one/" in rows[0]["image_a"]


def test_unusable_output_or_images_are_named_before_any_work(tmp_path):
    from click.testing import CliRunner

    from facessl.jobs.evaluate_pairs import main as evaluate_main

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "image_a,image_b,same_identity\na/1.jpg,b/2.jpg,0\na/1.jpg,a/3.jpg,1\nb/2.jpg,b/4.jpg,1\na/3.jpg,b/4.jpg,0\n"
    )
    encoder = str(_random_encoder(tmp_path / "encoder.pt"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["--pairs", str(pairs), "--encoder", encoder, "--device", "cpu", "--folds", "2"]
    r = CliRunner().invoke(evaluate_main, [*args, "--images", str(tmp_path / "nowhere"), "--output", str(blocker)])
    # the output, before the (missing) photos
    assert r.exit_code == 3 and "a-file" in r.output, r.output
    r = CliRunner().invoke(
        evaluate_main, [*args, "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]
    )
    assert r.exit_code == 3 and "none of the 4 pair images could be read (for example a/1.jpg: not found" in r.output
    # too few pairs for the folds: found from the pairs file, before any photo is read or embedded
    r = CliRunner().invoke(
        evaluate_main, [*args[:-2], "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]
    )
    assert r.exit_code == 3 and "10-fold accuracy needs at least 10 same" in r.output and "none of" not in r.output


def test_outputs_over_the_inputs_and_overflowing_encoders_are_refused(tmp_path):
    """evaluate-pairs writing its scores.csv over the pairs file, pair crops written over the photos through
    '..' or a link: exit 2 before anything is written. An encoder whose finite weights overflow to inf in
    the embeddings: exit 3, not a traceback from scikit-learn."""
    from click.testing import CliRunner

    from facessl.common.verify import write_pair_crops
    from facessl.jobs.evaluate_pairs import main as evaluate_main

    images = tmp_path / "images"
    chosen = _pairs_sample(10)
    for row in chosen:
        for key in ("image_a", "image_b"):
            (images / row[key]).parent.mkdir(parents=True, exist_ok=True)
            (images / row[key]).write_bytes((CELEBA / row[key]).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    pairs = out / "scores.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        writer.writeheader()
        writer.writerows(chosen)
    before = pairs.read_bytes()
    args = [
        "--pairs",
        str(pairs),
        "--images",
        str(images),
        "--device",
        "cpu",
        "--folds",
        "2",
        "--image-size",
        "32",
        "--no-detect",
    ]
    r = CliRunner().invoke(
        evaluate_main,
        [*args, "--encoder", str(_random_encoder(tmp_path / "e.pt")), "--output", str(tmp_path / "out" / ".." / "out")],
    )
    assert r.exit_code == 2 and "would overwrite the pairs file" in r.output and pairs.read_bytes() == before, r.output
    r = CliRunner().invoke(evaluate_main, [*args, "--encoder", str(tmp_path / "e.pt"), "--output", str(images / "x")])
    assert r.exit_code == 2 and "would join the photos" in r.output and not (images / "x").exists(), r.output
    r = CliRunner().invoke(evaluate_main, [*args, "--encoder", str(tmp_path), "--output", str(tmp_path / "o")])
    # (a folder of no run)
    assert r.exit_code == 3 and "holds neither encoder.pt" in r.output, r.output
    # a train-classifier run: its fine-tuned backbone
    (tmp_path / "classifier-run").mkdir()
    torch.save(
        {"model": Classifier(build_encoder(), 2).state_dict(), "classes": ["a", "b"], "image_size": 32},
        tmp_path / "classifier-run" / "model.pt",
    )
    r = CliRunner().invoke(
        evaluate_main,
        [*args, "--encoder", str(tmp_path / "classifier-run"), "--output", str(tmp_path / "o-classifier")],
    )
    assert r.exit_code == 0 and json.loads((tmp_path / "o-classifier" / "metrics.json").read_text())[
        "encoder"
    ].endswith("classifier-run/model.pt"), r.output
    r = CliRunner().invoke(
        evaluate_main,
        [*args[:1], str(images), *args[2:], "--encoder", str(tmp_path / "e.pt"), "--output", str(tmp_path / "o")],
    )
    assert r.exit_code == 3 and "is a folder, not a file" in r.output, r.output
    (tmp_path / "photos-link").symlink_to(images)
    for crops in (images / ".." / "images", tmp_path / "photos-link"):
        with pytest.raises(UsageError, match="would overwrite or join the photos"):
            write_pair_crops(str(pairs), str(images), str(crops), 32)
    state = build_encoder().state_dict()
    # finite, but conv1's sums overflow float32
    state["conv1.weight"].fill_(1e38)
    torch.save(state, tmp_path / "overflow.pt")
    r = CliRunner().invoke(
        evaluate_main, [*args, "--encoder", str(tmp_path / "overflow.pt"), "--output", str(tmp_path / "o")]
    )
    assert r.exit_code == 3 and "NaN or infinite embeddings" in r.output, r.output
