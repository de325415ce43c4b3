"""Make ``facessl`` importable from this checkout when it is not installed (a GPU machine's own python).

The package installs as ``facessl.common`` and ``facessl.jobs`` over the checkout's ``common/`` and ``jobs/``
folders (pyproject's package-dir). Without an install, :func:`facessl_path` builds that layout once from two
symbolic links under ``.cache/facessl-path`` and returns the folder to put on ``sys.path`` / ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def facessl_path() -> str | None:
    """Return a folder holding a ``facessl`` namespace over this checkout, or None when facessl is installed.

    Also puts that folder first on ``sys.path`` of this process. Raises OSError when the links cannot be made.
    """
    if importlib.util.find_spec("facessl") is not None:
        return None
    root = REPO / ".cache" / "facessl-path"
    package = root / "facessl"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("common", "jobs"):
        link = package / name
        if not link.is_symlink():
            link.symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(root))
    return str(root)
