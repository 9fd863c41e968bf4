"""Listing an image folder, fast, and remembering the listing until the folder changes.

ImageNet's train split is 1.28M files in 1000 folders. torchvision's ImageFolder lists names
only; rela also needs every file's size (it is part of the fingerprint that ties a target store
to its data), which costs one stat per file — on a cold cache, one inode read from the disk.
So the listing runs in `rela._C.list_dirs`: getdents + fstatat relative to the directory's
descriptor, on a pool of threads so the disk sees several requests at once (pure-Python
fallback below, same result). `bench/scale.py` measures it against torchvision's scan.

The listing is then cached under `$RELA_CACHE/scans/`, keyed on the folder's real path and
validated by each listed directory's (mtime, inode, device): adding, removing or renaming a
file changes its directory's mtime. A warm open stats ~1000 directories, not 1.28M files.

What the cache cannot see: a file rewritten **in place** under the same name (its directory's
mtime does not change), so its size in the cached listing is stale. Such a change is caught by
a deep fingerprint (`rela convert --deep`, `fingerprint(deep=True)`), which reads every file and
never uses the cache, or by opening with the cache off (`RELA_SCAN_CACHE=0`,
`ImageFolder(root, cache=False)`). Directories modified within `RACY_SECONDS` of the scan are
not cached at all: a change in the same clock tick would not move their mtime (git's "racy" rule).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rela.errors import DatasetError, RelaWarning

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CACHE_VERSION = 1
RACY_SECONDS = 2.0
THREADS = 8  # outstanding stats: I/O parallelism on a cold cache, not CPU parallelism

try:  # pragma: no cover - whichever build is installed
    from rela._C import list_dirs as _c_list_dirs
except ImportError:  # pragma: no cover
    _c_list_dirs = None


@dataclass
class Listing:
    """One directory: its images (paths relative to the root, sorted) and their sizes, other
    files, sub-folders (and which are links), and its (mtime_ns, inode, device)."""

    images: list[str]
    sizes: np.ndarray
    others: list[str]
    subdirs: list[str]
    links: list[bool]
    stamp: tuple[int, int, int]


@dataclass
class FolderScan:
    """What ImageFolder needs from a listing, in dataset order."""

    classes: list[str]
    paths: list[str]  # relative to the root, "/"-separated
    sizes: np.ndarray  # int64 bytes
    labels: np.ndarray  # int64; -1 in a flat (unlabeled) folder
    ignored_top: int = 0  # images at the top level, ignored because class folders are in use
    others: list[str] = field(default_factory=list)  # non-image files inside class folders
    dirs: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # rel dir -> stamp
    digest: str | None = None  # the shallow fingerprint's sha256, once computed
    from_cache: bool = False
    in_cache: bool = False  # a cache file holds this listing


def cache_enabled(cache: bool = True) -> bool:
    return cache and os.environ.get("RELA_SCAN_CACHE", "1") not in ("0", "false", "no", "off")


def scan(root: Path, cache: bool = True) -> FolderScan:
    """The folder's listing: from the cache when nothing listed has changed, else scanned (and cached)."""
    use_cache = cache_enabled(cache)
    if use_cache:
        cached = load_cached(root)
        if cached is not None:
            return cached
    started = time.time_ns()
    result = scan_fresh(root)
    if use_cache:
        save_cached(root, result, started)
    return result


def scan_fresh(root: Path) -> FolderScan:
    top = os.fsdecode(os.path.abspath(root))
    (rootlisting,) = list_dirs(top, [""])
    classes = sorted(rootlisting.subdirs)
    dirs = {"": rootlisting.stamp}
    per_class: list[list[str]] = [[] for _ in classes]
    sizes_per_class: list[list[np.ndarray]] = [[] for _ in classes]
    others: list[str] = []
    owner = {c: k for k, c in enumerate(classes)}  # rel dir -> class index
    for c, is_link in zip(rootlisting.subdirs, rootlisting.links, strict=True):
        if is_link:
            refuse_a_loop(os.path.join(top, c), top, top)
    pending = list(classes)
    while pending:  # one level of folders at a time, listed in parallel
        found = []
        for rel, listing in zip(pending, list_dirs(top, pending), strict=True):
            k = owner[rel]
            dirs[rel] = listing.stamp
            per_class[k].append(listing.images)
            sizes_per_class[k].append(listing.sizes)
            others += listing.others
            for sub, is_link in zip(listing.subdirs, listing.links, strict=True):
                if is_link:
                    refuse_a_loop(os.path.join(top, sub), os.path.join(top, rel), top)
                owner[sub] = k
                found.append(sub)
        pending = found
    return _assemble(root, classes, per_class, sizes_per_class, others, rootlisting, dirs)


def _assemble(root, classes, per_class, sizes_per_class, others, rootlisting, dirs) -> FolderScan:
    paths: list[str] = []
    sizes, labels, empty = [], [], []
    for k, (names, szs) in enumerate(zip(per_class, sizes_per_class, strict=True)):
        if len(names) > 1:  # nested folders: the class's files sorted by their whole relative path
            pairs = sorted(zip((n for part in names for n in part), np.concatenate(szs).tolist(), strict=True))
            names, szs = [[p for p, _ in pairs]], [np.array([s for _, s in pairs], np.int64)]
        count = len(names[0])
        if count == 0:
            empty.append(classes[k])
        paths += names[0]
        sizes.append(szs[0])
        labels.append(np.full(count, k, np.int64))
    if paths:
        if empty:  # torchvision's ImageFolder refuses them too: every later class's label would shift
            raise DatasetError(f"{root}: class folder(s) {', '.join(empty[:5])}{' and more' if len(empty) > 5 else ''} "
                               f"hold no images; remove them or add images (looked for {', '.join(IMG_EXTENSIONS)})")
        return FolderScan(classes, paths, np.concatenate(sizes), np.concatenate(labels),
                          ignored_top=len(rootlisting.images), others=sorted(others), dirs=dirs)
    if not rootlisting.images:
        raise DatasetError(f"no images found under {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    return FolderScan([], rootlisting.images, rootlisting.sizes, np.full(len(rootlisting.images), -1, np.int64),
                      dirs={"": rootlisting.stamp})


def list_dirs(top: str, rels: list[str]) -> list[Listing]:
    """Each of top/rel listed (see `Listing`); DatasetError for a file that cannot be read."""
    if _c_list_dirs is None:
        return [_list_dir_py(top, rel) for rel in rels]
    enc = [ext.encode() for ext in IMG_EXTENSIONS]
    out = []
    for rel, (images, sizes, others, subdirs, links, error, stamp) in zip(rels, _c_list_dirs(
            os.fsencode(top), [os.fsencode(r) for r in rels], enc, THREADS), strict=True):
        if error:
            path, _, code = error.partition(b"\t")
            if not _broken_link(os.fsdecode(path), int(code)):
                _raise_unreadable(os.fsdecode(path), int(code))
            out.append(_list_dir_py(top, rel))  # keeps its broken links as samples that fail to load
            continue
        names = _split(images)
        if not images.isascii():  # bytes order == str order for UTF-8, not for surrogate-escaped names
            order = sorted(range(len(names)), key=names.__getitem__)
            names, sizes = [names[i] for i in order], sizes[order]
        out.append(Listing(names, sizes, sorted(_split(others)), _split(subdirs), [b == 1 for b in links],
                           tuple(stamp)))
    return out


def _split(blob: bytes) -> list[str]:
    return blob.decode("utf-8", "surrogateescape").split("\0") if blob else []


def _list_dir_py(top: str, rel: str) -> Listing:
    """The fallback without rela._C: os.scandir, the same listing."""
    path = os.path.join(top, rel) if rel else top
    prefix = rel + "/" if rel else ""
    images, sizes, others, subdirs, links = [], [], [], [], []
    try:
        st = os.stat(path)
        with os.scandir(path) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir()  # follows links, as os.walk(followlinks=True)
                except OSError:  # a link cycle (ELOOP): not a folder; listed below if it is an image
                    is_dir = False
                if is_dir:
                    subdirs.append(prefix + e.name)
                    links.append(e.is_symlink())
                elif not e.name.lower().endswith(IMG_EXTENSIONS):
                    others.append(prefix + e.name)
                else:
                    try:
                        sizes.append(e.stat().st_size)
                    except OSError as err:
                        if not _broken_link(e.path, err.errno):
                            _raise_unreadable(e.path, err.errno)
                        sizes.append(-1)  # listed; loading it raises a CorruptImageError that names why
                    images.append(prefix + e.name)
    except OSError as err:
        _raise_unreadable(path, err.errno)
    order = sorted(range(len(images)), key=images.__getitem__)
    return Listing([images[i] for i in order], np.array(sizes, np.int64)[order], sorted(others), subdirs, links,
                   (st.st_mtime_ns, st.st_ino, st.st_dev))


def _broken_link(path: str, code: int) -> bool:
    """An image entry that is a dangling symlink or part of a symlink cycle: one bad sample (a
    counted skip under on_error='skip' / --skip-corrupt), not a broken dataset."""
    return code in (errno.ENOENT, errno.ELOOP) and os.path.islink(path)


def broken_link_reason(path: str) -> str | None:
    """Why a listed image can't be opened, when the reason is its link: a cycle or a dangling one."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink cycle (its links lead back to themselves); remove the link"
        return f"a dangling symlink (its target {os.readlink(path)} does not exist)"
    return None


def _raise_unreadable(path: str, code: int):
    hint = " (a symlink cycle)" if code == errno.ELOOP else " (a dangling symlink?)" if os.path.islink(path) else ""
    raise DatasetError(f"{path}: cannot read it{hint}: {os.strerror(code)}; fix or remove it") from None


def refuse_a_loop(link: str, dirpath: str, root: str) -> None:
    """A folder link whose target contains the link itself (or the dataset root): a loop that
    would repeat the tree above it under this class's label until the path grew too long."""
    target = os.path.realpath(link)
    for inside in (os.path.realpath(dirpath), os.path.realpath(root)):
        if inside == target or inside.startswith(target.rstrip(os.sep) + os.sep):
            raise DatasetError(f"{link} is a link to {target}, a folder that contains it: a loop that would repeat "
                               "those images under another label. Remove the link")


# --- the cache ---------------------------------------------------------------------------------
def cache_root() -> Path:
    """Where rela caches what it derives from datasets ($RELA_CACHE, default ~/.cache/rela)."""
    return Path(os.environ.get("RELA_CACHE", Path.home() / ".cache" / "rela"))


def cache_dir(name: str, what: str = "rela's caches") -> Path | None:
    """cache_root()/name for one kind of cache, private to this user: created 0700, and None
    (caching off, said once) when it or the cache root belongs to another user or others may write
    to it — a listing planted there could point samples outside the data or swap their labels.
    `what` names what is not cached, for the warning."""
    root = cache_root()
    path = root / name
    try:
        for d in (root, path):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(d)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                who = "another user" if st.st_uid != os.getuid() else "you, but others may write to it"
                _warn_once(f"rela's cache folder {d} belongs to {who}: caching is off. Point RELA_CACHE at a "
                           "folder of your own (created 0700), or chmod go-w it")
                return None
    except OSError as e:
        _warn_once(f"could not save {what} to {path} ({e.strerror}): caching is off. Point RELA_CACHE at a "
                   "writable folder")
        return None
    return path


def cache_file(root: Path) -> Path | None:
    folder = cache_dir("scans", f"the folder listing of {root}")
    key = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:32]
    return None if folder is None else folder / f"{key}.npz"


def _meta(root: Path, result: FolderScan) -> dict:
    return {"version": CACHE_VERSION, "extensions": list(IMG_EXTENSIONS), "root": os.path.realpath(root),
            "classes": result.classes, "ignored_top": result.ignored_top, "others": result.others,
            "dirs": result.dirs, "digest": result.digest}


def save_cached(root: Path, result: FolderScan, started_ns: int | None) -> None:
    """Write the listing, unless a directory changed within RACY_SECONDS of the scan that began at
    `started_ns` (its mtime could hide a change made in the same tick; None: already checked).
    Best effort: a cache that cannot be written costs the next open a scan, so it warns once."""
    if started_ns is not None and any(stamp[0] >= started_ns - RACY_SECONDS * 1e9 for stamp in result.dirs.values()):
        return
    from rela.data.store import atomic_write_bytes

    path = cache_file(root)
    if path is None:
        return
    blob = "\0".join(result.paths).encode("utf-8", "surrogateescape")
    meta = json.dumps(_meta(root, result)).encode()
    buf = io.BytesIO()
    np.savez(buf, paths=np.frombuffer(blob, np.uint8), sizes=result.sizes, labels=result.labels,
             meta=np.frombuffer(meta, np.uint8))
    try:
        atomic_write_bytes(path, buf.getvalue(), durable=False)
        result.in_cache = True
    except OSError as e:
        _warn_once(f"could not save the folder listing of {root} to {path} ({e.strerror}): every open scans it "
                   "again. Point RELA_CACHE at a writable folder")


def load_cached(root: Path) -> FolderScan | None:
    """The cached listing if every listed directory still has its recorded stamp, else None."""
    path = cache_file(root)
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if (meta.get("version") != CACHE_VERSION or meta.get("extensions") != list(IMG_EXTENSIONS)
                    or meta.get("root") != os.path.realpath(root) or not _unchanged(root, meta["dirs"])):
                return None
            paths = _split(z["paths"].tobytes())
            sizes, labels = z["sizes"], z["labels"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # no cache, or an unreadable one: scan
    if not (len(paths) == len(sizes) == len(labels)) or not _listing_is_sound(meta["classes"], paths, labels):
        return None
    return FolderScan(meta["classes"], paths, sizes, labels, meta["ignored_top"], meta["others"],
                      {k: tuple(v) for k, v in meta["dirs"].items()}, meta["digest"], from_cache=True, in_cache=True)


def _listing_is_sound(classes: list[str], paths: list[str], labels: np.ndarray) -> bool:
    """A cached listing is trusted only when a scan could have made it: labels in class order (a
    scan lists class by class) and each class's first and last path inside its folder. Each path
    is checked in full when used (`safe_relative`, from ImageFolder.path): 1.28M per-path checks
    here cost 0.4 s, twice a warm open."""
    if not classes:
        return bool((labels == -1).all())
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes) or (np.diff(labels) < 0).any()):
        return False
    starts = np.searchsorted(labels, np.arange(len(classes)), "left").tolist()
    stops = np.searchsorted(labels, np.arange(len(classes)), "right").tolist()
    return all(start == stop or (safe_relative(paths[start], classes[k]) and safe_relative(paths[stop - 1], classes[k]))
               for k, (start, stop) in enumerate(zip(starts, stops, strict=True)))


def safe_relative(path: str, class_name: str | None) -> bool:
    """`path` is what a scan lists: relative, "/"-separated, no empty, `.` or `..` part (nor a
    hidden one: scans skip those), inside class folder `class_name` (None: a flat folder's file)."""
    parts = path.split("/")
    if any(not p or p.startswith(".") or "\0" in p for p in parts):
        return False
    return len(parts) == 1 if class_name is None else len(parts) >= 2 and parts[0] == class_name


def _unchanged(root: Path, dirs: dict) -> bool:
    top = os.fspath(root)
    for rel, stamp in dirs.items():
        try:
            st = os.stat(os.path.join(top, rel) if rel else top)
        except OSError:
            return False
        if [st.st_mtime_ns, st.st_ino, st.st_dev] != list(stamp):
            return False
    return True


def remember_digest(root: Path, result: FolderScan) -> None:
    """Add the shallow fingerprint to the cached listing, so a warm open does not hash 1.28M
    records again. Only a listing that is in the cache (it passed the racy check) is rewritten;
    its stamps are checked again at the next load."""
    if result.in_cache and cache_enabled():
        save_cached(root, result, None)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RelaWarning, stacklevel=3)
