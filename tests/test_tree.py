"""The tests mirror the package: each floor's tests in its folder, shared fixtures in conftest.py."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
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


def _importable_top_level(root: Path) -> set[str]:
    """Names `import X` would find in `root` when it is on sys.path: modules and regular packages
    (a folder without __init__.py is at most a namespace portion, which any installed package of
    that name wins over)."""
    names = set()
    for p in root.iterdir():
        if p.is_file() and p.suffix in (".py", ".so", ".pyd"):
            names.add(p.name.split(".")[0])
        elif p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
    return names


def test_no_top_level_name_of_the_checkout_shadows_an_installed_package():
    """A checkout on sys.path (pytest, `python -m`, a script from the repo root) once shadowed
    Hugging Face's `kernels` with rela's kernels/ folder, and transformers failed to import."""
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if any(d != "rela-accel" for d in dists)}
    clash = _importable_top_level(ROOT) & installed
    assert not clash, f"the checkout's top-level {sorted(clash)} shadow installed packages of the same name"
    # And as Python resolves them from the repo root: every installed name that is also a folder here
    # (kernels/ and Hugging Face's kernels, for one) is found outside the checkout.
    same = sorted(p.name for p in ROOT.iterdir() if p.name in installed)
    code = ("import importlib.util, sys\n"
            f"for n in {same!r}:\n"
            "    s = importlib.util.find_spec(n)\n"
            "    print(n, s.origin or list(s.submodule_search_locations))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    inside = [line for line in out.splitlines() if str(ROOT) in line]
    assert not inside, f"resolved inside the checkout: {inside}"
