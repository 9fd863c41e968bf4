"""The image-folder listing: compiled and Python listings agree, and the cached listing is used
exactly while the folder is unchanged (and what it cannot see is what the docs say)."""

import os
import time
import warnings

import numpy as np
import pytest

from rela.data import folder_scan
from rela.data.datasets import ImageFolder
from rela.errors import DatasetError, RelaWarning
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


# --- caches that can't be poisoned ------------------------------------------------------------

def test_cache_folders_are_created_private(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RELA_CACHE", str(tmp_path / "new" / "cache"))
    ImageFolder(folder)
    for d in (tmp_path / "new" / "cache", tmp_path / "new" / "cache" / "scans"):
        assert d.stat().st_mode & 0o777 == 0o700, oct(d.stat().st_mode)


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another user's"])
def test_a_cache_folder_others_can_write_turns_caching_off_with_one_warning(folder, tmp_path, monkeypatch, how):
    root = tmp_path / "shared-cache"
    root.mkdir()
    if how == "another user's":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(root, 65534, 65534)
    else:
        root.chmod(0o777 if how == "world-writable" else 0o770)
    monkeypatch.setenv("RELA_CACHE", str(root))
    monkeypatch.setattr(folder_scan, "_warned", set())
    with pytest.warns(RelaWarning, match="caching is off") as w:
        got = listing(ImageFolder(folder))
    assert len([x for x in w if "caching is off" in str(x.message)]) == 1 and "\n" not in str(w[0].message)
    assert got == listing(ImageFolder(folder, cache=False))
    assert not (root / "scans").exists()  # nothing read from it, nothing written to it


def _rewrite_cache(entry, **arrays):
    with np.load(entry, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    np.savez(entry, **data)


def _paths_blob(paths):
    return np.frombuffer("\0".join(paths).encode(), np.uint8)


def test_a_planted_listing_is_never_used(folder, cache):
    """A planted scan-cache entry once pointed samples outside the data root and swapped labels while
    keeping the digest: a listing no scan could have made is scanned again, or refused when used."""
    ds = ImageFolder(folder)
    fresh = listing(ImageFolder(folder, cache=False))
    (entry,) = cache.iterdir()
    paths, labels = list(ds._paths), ds.labels()

    flipped = labels.copy()
    flipped[5] = 2  # a label in the middle of class 1's block
    _rewrite_cache(entry, labels=flipped)
    again = ImageFolder(folder)
    assert listing(again) == fresh and not again._scan.from_cache

    for bad in ("../../outside.jpg", "/etc/passwd", "class_0/../../outside.jpg", "class_1/img_000.jpg"):
        ImageFolder(folder, cache=False)  # the good listing again
        _rewrite_cache(entry, paths=_paths_blob([bad, *paths[1:]]))  # the first path: checked at open
        again = ImageFolder(folder)
        assert listing(again) == fresh and not again._scan.from_cache, bad
    _rewrite_cache(entry, paths=_paths_blob([*paths[:2], "class_2/img_000.jpg", *paths[3:]]))
    ds = ImageFolder(folder)  # a path in the middle of a block: checked when it is used
    assert ds._scan.from_cache
    with pytest.raises(DatasetError, match="no scan of this folder does"):
        ds.load(2)
    _rewrite_cache(entry, paths=_paths_blob([*paths[:2], "class_0/../../x.jpg", *paths[3:]]))
    with pytest.raises(DatasetError, match="no scan of this folder does"):
        ImageFolder(folder).path(2)


def test_a_link_planted_at_a_cache_temp_name_is_not_followed(folder, cache, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("unrelated")
    ImageFolder(folder)
    (entry,) = cache.iterdir()
    entry.unlink()
    tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
    tmp.symlink_to(victim)  # the temp name this process will use
    age(folder)
    ImageFolder(folder)
    assert victim.read_text() == "unrelated" and entry.is_file() and not tmp.is_symlink()
