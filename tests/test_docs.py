"""The docs name what exists: every `rela.x.y` path in the README, docs/ and the module
docstrings imports (a module, or an attribute of one)."""

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH = re.compile(r"`(rela(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def named_paths() -> dict[str, str]:
    """Each dotted rela path in backticks -> the first file naming it."""
    texts = {p: p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
    for py in sorted((REPO / "rela").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(py.read_text())) or ""
        texts[py] = doc
    found: dict[str, str] = {}
    for path, text in texts.items():
        for name in PATH.findall(text):
            found.setdefault(name.rstrip("."), str(path.relative_to(REPO)))
    return found


def resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_the_docs_name_paths_that_import():
    names = named_paths()
    assert len(names) > 20  # the scan found the docs
    missing = {n: where for n, where in names.items() if not resolves(n)}
    assert not missing, f"named in the docs but not importable: {missing}"


@pytest.mark.parametrize("stale", ["rela.pca", "rela.datasets", "rela.training.ssl"])
def test_the_check_catches_a_stale_name(stale):
    assert not resolves(stale)
