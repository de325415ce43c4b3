"""The training code's layering (issue 15): modules depend downwards, weight loading (common.weights) below the
trainers and the inference paths; the names that moved stay importable from their old modules. (Function
lengths: tests/test_code_shape.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# module -> modules it must not import, at the top or inside a function
FORBIDDEN = {
    "weights": {"classify", "simclr", "identify", "verify", "training", "gallery"},
    "verify": {"classify", "simclr", "identify"},
    "classify": {"identify", "simclr", "verify"},
    "simclr": {"classify", "identify", "verify"},
    "identify": {"classify", "simclr", "verify"},
    "training": {"classify", "simclr", "identify", "verify", "weights"},
    "checkpoints": {"classify", "simclr", "identify", "verify", "training", "weights", "models"},
    "models": {"classify", "simclr", "identify", "verify", "training"},
    "config": {"torch", "click"},
}


def imported_modules(path: Path) -> set[str]:
    """The facessl.common modules (short names) and top-level packages a file imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "facessl.common":
                found.update(alias.name for alias in node.names)
            found.add(node.module.removeprefix("facessl.common.").split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("facessl.common.").split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_modules_depend_downwards(module):
    imports = imported_modules(REPO / "common" / f"{module}.py")
    assert not imports & FORBIDDEN[module], f"common/{module}.py imports {sorted(imports & FORBIDDEN[module])}"


def test_old_import_paths_still_work():
    from facessl.common.classify import ClassifierConfig, load_encoder
    from facessl.common.identify import load_classifier
    from facessl.common.models import check_weight_values, load_encoder_weights, load_error_summary
    from facessl.common.simclr import PretrainConfig, load_init_encoder
    from facessl.common.weights import load_classifier as moved

    assert load_classifier is moved
    assert all(callable(f) for f in (load_encoder, check_weight_values, load_encoder_weights, load_error_summary))
    assert all(callable(f) for f in (load_init_encoder, ClassifierConfig, PretrainConfig))
