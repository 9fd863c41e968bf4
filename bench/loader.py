"""Benchmark data loading: rela.Loader against torch DataLoader + PIL, FFCV's and DALI's own
loaders, and the JPEG decode-only limit — same images, same pipeline, one run, same machine.

Data: a realistic JPEG set (default 2000 images of 400×350, quality 90) cut from scikit-image's
shipped photos by random rescales and crops (no synthetic noise). Built once under bench/out/.

Pipeline for every loader: decode → RandomResizedCrop(224, scale 0.08–1) → horizontal flip →
normalise → float32 C×H×W, batch 64; "two views" cuts two crops from each decoded image.
Reported: median img/s over epochs and CPU ms per image (this process + its workers), each
with its ratio to torch DataLoader + PIL (2 workers). The rows' epochs are interleaved (round k
runs every row's k-th epoch), so the machine's drift hits every row alike. Decode-only limit =
1-thread PIL decode rate (a row of its own in the same rounds) × cores. FFCV and DALI rows appear
when they are installed (`bash scripts/setup.sh` installs them).

`--busy` runs every row a second time while another process trains a small convnet on all
cores (what a CPU training step does to the loader's cores), and prints each row's img/s beside
its quiet rate, the trainer's steps/s while that row ran (a loader that wins by starving the
trainer is no win), and each rela row's ratio to FFCV's Loader, busy against quiet.

    python bench/loader.py [--images 2000] [--epochs 3] [--workers 2] [--profile] [--busy]
                           [--loaders torch rela-default rela-process rela-thread ffcv dali rela-dali rela-ffcv]
    python bench/loader.py --goals    # the goals: sizes 128/160/224 and DINO 2x224+6x96 against FFCV and DALI,
                                      # then the C++ call alone beside its crop-region decode (what a size can gain)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_seconds, device_line  # noqa: E402
from rela.data.priors import IMAGENET_MEAN as MEAN  # noqa: E402
from rela.data.priors import IMAGENET_STD as STD  # noqa: E402
from rela.errors import RelaError  # noqa: E402

OUT = ROOT / "bench" / "out"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "camera", "moon", "grass", "gravel", "brick", "coins", "clock"]


def build_jpegs(n: int, root: Path, size=(400, 350), quality: int = 90) -> Path:
    """n JPEGs cut from scikit-image's photos (random rescale, crop, flip); cached by count."""
    from PIL import Image
    from skimage import data

    folder = root / f"jpegs-v2-{n}-{size[0]}x{size[1]}-q{quality}" / "all"
    if folder.exists() and len(list(folder.iterdir())) == n:
        return folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in PHOTOS:
        try:
            a = getattr(data, name)()
        except Exception:  # a photo that needs a download: skip it
            continue
        img = Image.fromarray(a).convert("RGB")
        photos.append(img)
    rng = np.random.default_rng(0)
    W, H = size
    for i in range(n):
        img = photos[i % len(photos)]
        # Near the photo's own resolution (or below it, for the large ones): keeps real detail,
        # so files are the size of camera JPEGs (~80 KB at q90), not of smooth upscales.
        s = max(W / img.width, H / img.height) * rng.uniform(1.0, 1.25)
        big = img.resize((max(W, round(img.width * s)), max(H, round(img.height * s))), Image.LANCZOS)
        x, y = rng.integers(0, big.width - W + 1), rng.integers(0, big.height - H + 1)
        crop = big.crop((x, y, x + W, y + H))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:05d}.jpg", quality=quality)
    return folder.parent


def measure(rows: list[tuple[str, object]], n_images: int, epochs: int, busy: Busy | None = None) -> list[dict]:
    """`epochs` rounds that run every row's epoch in turn, after each ran once as a warm-up
    (interleaved, so a noisy neighbour slows every row alike rather than the one that happened to
    run then); median img/s and CPU ms/img per row (and, with `busy`, the trainer's median
    steps/s during that row's epochs)."""
    rates: dict[str, list[float]] = {name: [] for name, _ in rows}
    cpu: dict[str, list[float]] = {name: [] for name, _ in rows}
    steps: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(epochs):
        for name, make_epoch in rows:
            t, c, b = time.perf_counter(), cpu_seconds(), busy.steps() if busy else 0
            seen = make_epoch()
            dt, dc = time.perf_counter() - t, cpu_seconds() - c
            rates[name].append(seen / dt)
            cpu[name].append(1e3 * dc / seen)
            if busy:
                steps[name].append((busy.steps() - b) / dt)
    out = []
    for name, _ in rows:
        res = {"name": name, "img_s": statistics.median(rates[name]), "cpu_ms": statistics.median(cpu[name]),
               "images": n_images, "img_s_each_epoch": rates[name]}
        line = f"  {name:44s} {res['img_s']:8.1f} img/s  {res['cpu_ms']:6.2f} CPU ms/img"
        if busy:
            res["trainer_steps_s"] = statistics.median(steps[name])
            line += f"  trainer {res['trainer_steps_s']:5.2f} steps/s"
        print(line, flush=True)
        out.append(res)
    return out


# --- the competing compute job (--busy) ----------------------------------------------------

def _train_forever(counter, threads: int) -> None:
    """A small convnet's training steps on `threads` cores, forever; counts steps in `counter`."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(32, 3, 112, 112), torch.randint(0, 10, (32,))
    while True:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        with counter.get_lock():
            counter.value += 1


class Busy:
    """The trainer process of `--busy`: started once, shares every core with the loaders."""

    def __init__(self, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.counter = ctx.Value("q", 0)
        self.proc = ctx.Process(target=_train_forever, args=(self.counter, threads), daemon=True)
        self.proc.start()
        t = time.perf_counter()
        while self.steps() < 3 and time.perf_counter() - t < 120:  # started and warm
            time.sleep(0.2)
        t, s = time.perf_counter(), self.steps()
        time.sleep(3)
        self.alone = (self.steps() - s) / (time.perf_counter() - t)
        print(f"  trainer alone: {self.alone:.2f} steps/s ({threads} threads)", flush=True)

    def steps(self) -> int:
        return self.counter.value

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join()


# --- the loaders ---------------------------------------------------------------------------

PLAIN = (224, 0.08, 1.0)  # a view: (size, crop min scale, max scale); the plain RandomResizedCrop
DINO = [(224, 0.4, 1.0)] * 2 + [(96, 0.05, 0.4)] * 6  # DINO's multi-crop: 2 global + 6 local views


def as_views(views) -> list[tuple[int, float, float]]:
    """A view count (that many plain 224-px crops) or a list of (size, min scale, max scale)."""
    return [PLAIN] * views if isinstance(views, int) else list(views)


def rela_epoch(folder: Path, views, workers: int, worker_type: str | None = "process", backend: str = "torch",
               device: str = "cpu"):
    """rela.Loader's epoch; worker_type=None: the Loader's default (what users get)."""
    from rela import Loader
    from rela.loading.views import ViewSpec

    specs = [ViewSpec(s, scale=(lo, hi), flip=0.5, mean=MEAN, std=STD) for s, lo, hi in as_views(views)]
    kw = {} if worker_type is None else {"worker_type": worker_type}
    loader = Loader(str(folder), 64, views=specs, num_workers=workers, drop_last=False,
                    backend=backend, device=device, pin_memory=device != "cpu", **kw)

    def run() -> int:
        n = sum(len(b["index"]) for b in loader)
        if device != "cpu":
            torch.cuda.synchronize()  # the batches are on the GPU: count them once they are there
        return n

    return run


class _PILFolder(torch.utils.data.Dataset):
    def __init__(self, folder: Path, views: int) -> None:
        from torchvision import transforms as T

        self.files = sorted((folder / "all").iterdir())
        self.views = views
        self.tf = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                             T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            return [self.tf(im) for _ in range(self.views)]


def _worker_init(_):
    torch.set_num_threads(1)


def torch_epoch(folder: Path, views: int, workers: int):
    loader = torch.utils.data.DataLoader(_PILFolder(folder, views), batch_size=64, shuffle=True,
                                         num_workers=workers, worker_init_fn=_worker_init)

    def run() -> int:
        return sum(len(b[0]) for b in loader)

    return run


def ffcv_epoch(folder: Path, views, workers: int, quality: int = 90):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter
    from PIL import Image

    # FFCV decodes once per pipeline, and the PyPI release can't point two pipelines at one field:
    # two views need a file with the image stored twice (and so two decodes); multi-crop runs on
    # FFCV this way, one pipeline (and one decode) per view.
    views = as_views(views)
    beton = folder / (f"data-{len(views)}view.beton" if quality == 90 else f"data-{len(views)}view-q{quality}.beton")
    fields = ["image"] + [f"image{k + 1}" for k in range(1, len(views))]
    if not beton.exists():
        files = sorted((folder / "all").iterdir())

        class Src:
            def __len__(self):
                return len(files)

            def __getitem__(self, i):
                img = Image.open(files[i]).convert("RGB")
                return (*([img] * len(views)), 0)

        spec = {f: RGBImageField(write_mode="jpg", jpeg_quality=quality) for f in fields}
        DatasetWriter(str(beton), {**spec, "label": IntField()}, num_workers=workers).from_indexed_dataset(Src())
    mean = np.array(MEAN) * 255
    std = np.array(STD) * 255

    def pipe(size: int, lo: float, hi: float):
        return [RandomResizedCropRGBImageDecoder((size, size), scale=(lo, hi)), RandomHorizontalFlip(),
                NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]

    pipelines = {f: pipe(*v) for f, v in zip(fields, views, strict=True)}
    pipelines["label"] = [IntDecoder(), ToTensor()]
    loader = Loader(str(beton), batch_size=64, num_workers=workers, order=OrderOption.RANDOM,
                    pipelines=pipelines, os_cache=True, drop_last=False)

    def run() -> int:
        return sum(len(b[0]) for b in loader)

    return run


def dali_epoch(folder: Path, views, workers: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    n = len(list((folder / "all").iterdir()))

    @pipeline_def(batch_size=64, num_threads=workers, device_id=None, exec_dynamic=True)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(folder), random_shuffle=True, name="r")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        outs = []
        for size, lo, hi in as_views(views):  # DALI: one decode, crops cut from it
            crop = fn.random_resized_crop(images, size=(size, size), random_area=(lo, hi))
            outs.append(fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW",
                                                 mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                                 mirror=fn.random.coin_flip()))
        return (*outs, labels)

    p = pipe()
    p.build()
    it = DALIGenericIterator(p, [f"v{k}" for k in range(len(as_views(views)))] + ["label"], reader_name="r",
                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def run() -> int:
        return sum(len(b[0]["label"]) for b in it) if n else 0

    return run


DECODE_ROW = "decode only: PIL, 1 thread (limit = this x cores)"


def decode_epoch(folder: Path):
    """The decode-only limit's epoch: every image's bytes (read once, beforehand) decoded to RGB
    by PIL on one thread. Run in the same rounds as the loaders, so the limit drifts with them."""
    import io

    from PIL import Image

    data = [f.read_bytes() for f in sorted((folder / "all").iterdir())]

    def run() -> int:
        for b in data:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB").load()
        return len(data)

    return run


def _min_ms(fn, n: int, repeats: int = 3) -> float:
    """Best-of-`repeats` CPU ms per item of fn() over n items (process time: one thread)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return 1e3 * best / n


def profile_split(folder: Path, n: int = 300) -> dict:
    """The two stages inside rela's C++ call and FFCV's per-image stages, one thread, CPU ms per
    image on the same files and the same crop boxes. rela: one view against the same box asked
    twice (the second view costs one resample + normalise, no decode). FFCV's stages are run
    with the libraries its compiled decoder calls: a whole-image libjpeg-turbo decode (OpenCV's
    imdecode here), crop + `cv2.resize(INTER_AREA)` (its `resize_crop`), and the flip and the
    `NormalizeImage` lookup table as the Numba loops FFCV compiles them to."""
    import cv2
    from numba import njit

    @njit(cache=False)
    def flip(src, dst):  # FFCV's RandomHorizontalFlip: a Numba copy, mirrored
        h, w, c = src.shape
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    dst[y, x, k] = src[y, w - 1 - x, k]

    @njit(cache=False)
    def normalise(src, table, dst):  # FFCV's NormalizeImage on the CPU: a lookup per value
        h, w, c = src.shape
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    dst[y, x, k] = table[src[y, x, k], k]

    from rela import _ext
    from rela.loading.views import ViewSpec, geometry, sample_generator

    cv2.setNumThreads(1)
    files = sorted((folder / "all").iterdir())[:n]
    data = [f.read_bytes() for f in files]
    spec = ViewSpec(224, scale=(0.08, 1.0), flip=0.5, mean=MEAN, std=STD)
    geo = [geometry(spec, 350, 400, sample_generator(0, 0, i)) for i in range(n)]
    one = np.asarray([[g[:4]] for g in geo], np.int32)
    flips = np.asarray([[g[4]] for g in geo], np.uint8)
    scale = np.asarray([[1 / (255 * s) for s in STD]], np.float32)
    bias = np.asarray([[-m / s for m, s in zip(MEAN, STD, strict=True)]], np.float32)

    def rela(views: int):
        outs = [torch.empty(n, 3, 224, 224).numpy() for _ in range(views)]  # aligned as the loader's batches
        return lambda: _ext.decode_resized_crops(data, np.repeat(one, views, 1), np.repeat(flips, views, 1), 224, 1,
                                                 outs=outs, scale=np.repeat(scale, views, 0),
                                                 bias=np.repeat(bias, views, 0))

    r1, r2 = _min_ms(rela(1), n), _min_ms(rela(2), n)
    arrays = [np.frombuffer(b, np.uint8) for b in data]
    decoded = [cv2.imdecode(a, cv2.IMREAD_COLOR) for a in arrays]
    crops = [
        cv2.resize(im[t : t + h, x : x + w], (224, 224), interpolation=cv2.INTER_AREA)
        for im, (t, x, h, w, _) in zip(decoded, geo, strict=True)
    ]
    table = ((np.arange(256)[:, None] - np.array(MEAN) * 255) / (np.array(STD) * 255)).astype(np.float32)
    u8, f32 = np.empty((224, 224, 3), np.uint8), np.empty((224, 224, 3), np.float32)
    flip(crops[0], u8), normalise(crops[0], table, f32)  # compiled before timing
    ffcv = {
        "JPEG decode, whole image (libjpeg-turbo)": _min_ms(
            lambda: [cv2.imdecode(a, cv2.IMREAD_COLOR) for a in arrays], n
        ),
        "crop + resize INTER_AREA (OpenCV)": _min_ms(
            lambda: [
                cv2.resize(im[t : t + h, x : x + w], (224, 224), interpolation=cv2.INTER_AREA)
                for im, (t, x, h, w, _) in zip(decoded, geo, strict=True)
            ],
            n,
        ),
        "flip (Numba)": _min_ms(lambda: [flip(c, u8) for c in crops], n),
        "normalise, lookup table (Numba)": _min_ms(lambda: [normalise(c, table, f32) for c in crops], n),
    }
    out = {"rela_cpp": {"JPEG decode, crop region (libjpeg-turbo)": r1 - (r2 - r1),
                        "resample + flip + normalise, per view": r2 - r1, "total, one view": r1},
           "ffcv_equivalent": {**ffcv, "total": sum(ffcv.values())}}
    print(f"  inside the C++ call and FFCV's stages, {n} images, one thread (CPU ms/img):")
    for side, stages in out.items():
        for k, v in stages.items():
            print(f"    {side:16s} {k:44s} {v:6.3f}")
    return out


def profile_stages(folder: Path, views: int) -> dict:
    """CPU ms per image in each stage of rela's torch backend on plain crops, measured in this
    process with no workers (one thread, so the stages add up to the total): each stage's
    function is wrapped with a process-time counter for one epoch after a warm-up epoch. What
    worker processes or threads add (hand-off, scheduling) is their rows' CPU ms/img minus this
    total."""
    import collections

    import rela.loading.backends.torch_backend as tb
    from rela import Loader, _ext
    from rela.loading.views import ViewSpec

    spec = ViewSpec(224, scale=(0.08, 1.0), flip=0.5, mean=MEAN, std=STD)
    loader = Loader(str(folder), 64, views=[spec] * views, num_workers=0, drop_last=False)
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        def run(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[stage] += time.process_time() - t
        setattr(owner, attr, run)

    rules = loader._rules
    for owner, attr, stage in ((rules, "jpeg_file", "file read + JPEG header (Python)"),
                               (rules, "generator", "per-sample random streams (Python)"),
                               (tb, "geometry", "crop box + flip draw (Python; views with colour ops)"),
                               (tb, "geometry_batch", "crop box + flip draw (one C++ call per view)"),
                               (tb, "colour_params", "colour draw (Python; no ops on plain crops)"),
                               (_ext, "decode_resized_crops", "Huffman + IDCT + resample + flip + normalise (C++)"),
                               (tb, "normalize_batch", "normalise to float32 (rows off the C++ path)"),
                               (rules, "assemble", "assemble (labels, targets)")):
        timed(owner, attr, stage)
    sum(len(b["index"]) for b in loader)  # warm-up
    spent.clear()
    t = time.process_time()
    n = sum(len(b["index"]) for b in loader)
    total = time.process_time() - t
    stages = {k: 1e3 * v / n for k, v in spent.items()}
    stages["other (loop, copies, Python glue)"] = 1e3 * total / n - sum(stages.values())
    print(f"  profile, {views} view(s), in-process, {n} images: {1e3 * total / n:.2f} CPU ms/img")
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"    {k:46s} {v:6.2f} ms/img  {100 * v / (1e3 * total / n):5.1f}%")
    return {"views": views, "total_cpu_ms": 1e3 * total / n, "stages_cpu_ms": stages}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "torchvision", "numpy", "pillow", "ffcv", "numba", "nvidia-dali-cuda130", "rela-accel"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


_default_unraisable = sys.unraisablehook


def _quiet_numba_finaliser(u) -> None:
    """numba's dispatcher finaliser raises KeyError when FFCV's compiled loaders are collected (a
    numba bug, harmless): one line instead of its traceback; anything else as Python prints it."""
    files, tb = [], u.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if isinstance(u.exc_value, KeyError) and any(f"{os.sep}numba{os.sep}" in f for f in files):
        print("  (numba's finaliser raised KeyError collecting FFCV's compiled code: ignored)", flush=True)
        return
    _default_unraisable(u)


LOADERS = {  # --loaders name → (row name, epoch factory(folder, views, workers, device))
    "torch": ("torch DataLoader + PIL (baseline)", lambda f, v, w, d: torch_epoch(f, v, w)),
    "rela-default": ("rela.Loader, defaults (worker_type auto)", lambda f, v, w, d: rela_epoch(f, v, w, None)),
    "rela-process": ("rela.Loader, torch backend, worker processes", lambda f, v, w, d: rela_epoch(f, v, w)),
    "rela-thread": ("rela.Loader, torch backend, worker threads", lambda f, v, w, d: rela_epoch(f, v, w, "thread")),
    "ffcv": ("FFCV 1.x Loader", lambda f, v, w, d: ffcv_epoch(f, v, w)),
    # rela's ffcv backend stores JPEGs at q95 (FFCV re-encodes them): its overhead is measured
    # against FFCV's own Loader on a .beton of that quality
    "ffcv-q95": ("FFCV 1.x Loader, q95 .beton", lambda f, v, w, d: ffcv_epoch(f, v, w, 95)),
    "dali": ("DALI CPU pipeline", lambda f, v, w, d: dali_epoch(f, v, w)),
    "rela-dali": ("rela.Loader, dali backend", lambda f, v, w, d: rela_epoch(f, v, w, backend="dali")),
    "rela-ffcv": ("rela.Loader, ffcv backend", lambda f, v, w, d: rela_epoch(f, v, w, backend="ffcv")),
    "rela-dali-gpu": ("rela.Loader, dali backend, GPU decode",
                      lambda f, v, w, d: rela_epoch(f, v, w, backend="dali", device=d)),
}


def run_rows(folder: Path, views: int, args, busy: Busy | None = None) -> list[dict]:
    """Every chosen loader on `views` views, epochs interleaved (see `measure`); a peer that is
    missing or fails to start is one line, not a traceback."""
    ready = [(DECODE_ROW, decode_epoch(folder))]
    n = len(list((folder / "all").iterdir()))
    for key in args.loaders:
        name, make = LOADERS[key]
        try:
            epoch = make(folder, views, args.workers, args.device)
            epoch()  # a peer that fails on this host fails here, before the timed rounds
            ready.append((name, epoch))
        except (ImportError, RelaError) as e:
            print(f"  {name:44s} not installed ({e}); `bash scripts/setup.sh` installs it")
        except Exception as e:  # one peer failing on this host must not hide the other rows
            print(f"  {name:44s} FAILED: {type(e).__name__}: {e}")
    return measure(ready, n, args.epochs, busy)


def summarise(rows: list[dict], busy: bool = False) -> float:
    """Each row's ratio to the torch baseline; the best rela row against the decode limit and
    FFCV. Returns the decode-only limit (img/s): the decode row's rate x cores (under --busy the
    one decode thread shares the cores with the trainer: a reference, not the goal's limit)."""
    cores = os.cpu_count() or 1
    limit = next(r for r in rows if r["name"] == DECODE_ROW)["img_s"] * cores
    print(f"  decode-only limit: {limit:.0f} img/s (1-thread PIL decode x {cores} cores, "
          "measured in the same rounds)")
    base = next((r for r in rows if r["name"].startswith("torch")), None)
    for r in rows:
        r["vs_torch"] = r["img_s"] / base["img_s"] if base else None
    ours = [r for r in rows if r["name"].startswith("rela")]
    ffcv = next((r for r in rows if r["name"] == LOADERS["ffcv"][0]), None)
    if ffcv:
        for r in ours:
            r["vs_ffcv"] = r["img_s"] / ffcv["img_s"]
    same = next((r for r in rows if r["name"] == LOADERS["ffcv-q95"][0]), None)
    wrapper = next((r for r in rows if r["name"] == LOADERS["rela-ffcv"][0]), None)
    if same and wrapper:
        wrapper["vs_ffcv_same_quality"] = wrapper["img_s"] / same["img_s"]
        print(f"  rela's ffcv backend / FFCV's Loader on the same q95 data: x{wrapper['vs_ffcv_same_quality']:.2f} "
              "(goal >= 0.95)")
    if not ours:
        return limit
    rela = max(ours, key=lambda r: r["img_s"])
    goal = "under load: the goal is the quiet run's" if busy else "goal >= 0.6"
    print(f"  best rela row: {rela['name']}: {rela['img_s'] / limit:.2f} of the decode limit ({goal})", end="")
    if base:
        print(f"; x{rela['img_s'] / base['img_s']:.2f} torch DataLoader + PIL", end="")
    if ffcv:
        print(f"; x{rela['vs_ffcv']:.2f} FFCV's Loader (goal >= 1.0, moonshot 1.3)", end="")
    print()
    return limit


# --- the loader's goals (--goals) ------------------------------------------------------------

SIZES = (128, 160, 224)


def goal_rows(folder: Path, args) -> list[tuple[str, object]]:
    """rela at its defaults, FFCV's Loader and DALI's CPU pipeline at each size (one plain view)
    and on DINO's multi-crop (2x224 + 6x96: rela and DALI cut every view from one decode, FFCV runs
    one pipeline per view, as multi-crop runs on FFCV); peers that are missing are left out."""
    makers = {
        "rela": lambda v: rela_epoch(folder, v, args.workers, None),
        "FFCV": lambda v: ffcv_epoch(folder, v, args.workers),
        "DALI": lambda v: dali_epoch(folder, v, args.workers),
    }
    rows = [(DECODE_ROW, decode_epoch(folder))]
    for what, views in [*((f"{s} px", [(s, 0.08, 1.0)]) for s in SIZES), ("DINO 2x224+6x96", DINO)]:
        for who, make in makers.items():
            name = f"{who} {what}"
            try:
                epoch = make(views)
                epoch()
                rows.append((name, epoch))
            except (ImportError, RelaError) as e:
                print(f"  {name:44s} not installed ({e})")
    return rows


def goal_report(rows: list[dict]) -> list[str]:
    """The loader's goals from one run's rows, each PASS or MISS (or n/a without its peer)."""
    r = {x["name"]: x["img_s"] for x in rows}

    def check(text: str, num: str, den: str, goal: float) -> str:
        if num not in r or den not in r:
            return f"{text}: n/a ({num if num not in r else den} did not run)"
        ratio = r[num] / r[den]
        verdict = "PASS" if ratio >= goal else "MISS"
        return f"{text}: {r[num]:.0f} / {r[den]:.0f} img/s = x{ratio:.2f} (goal >= {goal}): {verdict}"

    return [check("rela's defaults vs FFCV, plain crops, 1 view at 224", "rela 224 px", "FFCV 224 px", 1.5),
            check("rela 160 px vs rela's own 224 px", "rela 160 px", "rela 224 px", 1.4),
            check("rela DINO 2+6 vs rela's one-view 224", "rela DINO 2x224+6x96", "rela 224 px", 0.5),
            check("rela DINO 2+6 vs FFCV, one pipeline per view", "rela DINO 2x224+6x96", "FFCV DINO 2x224+6x96", 2.0)]


def decode_ceiling(folder: Path, n: int = 500) -> dict:
    """What a smaller output can gain at most: rela's C++ call on one thread (CPU ms/img, best of
    3) for plain crops at each goal size, beside the same boxes decoded with an 8-px output at full
    resolution (the crop-region decode alone: what every size pays). The loader's own defaults
    (normalised float32 out, scaled decode where it fits)."""
    from rela import _ext
    from rela.loading.backends.torch_backend import SCALED_FIT, _normalisation
    from rela.loading.views import ViewSpec, geometry_batch

    files = sorted((folder / "all").iterdir())[:n]
    data = [f.read_bytes() for f in files]
    sizes = [_ext.jpeg_header(d)[:2] for d in data]  # (width, height)
    out = {}
    for size in SIZES:
        spec = ViewSpec(size, scale=(0.08, 1.0), flip=0.5, mean=MEAN, std=STD)
        boxes, flips = geometry_batch(spec, 0, 0, list(range(len(data))), 0, [h for _, h in sizes],
                                      [w for w, _ in sizes])
        boxes, flips = boxes.reshape(-1, 1, 4), flips.reshape(-1, 1)
        views = torch.empty(len(data), 3, size, size).numpy()
        scale, bias = _normalisation((spec,))
        crops = partial(_ext.decode_resized_crops, data, boxes, flips)
        out[f"{size} px"] = _min_ms(partial(crops, [size], outs=[views], rows=np.arange(len(data)), scale=scale,
                                            bias=bias, fit=SCALED_FIT), len(data))
        out[f"{size} px decode only"] = _min_ms(partial(crops, [8], fit=0.0), len(data))
    return out


def ceiling_report(c: dict) -> list[str]:
    """The 160-px goal against what the decode allows: 224 px's C++ time over 160 px's decode alone."""
    return ["  C++ call, one thread, CPU ms/img: " + ", ".join(f"{k} {v:.3f}" for k, v in c.items()),
            f"  so even with a free resample 160 px could read at most x{c['224 px'] / c['160 px decode only']:.2f} "
            f"224 px's rate here (160 px's crops mostly miss the scaled decode: their boxes are under 480 px)"]


def compare_busy(quiet: list[dict], busy: list[dict]) -> None:
    """Each rela row's ratio to FFCV under load against its quiet ratio (goal: >= 0.9 of it)."""
    q = {r["name"]: r for r in quiet}
    for r in busy:
        if r["name"] in q:
            r["busy_over_quiet"] = r["img_s"] / q[r["name"]]["img_s"]
        if "vs_ffcv" in r and "vs_ffcv" in q.get(r["name"], {}):
            keep = r["vs_ffcv"] / q[r["name"]]["vs_ffcv"]
            r["ffcv_ratio_kept"] = keep
            print(f"  {r['name']:44s} x{q[r['name']]['vs_ffcv']:.2f} FFCV quiet, x{r['vs_ffcv']:.2f} busy: "
                  f"{keep:.2f} of its quiet ratio (goal >= 0.9)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--views", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cuda: also rela's dali backend with the mixed (GPU) decoder, "
                   "batches delivered on the GPU")
    p.add_argument("--loaders", nargs="+", choices=list(LOADERS), default=[k for k in LOADERS if k != "rela-dali-gpu"],
                   help="which rows to run (the baseline first; FFCV's row is what rela's rows are compared with)")
    p.add_argument("--profile", action="store_true", help="also profile rela's torch backend per stage (CPU ms/img)")
    p.add_argument("--busy", action="store_true", help="run every row again while a training process uses all cores")
    p.add_argument("--goals", action="store_true", help="only the goal rows: rela's defaults, FFCV and DALI at "
                   "128/160/224 px and on DINO's 2x224+6x96 multi-crop, interleaved, each goal PASS/MISS")
    args = p.parse_args()
    if args.device != "cpu" and "rela-dali-gpu" not in args.loaders:
        args.loaders.append("rela-dali-gpu")
    folder = build_jpegs(args.images, OUT)
    files = list((folder / "all").iterdir())
    kb = statistics.mean(f.stat().st_size for f in files) / 1024
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    print(f"device: {device_line()}; {len(files)} JPEGs 400x350 q90, "
          f"mean {kb:.0f} KB, in page cache; batch 64, {args.workers} workers/threads per loader")
    print()
    results = {"device": device_line(), "versions": _versions(), "workers_or_threads": args.workers,
               "images": len(files), "epochs": args.epochs, "runs": []}
    sys.unraisablehook = _quiet_numba_finaliser
    if args.goals:
        print("rela's defaults, FFCV's Loader and DALI's CPU pipeline, one plain view per size and DINO's multi-crop:")
        rows = measure(goal_rows(folder, args), len(files), args.epochs)
        results["goals"] = {"rows": rows, "checks": goal_report(rows), "ceiling": decode_ceiling(folder)}
        print("\n" + "\n".join(results["goals"]["checks"] + ceiling_report(results["goals"]["ceiling"])))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "loader-goals.json").write_text(json.dumps(results, indent=1))
        return
    for views in args.views:
        print(f"{views} view(s):")
        rows = run_rows(folder, views, args)
        limit = summarise(rows)
        results["runs"].append({"views": views, "rows": rows, "decode_limit_img_s": limit})
        print()
        if args.profile:
            results.setdefault("profile", []).append(profile_stages(folder, views))
            print()
    if args.profile:
        results["profile_split"] = profile_split(folder)
        print()
    if args.busy:
        print(f"--busy: the same rows while a small convnet trains in another process on all {cores} cores")
        trainer = Busy(cores)
        try:
            for run in results["runs"]:
                print(f"{run['views']} view(s), busy:")
                rows = run_rows(folder, run["views"], args, trainer)
                run["busy_decode_limit_img_s"] = summarise(rows, busy=True)
                compare_busy(run["rows"], rows)
                print()
                run["busy_rows"] = rows
        finally:
            trainer.stop()
        results["trainer_alone_steps_s"] = trainer.alone
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loader.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
