"""The `dali` backend: NVIDIA DALI pipelines run rela's view specs.

DALI's own random operators keep state that cannot be saved, so here DALI draws nothing: rela
draws every crop box, flip and colour factor from its per-sample generators (the same streams the
torch backend uses) and feeds them in as per-sample arguments. Views are therefore reproducible,
resumable and identical in geometry to the torch backend's; colour operators are DALI's own
(`color_twist` applies brightness/contrast/hue/saturation in a fixed order where torchvision's
ColorJitter shuffles it; grayscale is saturation 0).

Each image is decoded once per step and all its views are cut from that decode. JPEG files go to
DALI's decoder (`device="cuda"` uses the mixed GPU decoder — written, not yet verified on a GPU);
in-memory datasets are fed as pixel arrays. Rows DALI should not see (non-JPEG files, headers that
fail rela's checks) and batches DALI fails on go through the torch builder, which applies
`on_error` — DALI itself cannot skip a bad sample inside a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from rela.data.datasets import as_rgb
from rela.loading.backends import Built, Options, SampleRules, Task, Tasks, nothing_left
from rela.loading.backends.threads import ThreadedBatches
from rela.loading.backends.torch_backend import TorchBuilder
from rela.loading.views import ViewSpec, colour_params, geometry


def _pipeline(views: tuple[ViewSpec, ...], kind: str, batch_size: int, threads: int, device_id: int | None):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                    exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    with pipe:
        if kind == "jpeg":
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            # adjust_orientation=False: the crop boxes are drawn in the frame as stored (libjpeg's
            # header size), and rela turns images upright itself only when asked (exif_transpose;
            # rotated files then reach the fallback, not this decoder) — as every other backend
            image = fn.decoders.image(data, device="cpu" if device_id is None else "mixed",
                                      output_type=types.RGB, adjust_orientation=False)
        else:
            image = fn.external_source(name="data", dtype=types.UINT8, ndim=3, layout="HWC")
            if device_id is not None:
                image = image.gpu()
        outs = []
        for k, spec in enumerate(views):
            arg = {name: fn.external_source(name=f"{name}{k}", dtype=types.FLOAT,
                                            ndim=1 if name.startswith("roi") else 0) for name in _inputs(spec)}
            x = fn.resize(image, roi_start=arg["roi_start"], roi_end=arg["roi_end"], roi_relative=False,
                          size=[spec.size, spec.size], antialias=True, interp_type=types.INTERP_LINEAR)
            if spec.jitter_p or spec.gray_p:
                x = fn.color_twist(x, brightness=arg["brightness"], contrast=arg["contrast"],
                                   saturation=arg["saturation"], hue=arg["hue"])
            if spec.blur_p:
                x = fn.gaussian_blur(x, sigma=arg["sigma"])
            if spec.solarize_p:
                f = fn.cast(x, dtype=types.FLOAT)
                x = f + arg["solarize"] * (f >= 128.0) * (255.0 - 2.0 * f)
            outs.append(fn.crop_mirror_normalize(
                x, dtype=types.FLOAT, output_layout="CHW", mirror=fn.cast(arg["flip"], dtype=types.INT32),
                mean=[m * 255 for m in spec.mean], std=[s * 255 for s in spec.std]))
        pipe.set_outputs(*outs)
    pipe.build()
    return pipe


DALI_OPS = ("gray", "sigma", "solarize")  # the ColourParams ops the pipeline applies (gray: saturation 0)


def runs_in_dali(views: tuple[ViewSpec, ...]) -> bool:
    """Whether the pipeline implements every colour op these views may run; a batch whose views
    need one it lacks is built by the torch builder (the same draws, rela's colour kernel), so an op
    added to `ColourParams` is correct here before DALI implements it."""
    return all(op == "jitter" or op in DALI_OPS for spec in views for op in spec.colour_ops)


def _inputs(spec: ViewSpec) -> tuple[str, ...]:
    """The per-sample arguments a view's pipeline takes (DALI prunes, and refuses, unused ones)."""
    names = ["roi_start", "roi_end", "flip"]
    if spec.jitter_p or spec.gray_p:
        names += ["brightness", "contrast", "saturation", "hue"]
    if spec.blur_p:
        names.append("sigma")
    if spec.solarize_p:
        names.append("solarize")
    return tuple(names)


def _scalar(v: float) -> np.ndarray:
    return np.array(v, np.float32)


class DaliBackend:
    """Builds batches with DALI, fed ahead by one producer thread (DALI's own threads decode);
    the torch builder does the rows DALI is not given and the batches DALI fails on."""

    finish_on_device = staticmethod(nothing_left)  # views arrive finished

    def __init__(self, rules: SampleRules, options: Options) -> None:
        self.rules, self.options = rules, options
        self.fallback = TorchBuilder(rules, options.decode_threads, scaled_decode=options.scaled_decode)
        self.batch_size, self.threads = options.batch_size, max(1, options.num_workers)
        self.device = options.device
        self.device_id = None if self.device.type == "cpu" else (self.device.index or 0)
        self._pipes: dict = {}

    def batches(self, tasks: Tasks) -> Iterator[Built]:
        source = ThreadedBatches(self._run, tasks, self.options.depth)
        try:
            yield from source
        finally:
            source.close()

    def build(self, task: Task) -> Built:
        """One batch outside the stream (a rebuild after set_views) while the producer thread may be
        running DALI: the torch builder does it, since a DALI pipeline must not run on two threads."""
        return self.fallback.build(task)

    def close(self) -> None:
        self._pipes.clear()

    def _pipe(self, views, kind):
        key = (views, kind)
        if key not in self._pipes:
            self._pipes[key] = _pipeline(views, kind, self.batch_size, self.threads, self.device_id)
        return self._pipes[key]

    def _sources(self, task: Task) -> tuple[str, list[int], list, list[tuple[int, int]]]:
        """Which rows DALI decodes, with their encoded bytes or pixels and (height, width)."""
        ds = self.rules.dataset
        if ds.in_memory:
            rows, data, hw = [], [], []
            for row, i in enumerate(task.indices):
                if i in self.rules.skip:
                    continue
                img = as_rgb(ds.load(i))
                rows.append(row), data.append(img), hw.append(img.shape[:2])
            return "array", rows, data, hw
        rows, data, hw = [], [], []
        for row, i in enumerate(task.indices):
            raw, size = self.rules.jpeg_file(i)
            if raw is not None:
                rows.append(row), data.append(np.frombuffer(raw, np.uint8)), hw.append((size[1], size[0]))
        return "jpeg", rows, data, hw

    def _run(self, task: Task) -> Built:
        """One batch through DALI (on the producer thread only)."""
        if not runs_in_dali(task.views):
            return self.fallback.build(task)
        kind, rows, data, hw = self._sources(task)
        if not rows:
            return self.fallback.build(task)
        feeds: dict[str, list] = {"data": data}
        for k, spec in enumerate(task.views):
            values = []
            for row, (h, w) in zip(rows, hw, strict=True):
                g = self.rules.generator(task, task.indices[row], k)
                top, left, ch, cw, flip = geometry(spec, h, w, g)
                p = colour_params(spec, g)
                values.append({
                    "roi_start": np.array([top, left], np.float32),
                    "roi_end": np.array([top + ch, left + cw], np.float32),
                    "flip": _scalar(flip),
                    "brightness": _scalar(p.brightness),
                    "contrast": _scalar(p.contrast),
                    "saturation": _scalar(0.0 if p.gray else p.saturation),
                    "hue": _scalar(p.hue * 360.0),  # DALI: degrees
                    "sigma": _scalar(p.sigma or 1e-3),  # a ~identity kernel when blur is off
                    "solarize": _scalar(p.solarize),
                })
            for name in _inputs(spec):
                feeds[f"{name}{k}"] = [v[name] for v in values]
        pipe = self._pipe(task.views, kind)
        try:
            for name, value in feeds.items():
                pipe.feed_input(name, value)
            outs = pipe.run()
        except RuntimeError:
            # A sample DALI cannot decode: drop this pipeline (its state is unknown) and let the
            # torch builder rebuild the batch, which names the file or skips it per on_error.
            self._pipes.pop((task.views, kind), None)
            return self.fallback.build(task)
        views = [self._to_torch(o, len(rows), spec.size) for o, spec in zip(outs, task.views, strict=True)]
        index = torch.tensor(task.indices, dtype=torch.int64)
        skipped: list = []
        given = set(rows)
        rest = [r for r in range(len(task.indices)) if r not in given]
        if rest:  # rows DALI is not given: the general path, with its on_error handling
            sub = self.fallback.build(replace(task, indices=tuple(task.indices[r] for r in rest)))
            if sub.error is not None:
                return sub
            full = [torch.empty(len(task.indices), *v.shape[1:], dtype=v.dtype, device=v.device) for v in views]
            for f, v, w in zip(full, views, sub.views, strict=True):
                f[rows], f[rest] = v, w.to(f.device)
            views, index[rest], skipped = full, sub.index, sub.skipped
        return self.rules.assemble(task, views, index, skipped)

    def _to_torch(self, out, n: int, size: int) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = torch.empty((n, 3, size, size), dtype=torch.float32, device=self.device)
        feed_ndarray(out.as_tensor(), t)
        return t
