"""The code stays readable: no function in common/ or jobs/ over 100 lines (docs/development.md)."""

import ast

from conftest import REPO

MAX_LINES = 100


def long_functions(paths, root) -> list[str]:
    """Return ``file:function (N lines)`` for every function of ``paths`` longer than MAX_LINES, counted from
    its ``def`` line to its last line (decorators, such as a click command's options, excluded)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    found.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    return found


def test_no_function_in_the_product_is_over_100_lines():
    paths = sorted((REPO / "common").glob("*.py")) + sorted((REPO / "jobs").glob("*.py"))
    assert len(paths) > 10
    assert long_functions(paths, REPO) == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = tmp_path / "probe.py"
    source.write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert long_functions([source], tmp_path) == ["probe.py:long (101 lines)"]
