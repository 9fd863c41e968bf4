"""The loader on the views SSL trains with: RELA's two views and BYOL's two views at 224 px.

Same JPEGs as bench/loader.py (cut from scikit-image's photos, 400×350, q90), batch 64, the same
number of workers (threads or processes) for every loader, one run, same machine. Rows:

  torch DataLoader + torchvision v2 on PIL     the baseline users run (lightly's transforms are
  torch DataLoader + torchvision v2 on tensors  these ops); the better of the two is the baseline
  SPDL pipelines                                Meta's SPDL, thread stages: FFmpeg decode + crop/resize
                                                in its filter graph per view, or decode once + v2 crops;
                                                torchvision v2 colour ops
  rela.Loader (threads / processes)             C++ crop-while-decoding + C++ colour kernel
  rela.Loader, torchvision colour               the same with rela._C's colour kernel switched off
  FFCV (brightness/contrast/saturation only)    FFCV 1.x has no hue, grayscale, blur or solarise:
                                                a lighter pipeline than the views, shown for scale

Every pipeline draws per-sample parameters from the view specs' distributions (crop scale 0.08–1,
flip 0.5, ColorJitter with its probability, grayscale, blur σ 0.1–2 with kernel ≤ 13, solarise).
Reported: median img/s over epochs (the rows' epochs interleaved, as in bench/loader.py) and CPU
ms per image (this process + workers), and ratios to the baseline. torch's intra-op threads are set
to `--torch-threads` in the loop's process (what
`rela train` leaves them at matters).

    python bench/views.py [--images 1000] [--epochs 2] [--workers 2] [--views rela byol]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import device_line  # noqa: E402
from bench.loader import OUT, build_jpegs, measure  # noqa: E402
from rela.loading.views import ViewSpec, byol_views, rela_view  # noqa: E402

SPECS = {"rela": lambda: (rela_view(224), rela_view(224)), "byol": lambda: byol_views(224, blur=True)}


def v2_colour(spec: ViewSpec):
    """torchvision v2 ops for a spec's colour part (kernel 13 = rela's largest, 2⌈3·2⌉+1)."""
    from torchvision.transforms import v2

    ops = []
    if spec.jitter_p:
        ops.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p:
        ops.append(v2.RandomGrayscale(spec.gray_p))
    if spec.blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(13, spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p:
        ops.append(v2.RandomSolarize(128, p=spec.solarize_p))
    return ops


def v2_view(spec: ViewSpec):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
                       v2.RandomHorizontalFlip(spec.flip), *v2_colour(spec), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])


class _Folder(torch.utils.data.Dataset):
    """Files → views with torchvision v2, decoded by PIL or by torchvision.io (uint8 tensors)."""

    def __init__(self, folder: Path, specs, decode: str) -> None:
        self.files, self.decode = sorted((folder / "all").iterdir()), decode
        self.tfs = [v2_view(s) for s in specs]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if self.decode == "pil":
            from PIL import Image

            with Image.open(self.files[i]) as im:
                img = im.convert("RGB")
        else:
            from torchvision.io import decode_jpeg, read_file

            img = decode_jpeg(read_file(str(self.files[i])))
        return [tf(img) for tf in self.tfs]


def _one_thread(_):
    torch.set_num_threads(1)


def torch_epoch(folder: Path, specs, workers: int, decode: str):
    loader = torch.utils.data.DataLoader(_Folder(folder, specs, decode), batch_size=64, shuffle=True,
                                         num_workers=workers, worker_init_fn=_one_thread)
    return lambda: sum(len(b[0]) for b in loader)


def rela_epoch(folder: Path, specs, workers: int, worker_type: str):
    from rela import Loader

    loader = Loader(str(folder), 64, views=list(specs), num_workers=workers, drop_last=False, worker_type=worker_type)
    return lambda: sum(len(b["index"]) for b in loader)


def spdl_epoch(folder: Path, specs, workers: int, decode_once: bool = False):
    """SPDL's way: thread stages over samples. Either FFmpeg decodes, crops, resizes and flips in
    one filter graph per view (the crop drawn as RandomResizedCrop draws it), or (`decode_once`)
    FFmpeg decodes each image once and torchvision v2 cuts the views; v2 does the colour."""
    import numpy as np
    import spdl.io
    from spdl.pipeline import PipelineBuilder
    from torchvision.transforms import v2

    files = sorted((folder / "all").iterdir())
    colour = [v2.Compose(v2_colour(s)) for s in specs]

    crops = [v2.Compose([v2.RandomResizedCrop(sp.size, scale=sp.scale, ratio=sp.ratio, antialias=True),
                         v2.RandomHorizontalFlip(sp.flip)]) for sp in specs]

    def load_once(path: Path):
        frames = spdl.io.decode_packets(spdl.io.demux_image(str(path)), filter_desc="format=rgb24")
        x = torch.from_numpy(np.array(spdl.io.convert_frames(frames))).permute(2, 0, 1)
        return [tf(crop(x)) for crop, tf in zip(crops, colour, strict=True)]

    def load(path: Path):
        packets = spdl.io.demux_image(str(path))
        w, h = packets.width, packets.height
        outs = []
        for spec, tf in zip(specs, colour, strict=True):
            top, left, ch, cw = v2.RandomResizedCrop.get_params(
                torch.empty(1, h, w), list(spec.scale), list(spec.ratio)
            )
            flip = ",hflip" if torch.rand(()) < spec.flip else ""
            desc = f"crop={cw}:{ch}:{left}:{top},scale={spec.size}:{spec.size}{flip},format=rgb24"
            frames = spdl.io.decode_packets(packets.clone(), filter_desc=desc)
            x = torch.from_numpy(np.array(spdl.io.convert_frames(frames))).permute(2, 0, 1)
            outs.append(tf(x))
        return outs

    def batch(items):
        views = []
        for k, spec in enumerate(specs):
            x = torch.stack([it[k] for it in items]).float().div_(255)
            views.append(v2.functional.normalize(x, spec.mean, spec.std))
        return views

    def run() -> int:
        order = np.random.default_rng().permutation(len(files))
        pipe = (PipelineBuilder().add_source([files[i] for i in order])
                .pipe(load_once if decode_once else load, concurrency=workers)
                .aggregate(64).pipe(batch).add_sink(4).build(num_threads=workers))
        with pipe.auto_stop():
            return sum(len(b[0]) for b in pipe)

    return run


def ffcv_epoch(folder: Path, specs, workers: int):
    """FFCV's own per-sample colour ops (brightness, contrast, saturation at the specs' strength)."""
    import numpy as np
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (
        NormalizeImage,
        RandomBrightness,
        RandomContrast,
        RandomHorizontalFlip,
        RandomSaturation,
        ToTensor,
        ToTorchImage,
    )

    from bench.loader import ffcv_epoch as write_beton

    write_beton(folder, len(specs), workers)  # writes (or reuses) the .beton with one field per view
    beton = folder / f"data-{len(specs)}view.beton"

    def pipe(spec):
        b, c, s, _ = spec.jitter
        mean, std = np.array(spec.mean) * 255, np.array(spec.std) * 255
        return [RandomResizedCropRGBImageDecoder((224, 224), scale=spec.scale), RandomHorizontalFlip(),
                RandomBrightness(b, spec.jitter_p), RandomContrast(c, spec.jitter_p),
                RandomSaturation(s, spec.jitter_p), NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]

    pipelines = {f: pipe(s) for f, s in zip(["image", "image2"], specs, strict=False)}
    pipelines["label"] = [IntDecoder(), ToTensor()]
    loader = Loader(str(beton), batch_size=64, num_workers=workers, order=OrderOption.RANDOM, pipelines=pipelines,
                    os_cache=True, drop_last=False)
    return lambda: sum(len(b[0]) for b in loader)


def rows_for(name: str, folder: Path, args, n: int) -> list[dict]:
    specs = SPECS[name]()
    w = args.workers
    ready = []
    for label, make in (
        ("torch DataLoader + v2 on PIL", lambda: torch_epoch(folder, specs, w, "pil")),
        ("torch DataLoader + v2 on tensors", lambda: torch_epoch(folder, specs, w, "tensor")),
        ("SPDL, FFmpeg crop per view + v2 colour", lambda: spdl_epoch(folder, specs, w)),
        ("SPDL, FFmpeg decode once + v2 views", lambda: spdl_epoch(folder, specs, w, True)),
        ("rela.Loader, thread workers", lambda: rela_epoch(folder, specs, w, "thread")),
        ("rela.Loader, worker processes", lambda: rela_epoch(folder, specs, w, "process")),
        ("rela.Loader, threads, torchvision colour", lambda: _without_kernel(folder, specs, w)),
        ("FFCV (b/c/s jitter only: lighter)", lambda: ffcv_epoch(folder, specs, w)),
    ):
        if args.rows and not label.startswith("torch") and not any(r in label for r in args.rows):
            continue
        try:
            epoch = make()
            epoch()  # warm-up; a peer that fails here is skipped before the timed rounds
            ready.append((label, epoch))
        except Exception as e:  # a peer missing here must not hide the other rows
            print(f"  {label:44s} skipped: {type(e).__name__}: {str(e)[:120]}")
    return measure(ready, n, args.epochs)  # epochs interleaved across the rows (bench/loader.py)


def _without_kernel(folder: Path, specs, workers: int):
    from rela import _ext

    run = rela_epoch(folder, specs, workers, "thread")

    def plain() -> int:
        real, _ext.has_colour_kernel = _ext.has_colour_kernel, lambda: False
        try:
            return run()
        finally:
            _ext.has_colour_kernel = real

    return plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--views", nargs="+", default=["rela", "byol"], choices=sorted(SPECS))
    p.add_argument("--rows", nargs="*", help="only the peer rows whose name contains one of these (the two "
                   "baselines always run)")
    args = p.parse_args()
    folder = build_jpegs(args.images, OUT)
    n = len(list((folder / "all").iterdir()))
    torch.set_num_threads(args.torch_threads)
    print(f"device: {device_line()}; {n} JPEGs 400x350 q90; batch 64; {args.workers} workers/threads per loader; "
          f"torch intra-op threads in the loop's process: {args.torch_threads}")
    results = []
    for name in args.views:
        print(f"{name} views (2 x 224 px):")
        rows = rows_for(name, folder, args, n)
        base = max(rows[:2], key=lambda r: r["img_s"])
        ours = [r for r in rows if r["name"] in ("rela.Loader, thread workers", "rela.Loader, worker processes")]
        spdl = max((r for r in rows if r["name"].startswith("SPDL")), key=lambda r: r["img_s"], default=None)
        line = f"  baseline: {base['name']}"
        if ours:
            rela = max(ours, key=lambda r: r["img_s"])
            line += (f"; best rela: {rela['name']}: x{rela['img_s'] / base['img_s']:.2f} img/s, "
                     f"x{base['cpu_ms'] / rela['cpu_ms']:.2f} less CPU per image")
            line += f"; rela / best SPDL x{rela['img_s'] / spdl['img_s']:.2f}" if spdl else ""
        print(line + "\n")
        results.append({"views": name, "rows": rows, "baseline": base["name"]})
    (OUT / "views.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
