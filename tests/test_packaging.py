"""The installed package: one ``facessl`` namespace in site-packages, importable and runnable outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SCRIPTS = ("prepare-data", "pretrain-simclr", "train-classifier", "evaluate-pairs", "identify")


def test_pip_install_puts_only_facessl_in_site_packages_and_every_script_runs(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top == {"facessl"}
    assert (target / "facessl" / "common" / "storage.py").is_file()
    # run from an empty folder with only the installed copy on the path: the checkout is not on it
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import facessl.common.storage as s, facessl.jobs.identify as j;print(s.__file__); print(j.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(line.startswith(str(target)) for line in probe.stdout.split()), probe.stdout
    for script in SCRIPTS:
        out = subprocess.run(
            [sys.executable, str(target / "bin" / script), "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert "Usage:" in out.stdout
