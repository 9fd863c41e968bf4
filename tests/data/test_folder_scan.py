"""The image-folder listing: compiled and Python listings agree, and the cached listing is used
exactly while the folder is unchanged (and what it cannot see is what the docs say)."""

import os
import time
import warnings

import numpy as np
import pytest

from rela.data import folder_scan
from rela.data.datasets import ImageFolder
from rela.errors import RelaWarning
from tests.conftest import make_folder


def age(root, seconds: float = 60) -> None:
    """Set every folder's mtime in the past, as for a dataset copied long ago (else the racy
    rule keeps a just-written folder out of the cache)."""
    past = time.time() - seconds
    for d, _, _ in os.walk(root, followlinks=False):
        os.utime(d, (past, past))


def listing(ds: ImageFolder):
    return [(ds._paths[i], ds.size(i), ds.label(i)) for i in range(len(ds))], ds.classes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RELA_SCAN_CACHE", raising=False)
    return tmp_path / "cache" / "scans"


@pytest.fixture
def folder(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=4)
    age(root)
    return root


def test_compiled_and_python_listings_agree(tmp_path, monkeypatch):
    if folder_scan._c_list_dirs is None:
        pytest.skip("rela._C is not built")
    root = make_folder(tmp_path / "data", classes=3, per_class=3, ext=".JPG")
    (root / "class_0" / "nested" / "deeper").mkdir(parents=True)
    (root / "class_0" / "nested" / "deeper" / "z.png").write_bytes(b"x" * 7)
    (root / "class_0" / "nested" / "a.jpeg").write_bytes(b"y" * 3)
    (root / "class_1" / "notes.txt").write_text("not an image")
    (root / "class_1" / ".hidden.jpg").write_bytes(b"h")
    (root / "class_1" / ".ipynb_checkpoints").mkdir()
    (root / "class_1" / ".ipynb_checkpoints" / "c.jpg").write_bytes(b"c")
    (root / "class_2" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"latin-1 name")  # not UTF-8
    (root / "class_2" / "é.jpg").write_bytes(b"utf-8 name")
    other = make_folder(tmp_path / "elsewhere", classes=1, per_class=2)
    (root / "class_2" / "linked").symlink_to(other / "class_0")
    (root / "class_2" / "link.jpg").symlink_to(root / "class_0" / "img_000.JPG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RelaWarning)
        compiled = listing(ImageFolder(root, cache=False))
        monkeypatch.setattr(folder_scan, "_c_list_dirs", None)
        python = listing(ImageFolder(root, cache=False))
    assert compiled == python
    paths = [p for p, _, _ in compiled[0]]
    assert "class_0/nested/deeper/z.png" in paths and "class_2/linked/img_001.jpg" in paths
    assert not any("hidden" in p or "ipynb" in p or p.endswith(".txt") for p in paths)
    assert len(paths) == 9 + 2 + 2 + 2 + 1


def test_a_warm_open_uses_the_cached_listing_and_fingerprint(folder, cache, monkeypatch):
    first = ImageFolder(folder)
    assert not first._scan.from_cache and len(list(cache.iterdir())) == 1
    fp = first.fingerprint()
    calls = []
    monkeypatch.setattr(folder_scan, "scan_fresh", lambda root: calls.append(root))
    monkeypatch.setattr(ImageFolder, "_record", lambda *a: pytest.fail("a warm open hashed the records again"))
    again = ImageFolder(folder)
    assert again._scan.from_cache and not calls
    assert listing(again) == listing(first) and again.fingerprint() == fp
    assert isinstance(again.label(0), int) and again.labels().dtype == np.int64


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new class", "remove class", "nested"])
def test_any_change_to_the_listing_makes_it_scan_again(folder, cache, change):
    c0 = folder / "class_0"
    (c0 / "sub").mkdir()
    (c0 / "sub" / "x0.jpg").write_bytes(b"x")
    age(folder)
    before = listing(ImageFolder(folder))
    assert ImageFolder(folder)._scan.from_cache
    if change == "add":
        (c0 / "img_999.jpg").write_bytes((c0 / "img_000.jpg").read_bytes())
    elif change == "remove":
        (c0 / "img_001.jpg").unlink()
    elif change == "rename":
        (c0 / "img_001.jpg").rename(c0 / "img_abc.jpg")
    elif change == "new class":
        make_folder(folder / "extra_root", classes=1, per_class=1)
        (folder / "extra_root" / "class_0").rename(folder / "class_9")
        (folder / "extra_root").rmdir()
    elif change == "remove class":
        for f in (folder / "class_2").iterdir():
            f.unlink()
        (folder / "class_2").rmdir()
    elif change == "nested":  # only the nested folder's mtime moves
        (c0 / "sub" / "x1.jpg").write_bytes(b"x")
    after = ImageFolder(folder)
    assert not after._scan.from_cache
    assert listing(after) == listing(ImageFolder(folder, cache=False)) != before


def test_what_the_cache_cannot_see_a_deep_fingerprint_sees(folder, cache):
    """A file rewritten in place keeps its folder's mtime: the cached listing keeps the old size
    (documented), the deep fingerprint reads the file, and cache=False lists the new size."""
    shallow, deep = ImageFolder(folder).fingerprint(), ImageFolder(folder).fingerprint(deep=True)
    target = folder / "class_1" / "img_002.jpg"
    with open(target, "r+b") as f:  # in place: same inode, same folder mtime
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 100)
    cached = ImageFolder(folder)
    assert cached._scan.from_cache and cached.fingerprint() == shallow  # the documented blind spot
    assert cached.fingerprint(deep=True)["digest"] != deep["digest"]
    rescanned = ImageFolder(folder, cache=False)
    assert rescanned.fingerprint()["digest"] != shallow["digest"]
    assert rescanned.fingerprint(deep=True) == cached.fingerprint(deep=True)


def test_just_written_folders_and_disabled_caches_are_not_cached(tmp_path, cache, monkeypatch):
    fresh = make_folder(tmp_path / "fresh", classes=2, per_class=2)
    ImageFolder(fresh)
    assert not cache.exists() or not list(cache.iterdir())  # racy: modified within RACY_SECONDS
    age(fresh)
    monkeypatch.setenv("RELA_SCAN_CACHE", "0")
    ImageFolder(fresh)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_damaged_or_unwritable_cache_costs_a_scan_not_an_error(folder, cache, tmp_path, monkeypatch):
    ImageFolder(folder)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"not an npz")
    expected = listing(ImageFolder(folder, cache=False))
    assert listing(ImageFolder(folder)) == expected
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("RELA_CACHE", str(blocker))
    with pytest.warns(RelaWarning, match="could not save the folder listing"):
        assert listing(ImageFolder(folder)) == expected
