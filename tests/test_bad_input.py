"""Messy input gets a clear error with the documented exit code, or a recorded skip; never a traceback."""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import CASES, GLINT24, SHARED
from facessl.common.data import PreparedDataset
from facessl.jobs.evaluate_pairs import main as evaluate_main
from facessl.jobs.prepare_data import main as prepare_main
from facessl.jobs.pretrain_simclr import main as pretrain_main
from facessl.jobs.train_classifier import main as classifier_main


def run(cmd, *args):
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture
def odd_raw(tmp_path):
    """Two identities with names that upset naive code, plus special files."""
    raw = tmp_path / "raw"
    for name in ("Bad $^^$ Name", "accuracy"):
        (raw / name).mkdir(parents=True)
        for src in sorted((GLINT24 / "Tom Hanks" if name == "accuracy" else GLINT24 / "Barack Obama").iterdir())[:12]:
            shutil.copyfile(src, raw / name / src.name)
    os.symlink("missing.jpg", raw / "accuracy" / "dangling.jpg")
    os.symlink("loop.jpg", raw / "accuracy" / "loop.jpg")
    os.mkfifo(raw / "accuracy" / "pipe.jpg")
    (raw / "accuracy" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(
        (CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes()
    )
    (raw / "accuracy" / "back\\slash.jpg").write_bytes((CASES / "raw" / "Tom Hanks" / "plain.jpg").read_bytes())
    return raw


def test_special_files_and_odd_names_do_not_stop_the_jobs(odd_raw, tmp_path):
    out = tmp_path / "prepared"
    r = run(
        prepare_main,
        "--input",
        odd_raw,
        "--output",
        out,
        "--image-size",
        32,
        "--on-no-face",
        "keep-full",
        "--workers",
        1,
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {rec["source"]: rec.get("reason") for rec in manifest["records"]}
    assert reasons["accuracy/caf\ufffd.jpg"] == "file name is not valid UTF-8"
    # (not "a symlink")
    assert reasons["accuracy/back\\slash.jpg"].startswith("a backslash in the folder or file name")
    assert not any("pipe" in s or "loop" in s or "dangling" in s for s in reasons)
    r = run(
        classifier_main,
        "--data",
        out,
        "--output",
        tmp_path / "cls",
        "--mode",
        "linear-probe",
        "--epochs",
        2,
        "--image-size",
        32,
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    assert metrics["per_class"]["accuracy"]["support"] == 1
    assert (tmp_path / "cls" / "confusion_matrix.png").stat().st_size > 1000


def test_links_out_of_the_input_folder_are_refused_with_the_reason(tmp_path):
    raw = tmp_path / "raw" / "Tom Hanks"
    raw.mkdir(parents=True)
    for src in sorted((GLINT24 / "Tom Hanks").iterdir())[:3]:
        os.symlink(src, raw / src.name)
    r = run(
        prepare_main,
        "--input",
        tmp_path / "raw",
        "--output",
        tmp_path / "prepared",
        "--min-images",
        1,
        "--workers",
        1,
        "--image-size",
        32,
    )
    assert r.exit_code == 3, r.output
    assert "no identity has at least 1 usable images" in r.output
    assert "3 x a symlink points outside the input" in r.output


def test_linked_identity_folders_are_recorded_not_walked(tmp_path):
    """Folder links are not walked (an alias would take another identity's photos, a link can loop or lead
    out of the input) and each gets one recorded skip; the real folders are used as usual."""
    raw = tmp_path / "raw"
    (raw / "Keira").mkdir(parents=True)
    for src in sorted((GLINT24 / "Keira Knightley").iterdir())[:4]:
        shutil.copyfile(src, raw / "Keira" / src.name)
    # sorts first: walked, it would take Keira's photos
    os.symlink(raw / "Keira", raw / "Aaron alias of Keira")
    # outside the input
    os.symlink(GLINT24 / "Tom Hanks", raw / "Tom")
    # back to the input's root
    os.symlink("..", raw / "Keira" / "loop")
    out = tmp_path / "prepared"
    r = run(
        prepare_main,
        "--input",
        raw,
        "--output",
        out,
        "--min-images",
        1,
        "--workers",
        1,
        "--image-size",
        32,
        "--on-no-face",
        "keep-full",
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["Keira"] and manifest["counts"]["ok"] == 4
    skipped = {rec["source"]: rec["reason"] for rec in manifest["records"] if rec["status"] == "skipped"}
    assert sorted(skipped) == ["Aaron alias of Keira", "Keira/loop", "Tom"]
    assert all(reason.startswith("a symlink to a folder, not followed") for reason in skipped.values())


def test_link_diamonds_do_not_hang_the_listing(tmp_path):
    """22 levels of folders each holding two links to the next: walking links would list 2^22 paths."""
    raw = tmp_path / "raw"
    (raw / "Keira").mkdir(parents=True)
    shutil.copyfile(next(iter(sorted((GLINT24 / "Keira Knightley").iterdir()))), raw / "Keira" / "a.jpg")
    level = raw / "Keira"
    for i in range(22):
        nxt = tmp_path / f"level{i}"
        nxt.mkdir()
        os.symlink(nxt, level / "x")
        os.symlink(nxt, level / "y")
        level = nxt
    from facessl.common.storage import open_storage

    storage = open_storage(str(raw))
    assert list(storage.list()) == ["Keira/a.jpg"] and storage.folder_links() == ["Keira/x", "Keira/y"]


def test_refused_rerun_keeps_the_earlier_dataset(tmp_path):
    """A rerun refused after detection (too few photos per identity) used to delete the earlier manifest first,
    leaving a dataset no job could read although its shards had not changed."""
    from facessl.common.data import PreparedDataset

    out = tmp_path / "prepared"
    args = ["--input", CASES / "raw", "--output", out, "--min-images", 1, "--workers", 1, "--image-size", 32]
    assert run(prepare_main, *args).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run(prepare_main, *args, "--min-images", 50)
    assert r.exit_code == 3 and "lower --min-images" in r.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    x, y = PreparedDataset(str(out), 32).load("train")
    assert len(x) == len(y) > 0


def test_more_workers_than_cores_are_lowered_with_a_note(tmp_path):
    """--workers 1000 started a thousand 60 MB processes for detection that only the cores can run."""
    r = run(
        prepare_main,
        "--input",
        CASES / "raw",
        "--output",
        tmp_path / "o",
        "--min-images",
        1,
        "--workers",
        1000,
        "--image-size",
        32,
    )
    assert r.exit_code == 0 and f"--workers 1000 lowered to the {len(os.sched_getaffinity(0))} CPU cores" in r.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--split", "nan,0.5,0.5"], 2, "split ratios"),
        (["--split", "0.9,0.2,-0.1"], 2, "split ratios"),
        (["--output", ""], 2, "empty location"),
        (["--classes", " , "], 2, "names nothing"),
    ],
)
def test_prepare_usage_errors(args, code, message, tmp_path):
    base = {"--input": str(CASES / "raw"), "--output": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    r = run(prepare_main, *[x for kv in base.items() for x in kv], "--min-images", 1)
    assert r.exit_code == code and message in r.output, r.output


def test_output_that_is_a_file_is_a_clear_error(prepared_subset, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run(pretrain_main, "--data", prepared_subset, "--output", tmp_path / "afile", "--epochs", 1, "--image-size", 32)
    assert r.exit_code == 3 and "cannot use" in r.output, r.output


def test_unknown_or_missing_device_is_a_usage_error(prepared_subset, tmp_path):
    for device in ("foo", "meta"):
        r = run(pretrain_main, "--data", prepared_subset, "--output", tmp_path / "o", "--device", device)
        assert r.exit_code == 2 and "device" in r.output, r.output


@pytest.mark.slow
def test_resume_with_other_options_is_refused(prepared_subset, tmp_path):
    out = tmp_path / "run"
    common = [
        "--data",
        prepared_subset,
        "--output",
        out,
        "--epochs",
        1,
        "--batch-size",
        64,
        "--image-size",
        32,
        "--knn-every",
        0,
    ]
    assert run(pretrain_main, *common).exit_code == 0
    r = run(pretrain_main, *common, "--lr", "0.1")
    assert r.exit_code == 2 and "lr: 0.001 -> 0.1" in r.output, r.output


def test_wrong_shape_weights_are_refused(prepared_subset, tmp_path):
    import torch
    import torchvision

    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), tmp_path / "gray.pth")
    r = run(classifier_main, "--data", prepared_subset, "--output", tmp_path / "o", "--encoder", tmp_path / "gray.pth")
    assert r.exit_code == 3 and "does not fit a ResNet18 backbone" in r.output and "conv1.weight" in r.output, r.output


def test_nan_weights_are_refused_before_training(prepared_subset, tmp_path):
    import torch
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    r = run(classifier_main, "--data", prepared_subset, "--output", tmp_path / "o", "--encoder", tmp_path / "nan.pth")
    assert r.exit_code == 3 and "NaN or infinite weights" in r.output and "layer3.0.conv1.weight" in r.output, r.output
    assert not (tmp_path / "o" / "metrics.json").exists()
    r = run(
        pretrain_main,
        "--data",
        prepared_subset,
        "--output",
        tmp_path / "p",
        "--init",
        tmp_path / "nan.pth",
        "--epochs",
        1,
        "--image-size",
        32,
    )
    assert r.exit_code == 3 and "NaN or infinite weights" in r.output, r.output


def test_unwritable_output_fails_before_detection(tmp_path):
    # /proc takes no new files (even for root): the write probe fails before any photo is decoded
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "prepare-data"),
            "--input",
            str(CASES / "raw"),
            "--output",
            "/proc/facessl-prepared",
            "--min-images",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3 and "cannot write to /proc/facessl-prepared" in r.stderr, r.stdout + r.stderr
    assert "detect faces" not in r.stderr and "Traceback" not in r.stderr
    # a file where a split's folder goes is found by the same probe, also before the detection
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val").write_text("not a folder")
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "prepare-data"),
            "--input",
            str(CASES / "raw"),
            "--output",
            str(tmp_path / "out"),
            "--min-images",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3 and "a file stands on the path where a folder is needed" in r.stderr, r.stdout + r.stderr
    assert str(tmp_path / "out" / "val") in r.stderr and "detect faces" not in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "out" / "val").read_text() == "not a folder"


def test_output_inside_the_input_is_refused(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(CASES / "raw" / "Tom Hanks", raw / "Tom Hanks")
    (tmp_path / "rawlink").symlink_to(raw)
    for output in (raw, tmp_path / "rawlink" / "prepared", raw / ".." / "raw"):
        r = subprocess.run(
            [
                str(Path(sys.executable).parent / "prepare-data"),
                "--input",
                str(raw),
                "--output",
                str(output),
                "--min-images",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2 and "lies inside the input" in r.stderr, (output, r.stdout + r.stderr)
    # nothing written into the photos
    assert sorted(p.name for p in raw.iterdir()) == ["Tom Hanks"]


def test_missing_output_bucket_fails_before_detection(s3_env, tmp_path):
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "prepare-data"),
            "--input",
            str(CASES / "raw"),
            "--output",
            "s3://no-such-bucket-here/prepared",
            "--min-images",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert r.returncode == 3 and "does not exist" in r.stderr, r.stdout + r.stderr
    assert "detect faces" not in r.stderr


@pytest.mark.parametrize(
    "cmd,option,value",
    [
        (pretrain_main, "--temperature", "nan"),
        (pretrain_main, "--lr", "inf"),
        (pretrain_main, "--crop-min", "nan"),
        (classifier_main, "--label-smoothing", "nan"),
        (classifier_main, "--weight-decay", "nan"),
        (prepare_main, "--margin", "nan"),
    ],
)
def test_non_finite_options_are_usage_errors(cmd, option, value, tmp_path):
    """A NaN passes every range comparison: without the finite check it reached the loss or the optimizer."""
    first = "--input" if cmd is prepare_main else "--data"
    r = run(cmd, first, tmp_path / "none", "--output", tmp_path / "o", option, value)
    assert r.exit_code == 2 and "is not a finite number" in r.output, r.output


@pytest.mark.parametrize(
    "cmd,option,value",
    [
        (pretrain_main, "--lr", "1e300"),
        (pretrain_main, "--weight-decay", "1e300"),
        (pretrain_main, "--temperature", "1e-30"),
        (pretrain_main, "--proj-dim", "100000000"),
        (classifier_main, "--lr", "1e300"),
        (classifier_main, "--encoder-lr-scale", "1e300"),
    ],
)
def test_values_beyond_32_bit_training_are_usage_errors(cmd, option, value, prepared_subset, tmp_path):
    """These overflowed a float32 in the optimizer (a traceback, after train-classifier had cleared the
    folder's earlier run), tried to allocate 200 GB, or trained on a loss of 1e29 and reported success."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier run")
    r = run(cmd, "--data", prepared_subset, "--output", out, "--image-size", 32, "--epochs", 1, option, value)
    assert r.exit_code == 2 and "is not in the range" in r.output, r.output
    assert (out / "model.pt").read_bytes() == b"an earlier run"


def test_tampered_manifest_and_unlabelled_sample_are_clear_errors(prepared_subset, tmp_path):
    """Values no prepare-data writes, and a training sample without its .cls: exit 3, not a traceback or a
    silent run on 1-pixel crops or class -1."""
    import tarfile

    good = json.loads((Path(prepared_subset) / "manifest.json").read_text())
    cases = {
        "image_size": ({"image_size": -5}, "not a facessl manifest"),
        "bool_size": ({"image_size": True}, "not a facessl manifest"),
        "sizes": ({"shard_sizes": "x"}, "not a facessl manifest"),
        "twice": ({"classes": [good["classes"][0]] * len(good["classes"])}, "names a class twice"),
        "shard twice": (
            {"shards": {**good["shards"], "test": ["./" + k for k in good["shards"]["val"]]}},
            "lists a shard twice",
        ),
        "deep": (None, "not valid JSON"),
        "huge count": (
            {"shard_sizes": {**good["shard_sizes"], "train": [10**12] * len(good["shards"]["train"])}},
            "the manifest is damaged",
            # (it allocated terabytes for the split and crashed)
        ),
        "spelt": (
            {
                "shards": {**good["shards"], "train": [k.replace("/", "//") for k in good["shards"]["train"]]},
                "shard_sizes": {**good["shard_sizes"], "train": [10**9] * len(good["shards"]["train"])},
            },
            "the manifest is damaged",
        ),
        "missing": (
            {
                "shards": {**good["shards"], "train": [*good["shards"]["train"], "train/shard-999999.tar"]},
                "shard_sizes": {**good["shard_sizes"], "train": [*good["shard_sizes"]["train"], 10**9]},
            },
            "is not there",
        ),
    }
    for name, (change, message) in cases.items():
        data = tmp_path / name
        shutil.copytree(prepared_subset, data)
        (data / "manifest.json").write_text(
            "[" * 100000 + "]" * 100000 if change is None else json.dumps({**good, **change})
        )
        r = run(
            classifier_main, "--data", data, "--output", tmp_path / f"o-{name}", "--mode", "knn", "--image-size", 32
        )
        assert r.exit_code == 3 and message in r.output, (name, r.output)
    # sizes that are not counts are counted again from the shards
    data = tmp_path / "boolsizes"
    shutil.copytree(prepared_subset, data)
    (data / "manifest.json").write_text(
        json.dumps({**good, "shard_sizes": {**good["shard_sizes"], "train": [True] * len(good["shards"]["train"])}})
    )
    assert PreparedDataset(str(data), 32).shard_sizes("train") == good["shard_sizes"]["train"]
    data = tmp_path / "nocls"
    shutil.copytree(prepared_subset, data)
    shard = data / good["shards"]["train"][0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(".cls"))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name != dropped:
                tar.addfile(m, io.BytesIO(payload))
    r = run(classifier_main, "--data", data, "--output", tmp_path / "o-nocls", "--mode", "knn", "--image-size", 32)
    assert r.exit_code == 3 and "has no class label" in r.output and dropped.rsplit(".", 1)[0] in r.output, r.output


def test_oversized_seed_and_decompression_bomb_in_a_shard(prepared_subset, tmp_path):
    """A seed over 2**63 - 1 is a usage error (it overflowed in torch.manual_seed); a shard sample that is a
    decompression bomb (a 15000 px PNG of 27 KB) is exit 3 naming the shard, not a traceback or 675 MB decoded."""
    import tarfile

    from PIL import Image

    r = run(pretrain_main, "--data", prepared_subset, "--output", tmp_path / "s", "--seed", 2**64)
    assert r.exit_code == 2 and "--seed" in r.output, r.output
    data = tmp_path / "bomb"
    shutil.copytree(prepared_subset, data)
    shard = data / json.loads((data / "manifest.json").read_text())["shards"]["train"][0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, "PNG")
    members[0] = (members[0][0], bomb.getvalue())
    members[0][0].size = len(bomb.getvalue())
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            tar.addfile(m, io.BytesIO(payload))
    r = run(classifier_main, "--data", data, "--output", tmp_path / "o", "--mode", "knn", "--image-size", 32)
    assert r.exit_code == 3 and "15000x15000 pixels, not a face crop" in r.output, r.output


@pytest.fixture(scope="module")
def slow_photos(tmp_path_factory):
    """Real face photos enlarged to 2400 px: a worker's chunk of 16 takes a minute or more to detect, so a
    stop that waits for the chunks in hand shows."""
    from PIL import Image

    raw = tmp_path_factory.mktemp("slow") / "raw"
    sources = sorted((SHARED / "data" / "faces" / "celeba-wild").rglob("*.jpg"))[:40]
    for i, src in enumerate(sources):
        (raw / f"person{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").resize((2400, 2400)).save(raw / f"person{i % 2}" / f"{i}.jpg", quality=85)
    return raw


@pytest.mark.parametrize(
    "signame,to_group,n_workers,code,message",
    [
        ("SIGINT", False, 2, 130, "interrupted"),
        ("SIGINT", True, 2, 130, "interrupted"),
        ("SIGTERM", False, 2, 4, "stopped by SIGTERM"),
        ("SIGTERM", True, 2, 4, "stopped by SIGTERM"),
        ("SIGTERM", False, 1, 4, "stopped by SIGTERM"),
    ],
)
def test_ctrl_c_or_sigterm_stop_prepare_data_and_its_workers_at_once(
    signame, to_group, n_workers, code, message, slow_photos, tmp_path
):
    """SIGINT to the main process (or to the whole group, as a terminal's Ctrl-C): exit 130 within seconds,
    workers gone. Before, leaving the pool waited for every queued photo, or hung, or (Python 3.11's
    shutdown() drops the pool's process list) the workers finished their chunks first. SIGTERM (a preemption;
    tini forwards it to the main process, ``tini -g`` to the group): the retry code 4, which the Argo
    workflow retries on; before, the job died with 143 and was not retried (or, with one worker, went on
    with the photo recorded as skipped)."""
    import signal
    import time

    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prepare-data"),
            "--input",
            str(slow_photos),
            "--output",
            str(tmp_path / "o"),
            "--workers",
            str(n_workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # the line printed just before detection starts (tqdm's bar on a pipe shows only every 30 s, and on a
    # fast machine its first full line came when the 40 photos were done)
    for line in iter(proc.stdout.readline, ""):
        if "raw files in" in line:
            break
    time.sleep(3)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert bool(workers) == (n_workers > 1), "with two or more, the detection runs in worker processes"
    sent = time.time()
    (os.killpg if to_group else os.kill)(proc.pid, getattr(signal, signame))
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == code and message in rest and "Traceback" not in rest, rest
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert time.time() - sent < 20, "the queued photos, or the chunks in hand, were detected first"

    # a zombie waiting for init to reap it runs no more
    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 15
    while any(running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(running(pid) for pid in workers), [
        Path(f"/proc/{p}/cmdline").read_text() for p in workers if running(p)
    ]


def test_sigterm_during_an_s3_request_stops_prepare_data(tmp_path):
    """An S3 server that accepts connections and never answers: SIGTERM used to be raised inside botocore's
    request, which wrapped it in HTTPClientError and retried, so the job ran on for up to 16 minutes."""
    import socket
    import time

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(20)], daemon=True).start()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prepare-data"),
            "--input",
            "s3://silent/raw",
            "--output",
            str(tmp_path / "o"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not accepted and time.time() < deadline:
            time.sleep(0.2)
        assert accepted, "prepare-data never connected to the server"
        time.sleep(1)
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 4 and "stopped by SIGTERM" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_job_never_writes_into_another_jobs_output(prepared_subset, tmp_path):
    """A SimCLR run, a classifier run and a prepared dataset each keep their folder (exit 2 before any work;
    evaluate-pairs and prepare-data too);
    a classifier rerun into its own folder replaces the old results; an unwritable output fails first."""
    simclr, cls = tmp_path / "simclr", tmp_path / "cls"
    assert (
        run(
            pretrain_main,
            "--data",
            prepared_subset,
            "--output",
            simclr,
            "--epochs",
            1,
            "--image-size",
            32,
            "--batch-size",
            16,
            "--knn-every",
            0,
            "--device",
            "cpu",
        ).exit_code
        == 0
    )
    r = run(
        classifier_main,
        "--data",
        prepared_subset,
        "--output",
        simclr,
        "--encoder",
        simclr,
        "--epochs",
        1,
        "--image-size",
        32,
        "--device",
        "cpu",
    )
    assert r.exit_code == 2 and "holds a pretrain-simclr output (encoder.pt)" in r.output, r.output
    config = json.loads((simclr / "config.json").read_text())
    assert "mode" not in config and len((simclr / "metrics.jsonl").read_text().splitlines()) == 1, "SimCLR's own files"
    assert (
        run(
            classifier_main,
            "--data",
            prepared_subset,
            "--output",
            cls,
            "--encoder",
            simclr,
            "--epochs",
            1,
            "--image-size",
            32,
            "--device",
            "cpu",
        ).exit_code
        == 0
        and (cls / "model.pt").is_file()
    )
    for target, other in ((cls, "train-classifier output (model.pt)"), (prepared_subset, "prepare-data output")):
        r = run(pretrain_main, "--data", prepared_subset, "--output", target, "--epochs", 1, "--image-size", 32)
        assert r.exit_code == 2 and f"holds a {other}" in r.output, r.output
    r = run(
        classifier_main,
        "--data",
        prepared_subset,
        "--output",
        cls,
        "--encoder",
        simclr,
        "--mode",
        "knn",
        "--image-size",
        32,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0 and not (cls / "model.pt").exists(), "a knn rerun writes no model: the old one must go"
    assert not (cls / "metrics.jsonl").exists() and not (cls / "training_curves.png").exists(), "the fine-tune's epochs"
    assert (
        json.loads((cls / "config.json").read_text())["mode"]
        == "knn"
        == json.loads((cls / "metrics.json").read_text())["mode"]
    )
    r = run(classifier_main, "--data", prepared_subset, "--output", "/proc/facessl-cls", "--mode", "knn")
    assert r.exit_code == 3 and "cannot write to /proc/facessl-cls" in r.output, r.output
    before = (cls / "metrics.json").read_bytes()
    r = run(
        evaluate_main,
        "--pairs",
        SHARED / "data" / "faces" / "celeba-wild" / "pairs.csv",
        "--images",
        SHARED / "data" / "faces" / "celeba-wild",
        "--encoder",
        simclr,
        "--output",
        cls,
        "--device",
        "cpu",
    )
    assert r.exit_code == 2 and "holds a train-classifier output" in r.output, r.output
    assert (cls / "metrics.json").read_bytes() == before
    r = run(prepare_main, "--input", CASES / "raw", "--output", simclr, "--min-images", 1, "--workers", 1)
    assert r.exit_code == 2 and "holds a pretrain-simclr output" in r.output and not (simclr / "train").exists()


def test_one_class_dataset_is_refused_by_the_classifier(tmp_path):
    """One identity is a valid pretraining set but not a classification task (top-1 would be a trivial 1.0)."""
    data = tmp_path / "one"
    r = run(
        prepare_main,
        "--input",
        CASES / "raw",
        "--output",
        data,
        "--classes",
        "Tom Hanks",
        "--min-images",
        1,
        "--workers",
        1,
        "--image-size",
        32,
    )
    assert r.exit_code == 0, r.output
    r = run(classifier_main, "--data", data, "--output", tmp_path / "o", "--mode", "knn", "--image-size", 32)
    assert r.exit_code == 3 and "needs at least two identities" in r.output, r.output
    assert not (tmp_path / "o" / "config.json").exists()


def test_unicode_forms_of_identity_names(tmp_path):
    """macOS writes file names decomposed (NFD): --classes typed composed (NFC) found no folder, and folders of
    both forms became two classes that print the same."""
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "Zoë"), unicodedata.normalize("NFC", "Zoë")
    raw = tmp_path / "raw"
    for folder, person in ((nfd, "Keira Knightley"), ("Tom", "Tom Hanks")):
        (raw / folder).mkdir(parents=True)
        for src in sorted((GLINT24 / person).iterdir())[:10]:
            shutil.copyfile(src, raw / folder / src.name)
    args = ["--input", raw, "--min-images", 5, "--workers", 1, "--image-size", 32, "--on-no-face", "keep-full"]
    r = run(prepare_main, *args, "--output", tmp_path / "o", "--classes", f"{nfc},Tom")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["classes"] == ["Tom", nfd]
    (raw / nfc).mkdir()
    shutil.copyfile(next(iter(sorted((raw / "Tom").iterdir()))), raw / nfc / "x.jpg")
    r = run(prepare_main, *args, "--output", tmp_path / "o2")
    assert r.exit_code == 3 and "one name written in two Unicode forms" in r.output, r.output


def test_outputs_and_inputs_that_overlap_or_malformed_s3_locations_are_refused(prepared_subset, tmp_path):
    # an input named like a split folder, inside the output
    raw = tmp_path / "out" / "train"
    shutil.copytree(CASES / "raw", raw)
    r = run(prepare_main, "--input", raw, "--output", tmp_path / "out", "--min-images", 1)
    assert r.exit_code == 2 and "lies in the output's train/ folder" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]
    # a job's run inside the dataset a prepare-data rerun replaces
    for job in (classifier_main, pretrain_main):
        r = run(
            job,
            "--data",
            prepared_subset,
            "--output",
            prepared_subset / "train" / "run",
            "--epochs",
            1,
            "--image-size",
            32,
        )
        assert r.exit_code == 2 and "lies inside the prepared dataset" in r.output, r.output
        assert not (prepared_subset / "train" / "run").exists()
    r = run(prepare_main, "--input", "s3://", "--output", tmp_path / "o")
    assert r.exit_code == 3 and "no bucket in 's3://'" in r.output, r.output
    r = run(prepare_main, "--input", CASES / "raw", "--output", "s3://Bad_Bucket!/prep")
    assert r.exit_code == 3 and "'Bad_Bucket!' in 's3://Bad_Bucket!/prep' is not a bucket name" in r.output, r.output
