"""Each job option is declared once, in common.config: the click options take their defaults, bounds and help
from the config dataclasses, and the module stays torch-free so --help is fast."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click
import pytest

from facessl.common.config import ClassifierConfig, PairsConfig, PrepareOptions, PretrainConfig
from facessl.jobs import evaluate_pairs, prepare_data, pretrain_simclr, train_classifier

JOBS = [
    (pretrain_simclr.main, PretrainConfig),
    (train_classifier.main, ClassifierConfig),
    (evaluate_pairs.main, PairsConfig),
    (prepare_data.main, PrepareOptions),
]


@pytest.mark.parametrize(("command", "config"), JOBS)
def test_every_option_takes_its_default_and_help_from_the_config(command, config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    shared = set(fields) & set(params)
    # every option but the locations is a config field
    assert set(params) - shared <= {
        "data_location",
        "output_location",
        "input_location",
        "pairs_location",
        "images_location",
        "encoder_location",
    }
    for name in shared:
        assert params[name].default == fields[name].default, name
        assert params[name].help == fields[name].metadata["help"], name


def test_the_config_fields_that_are_not_options_are_the_known_ones():
    params = {p.name for p in pretrain_simclr.main.params}
    assert {f.name for f in dataclasses.fields(PretrainConfig)} - params == {"knn_k"}
    params = {p.name for p in train_classifier.main.params}
    assert {f.name for f in dataclasses.fields(ClassifierConfig)} <= params


def test_bounds_come_from_the_config():
    params = {p.name: p for p in pretrain_simclr.main.params}
    assert isinstance(params["epochs"].type, click.IntRange) and params["epochs"].type.min == 1
    assert params["lr"].type.min == 0 and params["lr"].type.min_open and params["lr"].type.max == 1e30
    assert params["seed"].type.max == 2**63 - 1
    assert list(params["precision"].type.choices) == ["auto", "fp32", "bf16"]
    assert params["precision"].envvar == "FACESSL_PRECISION" and params["device"].envvar == "FACESSL_DEVICE"
    assert params["compile"].is_flag and params["use_unlabeled"].is_flag


def test_prepare_options_agree_with_the_prepare_and_detect_defaults():
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig

    opts, detect, prepare = PrepareOptions(), DetectConfig(), PrepareConfig()
    for name in (
        "scale_factor",
        "min_neighbors",
        "min_face",
        "margin",
        "image_size",
        "on_no_face",
        "max_pixels",
        "upscale_below",
        "detect_max_pixels",
    ):
        assert getattr(opts, name) == getattr(detect, name), name
    assert opts.detector_fallback == detect.fallback
    for name in ("min_images", "seed", "unlabeled_pool", "shard_size", "workers"):
        assert getattr(opts, name) == getattr(prepare, name), name
    assert tuple(float(v) for v in opts.ratios.split(",")) == tuple(prepare.ratios)


def test_config_and_job_modules_import_no_torch():
    code = (
        "import sys, facessl.common.config, facessl.jobs.prepare_data, facessl.jobs.pretrain_simclr, "
        "facessl.jobs.train_classifier, facessl.jobs.evaluate_pairs; "
        "print(sorted(m for m in ('torch', 'boto3', 'cv2', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_option_out_of_its_bounds_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    args = ["--data", str(tmp_path), "--output", str(tmp_path / "o")]
    result = CliRunner().invoke(train_classifier.main, [*args, "--label-smoothing", "0.9"])
    assert result.exit_code == 2 and "0.9" in result.output
    result = CliRunner().invoke(pretrain_simclr.main, [*args, "--lr", "nan"])
    assert result.exit_code == 2 and "not a finite number" in result.output
