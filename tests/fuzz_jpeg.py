"""A bounded fuzz run of rela's JPEG crop path: mutated JPEGs through the header read, the box
drawing and the C++ decoder exactly as the Loader's torch backend calls them.

Every file must end as a batch row or a refusal (the header read's ValueError, or the decoder's
error string, which the Loader turns into a CorruptImageError / the general path), and a second
pass over the same file and boxes must give identical pixels (heap bytes in a batch would differ).
Boxes are drawn for the size the decoder's header read gives, and — to test the decoder's own
bounds, as a disagreeing parser once made happen — also for a wrong size.

    python -m tests.fuzz_jpeg [--count N] [--seed S] [--ext path/to/_C.so]

`--ext` loads another build of rela._C first (`make asan` passes the ASAN+UBSAN one). Prints one
JSON line of counts; exits 1 on any nondeterministic or unexpected outcome. The default suite runs
it through tests/loading/test_jpeg_fuzz.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import numpy as np


def _load_ext(path: str) -> None:
    """Make `path` the rela._C every rela module imports (before rela is imported)."""
    spec = importlib.util.spec_from_file_location("rela._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rela._C"] = module
    spec.loader.exec_module(module)


def _bases(rng: np.random.Generator) -> list[bytes]:
    """Real JPEGs: baseline and progressive, colour and grey, odd sizes, restart markers."""
    import io

    from PIL import Image

    from tests.conftest import jpeg_bytes, smooth_image

    out = [jpeg_bytes(h, w, seed=int(rng.integers(1 << 30)), quality=q)
           for h, w, q in [(48, 64, 90), (33, 17, 75), (128, 96, 60), (1, 40, 90), (200, 3, 85)]]
    for kw in ({"progressive": True}, {"restart_marker_blocks": 1}, {"subsampling": 0}):
        buf = io.BytesIO()
        Image.fromarray(smooth_image(rng, 70, 90)).save(buf, "JPEG", quality=80, **kw)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 50, 60)[..., 0]).save(buf, "JPEG", quality=85)
    return [*out, buf.getvalue()]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One hostile variant of `data`."""
    from tests.conftest import junk_before_sof, tem_fake_sof, with_frame_size

    d = bytearray(data)
    kind = int(rng.integers(8))
    if kind in (2, 3, 4) and b"\xff\xc0" not in d and b"\xff\xc2" not in d:
        kind = 0  # an earlier mutation took the frame header: flip bytes instead
    if kind == 0:  # flip a few bytes anywhere
        for _ in range(int(rng.integers(1, 9))):
            d[int(rng.integers(2, len(d)))] = int(rng.integers(256))
    elif kind == 1:  # cut short
        d = d[:int(rng.integers(2, len(d)))]
    elif kind == 2:  # the frame says another size: 0, 1, a little off, huge
        w, h = (int(rng.choice([0, 1, 2, 7, 65535, int(rng.integers(1, 4000))])) for _ in range(2))
        d = bytearray(with_frame_size(bytes(d), w, h))
    elif kind == 3:  # a parser-disagreement file
        d = bytearray(tem_fake_sof(bytes(d), int(rng.integers(1, 65536)), int(rng.integers(1, 65536))))
    elif kind == 4:  # junk before the frame header (libjpeg skips it)
        d = bytearray(junk_before_sof(bytes(d)))
    elif kind == 5:  # a marker byte planted at random
        at = int(rng.integers(2, len(d) - 1))
        d[at:at + 2] = bytes([0xFF, int(rng.choice([0x01, 0xC0, 0xC2, 0xC4, 0xD8, 0xD9, 0xDA, 0xDB, 0xDD]))])
    elif kind == 6:  # a stretch of the entropy-coded data duplicated or removed
        a, b = sorted(int(v) for v in rng.integers(2, len(d), 2))
        d = d[:b] + d[a:b] + d[b:] if rng.random() < 0.5 else d[:a] + d[b:]
    else:  # several of the above
        for _ in range(2):
            d = bytearray(_mutate(bytes(d), rng))
    return bytes(d)


def run(count: int, seed: int) -> dict:
    from rela import _ext
    from rela.data.datasets import jpeg_header
    from rela.loading.views import ViewSpec, geometry_batch

    if not _ext.has_jpeg_decoder():
        return {"skipped": "rela._C was built without libjpeg"}
    rng = np.random.default_rng(seed)
    bases = _bases(rng)
    views = [ViewSpec(24, flip=0.5), ViewSpec(24, scale=(0.5, 1.0)), ViewSpec(12, crop="center")]  # two sizes
    counts = {"files": 0, "refused_by_header": 0, "rows": 0, "decoder_errors": 0, "wrong_size_rows": 0,
              "wrong_size_refused": 0, "nondeterministic": 0}
    for n in range(count):
        data = _mutate(bases[n % len(bases)], rng)
        counts["files"] += 1
        try:
            w, h = jpeg_header(data)
        except ValueError:
            counts["refused_by_header"] += 1
            w = h = None
        sizes = [] if w is None else [("header", w, h)]
        if w is not None and rng.random() < 0.5:  # near the real size: some boxes fit, some don't
            sizes.append(("wrong", max(1, int(w * rng.uniform(0.5, 1.5))), max(1, int(h * rng.uniform(0.5, 1.5)))))
        else:
            sizes.append(("wrong", int(rng.integers(1, 3000)), int(rng.integers(1, 3000))))
        for which, sw, sh in sizes:
            drawn = [geometry_batch(v, seed, n, [n], k, [sh], [sw]) for k, v in enumerate(views)]
            boxes = np.stack([b[0] for b, _ in drawn])
            flips = np.array([f[0] for _, f in drawn], np.uint8)
            out, fit = [v.size for v in views], float(rng.choice([0.0, 1.0, 1.5]))  # full and scaled decodes
            first, errors = _ext.decode_resized_crops([data], boxes[None], flips[None], out, fit=fit)
            again, errors2 = _ext.decode_resized_crops([data], boxes[None], flips[None], out, fit=fit)
            same = errors == errors2 and (
                errors[0] or all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
            )
            counts["nondeterministic"] += not same
            key = "rows" if which == "header" else "wrong_size_rows"
            if errors[0]:
                counts["decoder_errors" if which == "header" else "wrong_size_refused"] += 1
            else:
                counts[key] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=3000, help="mutated files (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ext", help="load this build of rela._C (e.g. the ASAN one) instead of the installed one")
    args = ap.parse_args()
    if args.ext:
        _load_ext(args.ext)
    counts = run(args.count, args.seed)
    print(json.dumps(counts))
    sys.exit(1 if counts.get("nondeterministic") else 0)


if __name__ == "__main__":
    main()
