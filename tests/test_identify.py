"""identify on real photos: every detected face gets a box and top-3 identities; bad input gets exit 3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CASES
from facessl.common.models import Classifier, build_encoder

BIN = Path(sys.executable).parent
CLASSES = ["Barack Obama", "Keira Knightley", "Tom Hanks"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A train-classifier model.pt layout with random weights (what identify reads, not what it knows)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": Classifier(build_encoder(), 3).state_dict(), "classes": CLASSES, "image_size": 48}, path)
    return path


def identify(*args):
    return subprocess.run([str(BIN / "identify"), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_two_faces_are_found_boxed_and_named(model_file, tmp_path):
    photo = CASES / "raw" / "Keanu Reeves" / "two_faces.jpg"
    r = identify("--model", model_file, "--photo", photo, "--json", "--annotate", tmp_path / "named.jpg")
    assert r.returncode == 0, r.stdout + r.stderr
    faces = json.loads(r.stdout)["faces"]
    assert len(faces) == 2
    width, height = Image.open(photo).size
    for face in faces:
        x, y, w, h = face["box"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w > 20
        assert [n for n, _ in face["top3"]] and {n for n, _ in face["top3"]} <= set(CLASSES)
        assert face["identity"] in [*CLASSES, "unknown"]
    assert faces[0]["box"][2] >= faces[1]["box"][2], "largest face first"
    with Image.open(tmp_path / "named.jpg") as named:
        assert named.size == (width, height) and named.format == "JPEG"


def test_threshold_one_makes_every_face_unknown_and_text_output(model_file):
    r = identify("--model", model_file, "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg", "--threshold", 1.0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("face 1 at x=") and ": unknown  (top-3: " in r.stdout


def test_no_face_and_bad_input(model_file, tmp_path):
    r = identify("--model", model_file, "--photo", CASES / "raw" / "Tom Hanks" / "no_face_noise.jpg")
    assert r.returncode == 0 and r.stdout.strip() == "no face found"
    r = identify("--model", model_file, "--photo", CASES / "raw" / "Tom Hanks" / "truncated.jpg")
    assert r.returncode == 3 and "cannot read the photo" in r.stderr and "Traceback" not in r.stderr
    r = identify("--model", model_file, "--photo", tmp_path / "missing.jpg")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    # reading it would wait for a writer forever
    os.mkfifo(tmp_path / "pipe.jpg")
    # sparse: 200 MiB that take no disk
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(200 * 1024 * 1024)
    for name, message in (("pipe.jpg", "is not a regular file"), ("huge.jpg", "over the 104,857,600-byte limit")):
        r = identify("--model", model_file, "--photo", tmp_path / name)
        assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    r = identify("--model", tmp_path / "other.pt", "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg")
    assert r.returncode == 3 and "not a train-classifier model.pt" in r.stderr


def test_weights_no_network_holds_are_refused(tmp_path):
    """NaN, a complex tensor or a negative batch-norm variance: exit 3 naming the tensor, not NaN scores."""
    photo = CASES / "raw" / "Tom Hanks" / "plain.jpg"
    for name, key, value in [
        ("nan", "fc.weight", float("nan")),
        ("inf", "encoder.bn1.running_var", float("inf")),
        ("negvar", "encoder.layer1.0.bn1.running_var", -1.0),
    ]:
        state = Classifier(build_encoder(), 3).state_dict()
        state[key][0] = value
        torch.save({"model": state, "classes": CLASSES, "image_size": 48}, tmp_path / f"{name}.pt")
        r = identify("--model", tmp_path / f"{name}.pt", "--photo", photo, "--no-detect", "--json")
        assert r.returncode == 3 and key in r.stderr and "Traceback" not in r.stderr, (name, r.stdout + r.stderr)
    state = Classifier(build_encoder(), 3).state_dict()
    state["fc.bias"] = state["fc.bias"].to(torch.complex64)
    torch.save({"model": state, "classes": CLASSES, "image_size": 48}, tmp_path / "complex.pt")
    r = identify("--model", tmp_path / "complex.pt", "--photo", photo, "--no-detect")
    assert r.returncode == 3 and "complex tensor at fc.bias" in r.stderr, r.stdout + r.stderr
    # a cast weight file: all zeros, a class-blind 1/3 for every face
    for dtype in (torch.long, torch.bool):
        state = {
            k: v.to(dtype) if v.is_floating_point() else v
            for k, v in Classifier(build_encoder(), 3).state_dict().items()
        }
        torch.save({"model": state, "classes": CLASSES, "image_size": 48}, tmp_path / "cast.pt")
        r = identify("--model", tmp_path / "cast.pt", "--photo", photo, "--no-detect")
        assert r.returncode == 3 and f"{dtype} values at encoder.conv1.weight" in r.stderr, r.stdout + r.stderr
    # printed as if they were identities
    for classes in (["a", "a", "b"], [1, 2, 3], ["a", "", "b"]):
        torch.save(
            {"model": Classifier(build_encoder(), 3).state_dict(), "classes": classes, "image_size": 48},
            tmp_path / "names.pt",
        )
        r = identify("--model", tmp_path / "names.pt", "--photo", photo, "--no-detect")
        assert r.returncode == 3 and "not distinct non-empty strings" in r.stderr, (classes, r.stdout + r.stderr)


def test_model_of_other_shape_is_refused_naming_the_tensor(tmp_path):
    """A model.pt whose classes do not match its layer (5 outputs, 3 names): exit 3 naming fc.weight."""
    state = Classifier(build_encoder(), 5).state_dict()
    torch.save({"model": state, "classes": CLASSES, "image_size": 48}, tmp_path / "five.pt")
    r = identify("--model", tmp_path / "five.pt", "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg", "--no-detect")
    assert r.returncode == 3 and "does not fit a ResNet18 classifier" in r.stderr and "fc.weight" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_annotate_never_replaces_the_photo_or_a_non_jpeg(model_file, tmp_path):
    photo = tmp_path / "mine.jpg"
    photo.write_bytes((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    before = photo.read_bytes()
    r = identify("--model", model_file, "--photo", photo, "--annotate", tmp_path / "." / "mine.jpg")
    assert r.returncode == 2 and "would overwrite the photo" in r.stderr and photo.read_bytes() == before, r.stderr
    (tmp_path / "manifest.json").write_text("{}")
    r = identify("--model", model_file, "--photo", photo, "--annotate", tmp_path / "manifest.json")
    assert r.returncode == 2 and ".jpg or .jpeg" in r.stderr and (tmp_path / "manifest.json").read_text() == "{}"
    assert "face 1" not in r.stdout, "checked before any work"
    (tmp_path / "model.pt").write_bytes(b"weights")
    # a .jpg name through a link: the link is replaced
    (tmp_path / "link.jpg").symlink_to(tmp_path / "model.pt")
    r = identify("--model", model_file, "--photo", photo, "--annotate", tmp_path / "link.jpg")
    assert r.returncode == 0 and (tmp_path / "model.pt").read_bytes() == b"weights", r.stderr
    assert not (tmp_path / "link.jpg").is_symlink() and (tmp_path / "link.jpg").read_bytes()[:2] == b"\xff\xd8"
    (tmp_path / "adir.jpg").mkdir()
    r = identify("--model", model_file, "--photo", photo, "--annotate", tmp_path / "adir.jpg")
    assert r.returncode == 2 and "is a folder" in r.stderr and "face 1" not in r.stdout, r.stderr
    r = identify("--model", model_file, "--photo", photo, "--annotate", tmp_path / "model.pt" / "x.jpg")
    assert r.returncode == 3 and "face 1" not in r.stdout, r.stderr


def test_model_with_a_bad_image_size_is_refused(tmp_path):
    for size in ("abc", 0, True):
        torch.save(
            {"model": Classifier(build_encoder(), 3).state_dict(), "classes": CLASSES, "image_size": size},
            tmp_path / "m.pt",
        )
        r = identify("--model", tmp_path / "m.pt", "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg")
        assert r.returncode == 3 and "image_size" in r.stderr and "Traceback" not in r.stderr, (size, r.stderr)
