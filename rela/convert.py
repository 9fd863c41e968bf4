"""ReLA-D conversion: run a prior once over a dataset and write a whitened target store.

Phase 1 (the expensive one) runs the prior in batches and commits raw features in chunks: each
chunk is written to a temp file, fsynced and renamed, then recorded with its sha256 in an
append-only journal. A run killed at any point (SIGKILL included) resumes from the journal;
batches never straddle chunks, so a resumed run feeds the prior exactly the batches an
uninterrupted run would have, and the final store is bit-identical.

Phase 2 streams the chunks twice: once for the float64 mean/covariance (see `rela.pca`), once
to project, standardise and write float16 targets. The manifest is written last, atomically;
until it exists the directory is not a store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from rela import __version__
from rela.datasets import RelaDataset, open_dataset
from rela.errors import CorruptImageError, RelaError, StoreError
from rela.pca import StreamingMoments, fit_whitening
from rela.priors import Prior, load_prior
from rela.store import (
    MANIFEST,
    PCA,
    SCHEMA_VERSION,
    TARGETS,
    WORKDIR,
    TargetStore,
    TargetWriter,
    atomic_write_bytes,
    fsync_dir,
)

_crash_hits: dict[str, int] = {}


def _crashpoint(name: str) -> None:
    """Fault injection for the resume tests: RELA_CRASH_AT=name[:k] SIGKILLs at the k-th hit."""
    spec = os.environ.get("RELA_CRASH_AT")
    if not spec:
        return
    target, _, k = spec.partition(":")
    if target != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class _PriorInputs(torch.utils.data.Dataset):
    """Decodes samples in DataLoader workers; a bad sample becomes a flagged row of zeros.

    Resizing and cropping happen per batch in `collate` (uint8), normalisation in the main process.
    """

    def __init__(self, dataset: RelaDataset, prior: Prior) -> None:
        self.dataset, self.prior = dataset, prior

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.dataset.load(index), ""
        except CorruptImageError as e:
            return index, None, e.reason

    def collate(self, items):
        idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
        errors = [err for _, _, err in items]
        images = [im for _, im, _ in items if im is not None]
        s = self.prior.input_size
        out = torch.zeros(len(items), 3, s, s, dtype=torch.uint8)
        ok = [k for k, (_, im, _) in enumerate(items) if im is not None]
        try:
            if images:
                out[ok] = self.prior.resize_crop(images)
        except Exception:  # a decodable but unusable image (e.g. 0×0): find it, flag it
            for k in ok:
                try:
                    out[k] = self.prior.resize_crop([items[k][1]])[0]
                except Exception as e:
                    errors[k] = f"{type(e).__name__}: {e}"
        return idx, out, errors


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class _Chunk:
    k: int
    start: int
    stop: int


class _Journal:
    """Append-only record of committed chunks: one JSON line each, fsynced after writing."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "journal.jsonl"
        self.chunks_dir = workdir / "chunks"

    def chunk_path(self, k: int) -> Path:
        return self.chunks_dir / f"{k:06d}.npz"

    def committed(self) -> dict[int, dict]:
        """Chunks whose file exists and matches its journal hash (a torn last line is ignored)."""
        done: dict[int, dict] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            p = self.chunk_path(rec["chunk"])
            if p.exists() and _sha256(p.read_bytes()) == rec["sha256"]:
                done[rec["chunk"]] = rec
        return done

    def commit(self, k: int, features: np.ndarray, valid: np.ndarray, errors: dict, seconds: float,
               infer_seconds: float) -> None:
        buf = io.BytesIO()
        np.savez(buf, features=features, valid=valid)
        data = buf.getvalue()
        atomic_write_bytes(self.chunk_path(k), data)
        _crashpoint("before-journal")
        rec = {"chunk": k, "rows": len(features), "sha256": _sha256(data), "seconds": seconds,
               "infer_seconds": infer_seconds,
               "skipped": {str(i): r for i, r in errors.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.chunk_path(k)) as z:
            return z["features"], z["valid"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _job_identity(dataset_fp: dict, prior: Prior) -> dict:
    return {"dataset": dataset_fp, "prior": prior.identity, "preprocessing": prior.preprocessing()}


def convert(
    data: str | Path | RelaDataset,
    prior: str | Prior,
    out: str | Path,
    *,
    dim: int = 256,
    limit: int | None = None,
    batch_size: int = 256,
    chunk_rows: int = 4096,
    num_workers: int | None = None,
    skip_corrupt: bool = False,
    resume: bool | None = None,
    overwrite: bool = False,
    keep_raw: bool = False,
    deep: bool = False,
    progress: bool = True,
    **prior_kwargs,
) -> TargetStore:
    """Convert `data` with `prior` into a target store at `out` and return it opened.

    resume: None resumes an interrupted conversion of the same job automatically; True
    insists that there is one; False refuses to touch one (use `overwrite` to discard it).
    """
    t_start = time.perf_counter()
    out = Path(out)
    dataset = open_dataset(data, limit)
    if isinstance(prior, str):
        prior = load_prior(prior, **prior_kwargs)
    if not 1 <= dim <= prior.dim:
        raise RelaError(f"--dim {dim} is out of range: the prior {prior.identity.get('name')} "
                        f"gives {prior.dim}-d features, so dim must be in [1, {prior.dim}]")
    if batch_size < 1 or chunk_rows < 1:
        raise RelaError("--batch-size and --chunk-rows must be positive")
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)  # batches never straddle chunks
    fp = dataset.fingerprint(deep=deep)
    identity = _job_identity(fp, prior)
    workdir = out / WORKDIR

    existing = _prepare_out(out, identity, dim, overwrite, resume)
    if existing is not None:
        return existing

    job_path = workdir / "job.json"
    if job_path.exists():
        job = json.loads(job_path.read_text())
        batch_size, chunk_rows = job["batch_size"], job["chunk_rows"]  # same batches as before
    else:
        (workdir / "chunks").mkdir(parents=True, exist_ok=True)
        job = {**identity, "batch_size": batch_size, "chunk_rows": chunk_rows,
               "library_version": __version__}
        atomic_write_bytes(job_path, json.dumps(job, indent=1).encode())

    journal = _Journal(workdir)
    n = len(dataset)
    chunks = [_Chunk(k, s, min(s + chunk_rows, n)) for k, s in enumerate(range(0, n, chunk_rows))]
    done = journal.committed()
    todo = [c for c in chunks if c.k not in done]
    done_rows = sum(c.stop - c.start for c in chunks if c.k in done)
    if done and todo:
        print(f"resuming {out}: {len(done)}/{len(chunks)} chunks already done", file=sys.stderr)

    _extract(dataset, prior, journal, todo, batch_size, num_workers, skip_corrupt, progress, done_rows)
    done = journal.committed()
    missing = [c.k for c in chunks if c.k not in done]
    if missing:
        raise StoreError(f"chunks {missing[:5]} are missing after extraction; rerun to resume")
    return _finalize(out, dataset, prior, journal, chunks, done, dim, fp, keep_raw, t_start, progress)


def _prepare_out(out: Path, identity: dict, dim: int, overwrite: bool, resume: bool | None):
    """Decide what to do with whatever is already at `out`; returns a finished store to reuse."""
    workdir = out / WORKDIR
    if (out / MANIFEST).exists() and not overwrite:
        try:
            store = TargetStore.open(out)
        except StoreError:
            store = None
        m = store.manifest if store else {}
        same = store is not None and all(m.get(k) == v for k, v in identity.items()) and m.get("dim") == dim
        if same:
            if workdir.exists():
                shutil.rmtree(workdir)  # a run killed during its final clean-up
            print(f"{out} is already a complete store for this dataset, prior and dim", file=sys.stderr)
            return store
        raise RelaError(f"{out} already holds a different target store; pass --overwrite to replace it")
    if overwrite:
        for name in (MANIFEST, TARGETS, PCA):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    job_path = workdir / "job.json"
    if job_path.exists():
        job = json.loads(job_path.read_text())
        if resume is False:
            raise RelaError(f"{out} holds an interrupted conversion; resume it, or pass --overwrite")
        diffs = [k for k in identity if job.get(k) != identity[k]]
        if diffs:
            raise RelaError(
                f"{out} holds an interrupted conversion with a different {', '.join(diffs)}; "
                "rerun it with the original settings to resume, or pass --overwrite to start over"
            )
    else:
        if resume:
            raise RelaError(f"nothing to resume: {out} holds no interrupted conversion")
        if out.exists() and any(p.name not in (WORKDIR,) for p in out.iterdir()):
            raise RelaError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _extract(dataset, prior, journal, todo, batch_size, num_workers, skip_corrupt, progress, done_rows):
    if not todo:
        return
    from tqdm import tqdm

    from rela._alloc import keep_freed_memory

    keep_freed_memory()  # ~3x faster CPU inference here: no page faults on every activation
    batches = [list(range(s, min(s + batch_size, c.stop))) for c in todo for s in range(c.start, c.stop, batch_size)]
    if num_workers is None:
        # In-memory arrays need no decoding: worker IPC would cost more than it saves.
        in_memory = getattr(dataset, "in_memory", False)
        num_workers = 0 if in_memory or len(dataset) < 2048 else min(2, os.cpu_count() or 1)
    inputs = _PriorInputs(dataset, prior)
    loader = torch.utils.data.DataLoader(
        inputs, batch_sampler=batches, num_workers=num_workers,
        collate_fn=inputs.collate, worker_init_fn=_worker_init if num_workers else None,
        timeout=600 if num_workers else 0,
    )
    bar = tqdm(total=len(dataset), initial=done_rows, unit="img", desc="prior features",
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    chunk_iter: Iterator[_Chunk] = iter(todo)
    chunk = next(chunk_iter)
    feats = np.zeros((chunk.stop - chunk.start, prior.dim), np.float32)
    valid = np.ones(chunk.stop - chunk.start, bool)
    errors: dict[int, str] = {}
    t0, infer_s = time.perf_counter(), 0.0
    try:
        for idx, x, errs in loader:
            bad = [(int(i), e) for i, e in zip(idx.tolist(), errs, strict=True) if e]
            if bad and not skip_corrupt:
                i, reason = bad[0]
                raise CorruptImageError(i, dataset.describe(i), reason)
            t_inf = time.perf_counter()
            f = prior(prior.normalize(x)).numpy()
            infer_s += time.perf_counter() - t_inf
            rows = idx.numpy() - chunk.start
            for i, reason in bad:
                errors[i] = reason
                valid[i - chunk.start] = False
                f[i - idx[0].item()] = 0.0
            nonfinite = ~np.isfinite(f).all(axis=1) & valid[rows]
            if nonfinite.any():
                i = int(idx[np.flatnonzero(nonfinite)[0]])
                raise RelaError(f"the prior produced NaN/inf features for sample {i} ({dataset.describe(i)}); "
                                "check the prior's weights and preprocessing")
            feats[rows] = f
            bar.update(len(idx))
            if idx[-1].item() + 1 == chunk.stop:
                journal.commit(chunk.k, feats, valid, errors, time.perf_counter() - t0, infer_s)
                _crashpoint("chunk-written")
                chunk = next(chunk_iter, None)
                if chunk is None:
                    break
                feats = np.zeros((chunk.stop - chunk.start, prior.dim), np.float32)
                valid = np.ones(chunk.stop - chunk.start, bool)
                errors = {}
                t0, infer_s = time.perf_counter(), 0.0
    finally:
        bar.close()


def _finalize(out, dataset, prior, journal, chunks, done, dim, fp, keep_raw, t_start, progress) -> TargetStore:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    t0 = time.perf_counter()
    skipped = sorted(int(i) for rec in done.values() for i in rec.get("skipped", {}))
    n_valid = len(dataset) - len(skipped)
    if n_valid < 2:
        raise RelaError(f"only {n_valid} usable samples; PCA needs at least 2")
    if dim > n_valid:
        raise RelaError(f"--dim {dim} exceeds the number of usable samples ({n_valid})")

    moments = StreamingMoments(prior.dim)
    for c in tqdm(chunks, desc="covariance", unit="chunk", disable=not progress):
        f, v = journal.load(c.k)
        moments.update(f[v])
    white = fit_whitening(moments, dim)

    workdir = out / WORKDIR
    tmp_targets = workdir / TARGETS
    writer = TargetWriter(tmp_targets, len(dataset), dim)
    for c in tqdm(chunks, desc="targets", unit="chunk", disable=not progress):
        f, v = journal.load(c.k)
        z = white.transform(f)
        z[~v] = 0.0
        writer.write(z)
    writer.close()
    save_file(white.tensors(), str(workdir / PCA))
    _crashpoint("targets-written")
    os.replace(workdir / PCA, out / PCA)
    os.replace(tmp_targets, out / TARGETS)
    fsync_dir(out)
    _crashpoint("before-manifest")

    extract_s = sum(rec.get("seconds", 0.0) for rec in done.values())
    infer_s = sum(rec.get("infer_seconds", 0.0) for rec in done.values())
    finalize_s = time.perf_counter() - t0
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "library": {"name": "rela", "version": __version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": fp,
        "prior": prior.identity,
        "preprocessing": prior.preprocessing(),
        "n": len(dataset),
        "dim": dim,
        "raw_dim": prior.dim,
        "dtype": "float16",
        "whitening": {"method": "pca", "eps": white.eps,
                      "explained_variance_ratio": white.explained_variance_ratio},
        "skipped": skipped,
        "skipped_reasons": {str(i): r for rec in done.values() for i, r in rec.get("skipped", {}).items()},
        "cost": {"extract_seconds": round(extract_s, 3), "inference_seconds": round(infer_s, 3),
                 "finalize_seconds": round(finalize_s, 3),
                 "seconds": round(extract_s + finalize_s, 3),
                 "images_per_second": round(len(dataset) / extract_s, 2) if extract_s else None},
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    if not keep_raw:
        shutil.rmtree(workdir)
    return TargetStore.open(out)  # the manifest holds this very fingerprint: no need to hash again
