"""The tests mirror the package: each floor's tests in its folder, shared fixtures in conftest.py."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FLOORS = ("data", "loading", "training", "kernels")


def test_floor_folders_hold_the_floor_tests_and_no_test_imports_another():
    for floor in FLOORS:
        assert list((TESTS / floor).glob("test_*.py")), floor
    crossing = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.") \
                    and not node.module.endswith("conftest"):
                crossing.append(f"{path.relative_to(TESTS)}: from {node.module}")
    assert not crossing, f"fixtures and helpers belong in a conftest.py: {crossing}"
