"""The package as users install it: a wheel built from a clean copy of the sources, installed into
a fresh virtual environment, exercised from outside the checkout (scripts/wheel_smoke.py).

The editable install the other tests use hides what a wheel lacks (a subpackage left out of the
package list, the C++ extension, an entry point). torch and the other dependencies come from this
interpreter's site-packages, so no multi-GB download happens — but not through
`--system-site-packages`: that would also run the checkout's editable-install hook (a `.pth`
file), whose import finder quietly serves any module the wheel lacks from the checkout. The venv
sees the system site-packages as a plain path instead (`.pth` files there are not run). About 1 min."""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sh(*cmd, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _clean_copy(dest: Path) -> Path:
    """The files git would ship (tracked, or new and not ignored): no build/ leftovers."""
    files = _sh("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_symlink():  # rela/kernels -> ../kernels stays a link, as git checks it out
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout: the wheel is built from the files git would ship")
    src = _clean_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src)
    (whl,) = out.glob("rela_accel-*.whl")
    return whl


def test_the_wheel_ships_every_package_and_the_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.endswith(".py")}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rela").rglob("*.py")}
    wanted |= {f"rela/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}  # through the link
    assert wanted <= shipped, f"missing from the wheel: {sorted(wanted - shipped)}"
    assert "rela/kernels/__init__.py" not in shipped  # rela.kernels is a namespace package (kernels/README.md)
    assert any(n.startswith("rela/_C.") and n.endswith(".so") for n in names), "no compiled rela._C"
    assert not any(n.startswith(("kernels/", "tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rela = rela.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_user_can_convert_load_train_and_evaluate_from_the_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    venv_site = _sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # Every site-packages folder this interpreter sees, also one it sees through a .pth (make test-latest's venv)
    deps = dict.fromkeys([*site.getsitepackages(), *(p for p in sys.path if p.endswith("site-packages"))])
    Path(venv_site, "dependencies.pth").write_text("\n".join(deps) + "\n")
    # The checkout's own (editable) rela-accel is on that path too: replace it in the venv and keep
    # the dependencies that are there (the smoke checks the wheel's declared ones are met).
    _sh(py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel)
    r = _sh(py, ROOT / "scripts" / "wheel_smoke.py", tmp_path / "work", "--checkout", ROOT, cwd=tmp_path)
    assert "wheel smoke: all steps passed" in r.stdout, r.stdout
    from rela.loading.backends import available

    for backend, installed in available().items():  # every backend installed here ran an epoch
        assert (f"backend {backend}: an epoch" in r.stdout) == installed, r.stdout
    assert str(venv) in r.stdout  # rela came from the venv's site-packages, not the checkout
