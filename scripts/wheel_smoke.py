"""What a user does first with an installed wheel, run from outside the checkout.

    python scripts/wheel_smoke.py WORKDIR [--checkout PATH]

Run by the virtual environment's python that has the wheel installed (tests/test_wheel.py builds
the wheel, makes that environment and runs this). It fails when a subpackage, the C++ extension,
an entry point or a data file is missing from the wheel: `rela convert` on a small image folder,
a `rela.Loader` epoch on every backend installed here, `rela train` for a few steps, `rela eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _images(root: Path, classes: int, per_class: int, seed: int) -> Path:
    """A small labelled JPEG folder (smooth random colour fields, two sizes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (40, 48) if i % 2 else (48, 40)
            low = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
            img.save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    return root


def _rela(*args: str) -> str:
    """The installed `rela` console script, as a user runs it."""
    exe = shutil.which("rela", path=os.path.dirname(sys.executable))
    assert exe, f"no `rela` entry point next to {sys.executable}"
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"rela {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _check_requirements() -> None:
    """Every dependency the wheel declares (extras aside) is installed at a version it accepts."""
    from importlib import metadata

    from packaging.requirements import Requirement

    for text in metadata.requires("rela-accel") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"the wheel needs {req}, which is not installed") from None
        assert req.specifier.contains(have, prereleases=True), f"the wheel needs {req}, found {have}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--checkout", type=Path, help="the source checkout rela must NOT be imported from")
    a = ap.parse_args()
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)

    import rela
    from rela import _ext

    where = Path(rela.__file__).resolve()
    print(f"rela {rela.__version__} from {where}")
    if a.checkout is not None:
        assert a.checkout.resolve() not in where.parents, f"rela was imported from the checkout ({where})"
    assert Path(sys.prefix).resolve() in where.parents, f"rela is not the installed wheel ({where})"
    assert _ext.has_extension(), "the wheel has no rela._C"
    _check_requirements()
    import torch

    from rela.kernels.rela_loss import rela_loss

    pred, target = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    rela_loss(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()

    train_dir, test_dir = _images(work / "train", 2, 24, 0), _images(work / "test", 2, 8, 1)
    print(_rela("convert", "--data", str(train_dir), "--prior", "random:resnet18", "--input-size", "32",
                "--dim", "8", "--out", "store", "--workers", "0", "--quiet"))
    info = json.loads(_rela("info", "store", "--json"))
    assert info["manifest"]["n"] == 48 and info["stats"]["nan"] == 0

    from rela.loading.backends import available

    for backend, ok in available().items():
        if not ok:
            print(f"backend {backend}: not installed here, skipped")
            continue
        loader = rela.Loader(str(train_dir), 16, targets="store", views="rela", image_size=32, backend=backend,
                             num_workers=1, shuffle=False)
        batches = list(loader)
        loader.close()
        assert len(batches) == 3 and batches[0]["views"][0].shape == (16, 3, 32, 32), backend
        assert batches[0]["target"].shape == (16, 8), backend
        print(f"backend {backend}: an epoch of {len(batches)} batches")

    print(_rela("train", "--data", str(train_dir), "--prior", "store", "--out", "run", "--epochs", "2",
                "--batch-size", "16", "--width", "0.0625", "--workers", "0", "--phase", "fixed:0.5",
                "--test-data", str(test_dir), "--quiet"))
    result = json.loads(_rela("eval", "run", "--probe-epochs", "3", "--json", "--quiet"))
    assert 0 <= result["linear_top1"] <= 1 and result["test_samples"] == 16

    import rela.cli  # noqa: F401 - with it, every floor is loaded in this process
    import rela.training.train  # noqa: F401

    outside = sorted(
        m
        for m, mod in sys.modules.items()
        if m.startswith("rela")
        and getattr(mod, "__file__", None)
        and Path(sys.prefix).resolve() not in Path(mod.__file__).resolve().parents
    )
    assert not outside, f"modules not loaded from the installed wheel: {outside}"
    print("wheel smoke: all steps passed")


if __name__ == "__main__":
    main()
