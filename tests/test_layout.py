"""The package's floors: data → loading → training, with the leaves below every floor.

Read from the source (every `import`, also the ones inside functions), so a lazy import that
climbs a floor is caught as well as a top-level one; and checked at run time for the floors'
own imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"rela.data": 1, "rela.loading": 2, "rela.training": 3, "rela.cli": 4, "rela.__main__": 4}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "rela").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        mods["rela.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The rela modules `path` imports (`from rela import X` counts as rela.X when X is a module,
    or as the module the top-level export X lives in)."""
    from rela import _EXPORTS

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rela")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rela"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else _EXPORTS.get(a.name, node.module) if node.module == "rela"
                        else node.module)
    return {m for m in out if m in modules}


def _floor(module: str) -> int:
    """0 for the leaves (errors, options, distributed, kernels, the C++ glue, the package root)."""
    return next((f for prefix, f in FLOORS.items() if module == prefix or module.startswith(prefix + ".")), 0)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_the_three_floors_exist():
    modules = _modules()
    for name in ("rela.data.convert", "rela.data.store", "rela.loading.loader", "rela.loading.backends",
                 "rela.loading.backends.torch_backend", "rela.loading.backends.dali", "rela.loading.backends.ffcv",
                 "rela.training.train", "rela.training.run", "rela.training.evaluate", "rela.kernels.rela_loss"):
        assert name in modules, name


def test_no_module_imports_from_a_higher_floor(graph):
    assert _floor("rela.errors") == _floor("rela.kernels.scoring") == 0 < _floor("rela.data.store")
    assert graph["rela.training.train"] and graph["rela.loading.loader"]  # the scan sees imports
    climbs = [(m, dep) for m, deps in graph.items() for dep in deps if _floor(dep) > _floor(m)]
    assert not climbs, f"imports that climb a floor: {climbs}"


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_importing_a_floor_loads_nothing_above_it():
    data = _run("import sys, rela.data.convert, rela.data.store, rela.data.priors; "
                "print(sorted(m for m in sys.modules if m.startswith(('rela.loading', 'rela.training'))))")
    assert data == "[]"
    loading = _run("import sys, rela.loading.loader, rela.loading.backends.torch_backend; "
                   "print(sorted(m for m in sys.modules if m.startswith('rela.training')))")
    assert loading == "[]"


def test_the_command_line_is_built_without_torch():
    # `rela --help` and every command's flags come from config fields, not from torch-heavy modules.
    out = _run("import sys; from rela.cli import build_parser; p = build_parser(); "
               "p.parse_args(['train', '--out', 'x']); print('torch' in sys.modules)")
    assert out == "False"


def test_train_flags_are_the_config_fields():
    from dataclasses import fields

    from rela.cli import build_parser
    from rela.options import cli_fields
    from rela.training.run import TrainConfig

    args = build_parser().parse_args(["train", "--out", "r"])
    assert {f.name for f in cli_fields(TrainConfig)} == {f.name for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        want = "r" if f.name == "out" else f.default
        assert getattr(args, f.name) == want, f.name
    args = build_parser().parse_args(["train", "--out", "r", "--workers", "3", "--no-probe-at-switch", "--sync-bn"])
    assert (args.num_workers, args.probe_at_switch, args.sync_bn) == (3, False, True)


def test_no_test_draws_inputs_from_a_salted_hash():
    """Python salts `hash()` of str/bytes per process (PYTHONHASHSEED), so a seed made from it draws
    new inputs on every run and a failure can't be replayed from its test id: use zlib.crc32."""
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for folder in ("tests", "bench") for path in sorted((ROOT / folder).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash"]
    assert not calls, f"salted hash() calls: {calls}"


def test_a_native_crash_fails_its_test_not_the_run(tmp_path):
    """The project's pytest configuration (two xdist workers): a test that dies in native code
    (as oneDNN #6035 made one do) is reported as that test's failure, and the others still run."""
    (tmp_path / "test_crash.py").write_text(
        "import os\n\n"
        "def test_dies_natively():\n    os.abort()\n\n"
        "def test_a():\n    pass\n\n"
        "def test_b():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                        "-p", "no:cacheprovider", str(tmp_path / "test_crash.py")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "crashed while running 'test_crash.py::test_dies_natively'" in out, out[-3000:]
    assert "1 failed, 2 passed" in out, out[-3000:]
