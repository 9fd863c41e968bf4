"""ReLA-D conversion: run a prior once over a dataset and write a whitened target store.

Phase 1 (the expensive one) runs the prior in batches and commits raw features in chunks: each
chunk is written to a temp file, fsynced and renamed, then recorded with its sha256 in an
append-only journal. A run killed at any point (SIGKILL included) resumes from the journal;
batches never straddle chunks, so a resumed run feeds the prior exactly the batches an
uninterrupted run would have, and the final store is bit-identical.

Phase 2 streams the chunks twice: once for the float64 mean/covariance (see `rela.data.pca`), once
to project, standardise and write float16 targets. The manifest is written last, atomically;
until it exists the directory is not a store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from rela import __version__, _workers
from rela import distributed as dist_util
from rela.data.convert_options import ConvertOptions
from rela.data.datasets import RelaDataset, open_dataset
from rela.data.pca import StreamingMoments, Whitening, fit_whitening
from rela.data.priors import Prior, load_prior
from rela.data.store import (
    IDENTITY_FIELDS,
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
from rela.errors import CorruptImageError, RelaError, RelaWarning, StoreError
from rela.faults import crashpoint as _crashpoint


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
    _workers.in_worker()  # dies with the rank it decodes for


@dataclass
class _Chunk:
    k: int
    start: int
    stop: int


class _Journal:
    """Append-only record of committed chunks: one JSON line each, fsynced after writing.

    Each rank appends to its own file (`journal.jsonl` for a single process, `journal-rankR.jsonl`
    under torchrun), so no two processes ever append to one file; `committed()` reads them all,
    whatever world size wrote them, so a job resumes under any number of ranks."""

    def __init__(self, workdir: Path, rank: int = 0, world: int = 1, session: str = "") -> None:
        self.workdir, self.rank, self.world, self.session = workdir, rank, world, session
        self.path = workdir / ("journal.jsonl" if world == 1 else f"journal-rank{rank}.jsonl")
        self.chunks_dir = workdir / "chunks"

    @staticmethod
    def repair(workdir: Path) -> None:
        """Cut a torn last line (a kill mid-append) off every journal, before anything appends:
        otherwise the next record joins it on one unreadable line and that chunk is done again."""
        for p in workdir.glob("journal*.jsonl"):
            data = p.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(p, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    os.fsync(f.fileno())

    def chunk_path(self, k: int) -> Path:
        return self.chunks_dir / f"{k:06d}.npz"

    def committed(self) -> dict[int, dict]:
        """Chunks whose file exists and matches its journal hash (a torn last line is ignored)."""
        done: dict[int, dict] = {}
        lines = [line for p in sorted(self.workdir.glob("journal*.jsonl")) for line in p.read_text().splitlines()]
        for line in lines:
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
               "infer_seconds": infer_seconds, "rank": self.rank, "world": self.world, "session": self.session,
               "skipped": {str(i): r for i, r in errors.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.chunk_path(k)) as z:
            return z["features"], z["valid"]


@dataclass
class _Job:
    """One conversion, as every step after planning sees it."""

    out: Path
    dataset: RelaDataset
    prior: Prior
    journal: _Journal
    chunks: list[_Chunk]
    dim: int
    fingerprint: dict
    batch_size: int
    progress: bool  # this rank shows progress bars (rank 0 only)
    cpu0: float = field(default_factory=_workers.cpu_seconds)  # this process's CPU seconds when the job began


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _job_identity(dataset_fp: dict, prior: Prior, dim: int) -> dict:
    """Everything that changes the store a job writes: two runs differing in any of it are two jobs."""
    return {"dataset": dataset_fp, "prior": prior.identity, "preprocessing": prior.preprocessing(), "dim": dim}


class OutLock:
    """An advisory lock (flock) on `--out` for a whole conversion, held by rank 0: a second
    conversion into the same folder is refused with the holder's pid and host instead of mixing
    its chunks, temp files and manifest with the first's. The lock file sits beside the folder
    (`.NAME.rela-lock`), so it outlives --overwrite and the final clean-up. Released when the
    process ends, however it ends."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out.with_name(f".{out.name}.rela-lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:  # read-only, full, or under a file: nothing can write there, so nothing to
            return  # guard; the checks of --out that follow say what is wrong, naming --out
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RelaError(f"{self.out} is being written by another conversion "
                            f"({holder}); wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def convert(
    data: str | Path | RelaDataset,
    prior: str | Prior,
    out: str | Path,
    *,
    dim: int = ConvertOptions.dim,
    limit: int | None = ConvertOptions.limit,
    batch_size: int = ConvertOptions.batch_size,
    chunk_rows: int = ConvertOptions.chunk_rows,
    num_workers: int | None = ConvertOptions.num_workers,
    skip_corrupt: bool = ConvertOptions.skip_corrupt,
    exif_transpose: bool = ConvertOptions.exif_transpose,
    resume: bool | None = None,
    overwrite: bool = ConvertOptions.overwrite,
    keep_raw: bool = ConvertOptions.keep_raw,
    deep: bool = ConvertOptions.deep,
    device: str | torch.device = ConvertOptions.device,
    progress: bool = True,
    **prior_kwargs,
) -> TargetStore:
    """Convert `data` with `prior` into a target store at `out` and return it opened.

    resume: None resumes an interrupted conversion of the same job automatically; True
    insists that there is one; False refuses to touch one (use `overwrite` to discard it).

    Under torch.distributed (e.g. `torchrun -m rela convert`) every rank calls this with the same
    arguments and `out` on a filesystem they share: the uncommitted chunks are dealt round-robin
    to the ranks, the PCA moments are reduced over ranks in float64 in chunk order, each rank
    writes its chunks' target rows, and rank 0 writes the manifest. The store is bit-identical to
    a single-process conversion on the CPU (same batches, same chunk-ordered reduction).
    device: "auto" is the rank's GPU when there is one, else the CPU.
    """
    ConvertOptions(data=str(data), prior=str(prior), out=str(out), dim=dim, limit=limit, batch_size=batch_size,
                   chunk_rows=chunk_rows, num_workers=num_workers, device=str(device))  # the flags' checks, once
    out = Path(out)
    rank, world = dist_util.rank_world()
    dataset = open_dataset(data, limit, exif_transpose)
    if isinstance(prior, str):
        prior = load_prior(prior, **prior_kwargs)
    if not 1 <= dim <= prior.dim:
        raise RelaError(f"--dim {dim} is out of range: the prior {prior.identity.get('name')} "
                        f"gives {prior.dim}-d features, so dim must be in [1, {prior.dim}]")
    _check_fits(dim, len(dataset), "samples")  # before the prior runs: the count alone decides it
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)  # batches never straddle chunks
    fp = dataset.fingerprint(deep=deep)
    identity = _job_identity(fp, prior, dim)
    dist_util.check_same("the dataset and prior",  # not the data's path: nodes may mount it elsewhere
                         {**identity, "dataset": {k: fp.get(k) for k in IDENTITY_FIELDS}})
    lock = OutLock(out)
    dist_util.main_decides(lock.acquire)
    try:
        return _convert_locked(out, dataset, prior, identity, fp, dim, batch_size, chunk_rows, num_workers,
                               skip_corrupt, resume, overwrite, keep_raw, device, progress)
    finally:
        lock.release()


def _convert_locked(out, dataset, prior, identity, fp, dim, batch_size, chunk_rows, num_workers, skip_corrupt,
                    resume, overwrite, keep_raw, device, progress) -> TargetStore:
    """`convert` once `out` is this job's alone."""
    rank, world = dist_util.rank_world()
    workdir = out / WORKDIR
    plan = dist_util.main_decides(_plan, out, identity, overwrite, resume,
                                  {"batch_size": batch_size, "chunk_rows": chunk_rows})
    if plan is None:
        return TargetStore.open(out)  # already complete for this dataset, prior and dim
    job, done, session = plan
    batch_size, chunk_rows = job["batch_size"], job["chunk_rows"]  # same batches as before
    journal = _Journal(workdir, rank, world, session)
    n = len(dataset)
    chunks = [_Chunk(k, s, min(s + chunk_rows, n)) for k, s in enumerate(range(0, n, chunk_rows))]
    todo = [c for c in chunks if c.k not in done]
    if done and todo and rank == 0:
        print(f"resuming {out}: {len(done)}/{len(chunks)} chunks already done", file=sys.stderr)
    if 0 < len(todo) < world and rank == 0:
        print(f"{len(todo)} chunk(s) of {chunk_rows} rows to convert on {world} ranks: {world - len(todo)} "
              "rank(s) will idle (a smaller --chunk-rows spreads the work)", file=sys.stderr)

    prior.to(dist_util.resolve_device(str(device)))
    job = _Job(out, dataset, prior, journal, chunks, dim, fp, batch_size, progress and rank == 0)
    _extract(job, todo[rank::world], num_workers, skip_corrupt, n - sum(c.stop - c.start for c in todo))
    dist_util.barrier()  # every rank's chunks are committed before rank 0 reads the journals
    done = dist_util.main_decides(journal.committed)
    missing = [c.k for c in chunks if c.k not in done]
    if missing:
        raise StoreError(f"chunks {missing[:5]} are missing after extraction; rerun to resume")
    return _finalize(job, done, keep_raw)


def _plan(out: Path, identity: dict, overwrite: bool, resume: bool | None, sizes: dict):
    """Rank 0: settle what is at `out`. None → a finished store to reuse; else (job, committed
    chunks), with the job's batch and chunk sizes taken from an interrupted run when resuming."""
    if _prepare_out(out, identity, overwrite, resume) is not None:
        return None
    workdir = out / WORKDIR
    job_path = workdir / "job.json"
    if job_path.exists():
        job = json.loads(job_path.read_text())
        _Journal.repair(workdir)
    else:
        (workdir / "chunks").mkdir(parents=True, exist_ok=True)
        job = {**identity, **sizes, "library_version": __version__}
        atomic_write_bytes(job_path, json.dumps(job, indent=1).encode())
    session = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")  # this invocation, for the cost
    return job, _Journal(workdir).committed(), session


def _prepare_out(out: Path, identity: dict, overwrite: bool, resume: bool | None):
    """Decide what to do with whatever is already at `out`; returns a finished store to reuse."""
    workdir = out / WORKDIR
    if (out / MANIFEST).exists() and not overwrite:
        try:
            store = TargetStore.open(out)
        except StoreError:
            store = None
        m = store.manifest if store else {}
        same = store is not None and all(m.get(k) == v for k, v in identity.items())  # dim included
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


def _extract(job: _Job, todo: list[_Chunk], num_workers: int | None, skip_corrupt: bool, done_rows: int) -> None:
    """Phase 1 on this rank: the prior's raw features of the chunks in `todo`, committed one by one."""
    if not todo:
        return
    from tqdm import tqdm

    from rela._alloc import keep_freed_memory

    keep_freed_memory()  # ~3x faster CPU inference here: no page faults on every activation
    dataset, prior, journal, batch_size, progress = job.dataset, job.prior, job.journal, job.batch_size, job.progress
    world = dist_util.rank_world()[1]
    batches = [list(range(s, min(s + batch_size, c.stop))) for c in todo for s in range(c.start, c.stop, batch_size)]
    if num_workers is None:
        # In-memory arrays need no decoding: worker IPC would cost more than it saves.
        num_workers = 0 if dataset.in_memory or len(dataset) < 2048 else min(2, dist_util.cpu_share())
    inputs = _PriorInputs(dataset, prior)
    loader = torch.utils.data.DataLoader(
        inputs, batch_sampler=batches, num_workers=num_workers,
        collate_fn=inputs.collate, worker_init_fn=_worker_init if num_workers else None,
        timeout=600 if num_workers else 0,
    )
    if world == 1:
        bar = tqdm(total=len(dataset), initial=done_rows, unit="img", desc="prior features",
                   disable=not progress, dynamic_ncols=True, smoothing=0.05)
    else:  # rank 0's shard; the others run alongside
        bar = tqdm(total=sum(c.stop - c.start for c in todo), unit="img", dynamic_ncols=True, smoothing=0.05,
                   desc=f"prior features (rank 0's shard of {world})", disable=not progress)
    chunk_iter: Iterator[_Chunk] = iter(todo)
    chunk = next(chunk_iter)
    feats = np.zeros((chunk.stop - chunk.start, prior.dim), np.float32)
    valid = np.ones(chunk.stop - chunk.start, bool)
    errors: dict[int, str] = {}
    t0, infer_s = time.perf_counter(), 0.0
    try:
        for idx, x, errs in _workers.start(loader):  # a Ctrl-C while forking is not lost
            bad = [(int(i), e) for i, e in zip(idx.tolist(), errs, strict=True) if e]
            if bad and not skip_corrupt:
                i, reason = bad[0]
                raise CorruptImageError(i, dataset.describe(i), reason, "Fix or remove the file, or pass "
                                        "--skip-corrupt (skip_corrupt=True) to record it as skipped")
            t_inf = time.perf_counter()
            f = prior(prior.normalize(x.to(prior.device, non_blocking=True))).numpy()
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


def _check_fits(dim: int, samples: int, what: str) -> None:
    """N samples, centred, span at most N − 1 principal axes: a `dim` beyond that keeps components
    with no variance, whose targets are 0 for every sample (the RELA loss cannot fit them)."""
    if dim > samples - 1:
        raise RelaError(f"--dim {dim} cannot be fitted from {samples} {what}: centred, they span at most "
                        f"{samples - 1} principal components, so the last {dim - samples + 1} would have no "
                        f"variance; use --dim {max(samples - 1, 1)} or less (or more data)")


def _warn_dead_components(white: Whitening, dim: int, samples: int, rel: float = 1e-6) -> None:
    """Warn, with the numbers, when kept components have (numerically) no variance: features that
    repeat (duplicate images, a prior that collapses them) span fewer axes than the samples do."""
    top = float(white.eigenvalues[0]) if dim else 0.0
    alive = int((white.eigenvalues > rel * top).sum()) if top > 0 else 0
    if alive < dim:
        warnings.warn(f"the store keeps {dim - alive} of its {dim} components with no variance ({samples} samples; "
                      f"smallest kept eigenvalue {float(white.eigenvalues[-1]):.3g}, {rel:g} of the largest is the "
                      f"cut): their targets are 0 for every sample and the RELA loss cannot fit them. The largest "
                      f"dim that fits this data is {max(alive, 1)}: convert again with --dim {max(alive, 1)}",
                      RelaWarning, stacklevel=3)


def _reduce_moments(journal: _Journal, chunks: list[_Chunk], dim: int, progress: bool) -> StreamingMoments:
    """Float64 mean and scatter of all valid rows, reduced over ranks in chunk order.

    Each rank computes the moments of every world-th chunk (the O(C·D²) part); one all-gather
    per round of `world` chunks brings them to every rank, which merges them in chunk order.
    A plain all_reduce would add the shards in an order that depends on the world size; merging
    in chunk order gives a single process's exact bits. Memory per round: world · 8·D² bytes."""
    from tqdm import tqdm

    rank, world = dist_util.rank_world()
    total = StreamingMoments(dim)
    rounds = range(0, len(chunks), world)
    for first in tqdm(rounds, desc="covariance", unit="round" if world > 1 else "chunk", disable=not progress):
        group = chunks[first:first + world]
        mine = StreamingMoments(dim)
        if rank < len(group):
            f, v = journal.load(group[rank].k)
            mine = StreamingMoments.of(f[v])
        if world == 1:
            parts = [mine]
        else:
            import torch.distributed as dist

            packed = torch.from_numpy(mine.pack())
            gathered = [torch.empty_like(packed) for _ in range(world)]
            dist.all_gather(gathered, packed, group=dist_util.cpu_group())
            parts = [StreamingMoments.unpack(g.numpy(), dim) for g in gathered]
        for part in parts[:len(group)]:
            total.merge(part)
    return total


def _finalize(job: _Job, done: dict[int, dict], keep_raw: bool) -> TargetStore:
    """Phase 2: fit the whitening on all committed chunks, write the targets, then the manifest."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    t0 = time.perf_counter()
    rank, world = dist_util.rank_world()
    out, dataset, journal, chunks, dim, progress = job.out, job.dataset, job.journal, job.chunks, job.dim, job.progress
    skipped = sorted(int(i) for rec in done.values() for i in rec.get("skipped", {}))
    n_valid = len(dataset) - len(skipped)
    if n_valid < 2:
        raise RelaError(f"only {n_valid} usable samples; PCA needs at least 2")
    _check_fits(dim, n_valid, "usable samples")

    moments = _reduce_moments(journal, chunks, job.prior.dim, progress)
    white = dist_util.main_decides(fit_whitening, moments, dim)  # one eigendecomposition, for all
    _warn_dead_components(white, dim, n_valid)

    workdir = out / WORKDIR
    tmp_targets = workdir / TARGETS
    dist_util.main_decides(TargetWriter.create, tmp_targets, len(dataset), dim)  # header, sized file
    writer = TargetWriter(tmp_targets, len(dataset), dim, create=False)
    mine = chunks[rank::world]
    for c in tqdm(mine, desc="targets", unit="chunk", disable=not progress):
        f, v = journal.load(c.k)
        z = white.transform(f)
        z[~v] = 0.0
        writer.write(z, start=c.start)
    writer.close(expect_rows=sum(c.stop - c.start for c in mine))
    dist_util.barrier()  # every rank's rows are on disk
    if rank == 0:
        save_file(white.tensors(), str(workdir / PCA))
        _crashpoint("targets-written")
        os.replace(workdir / PCA, out / PCA)
        os.replace(tmp_targets, out / TARGETS)
        fsync_dir(out)
        _crashpoint("before-manifest")
        _write_manifest(job, done, white, skipped, time.perf_counter() - t0, _workers.cpu_seconds() - job.cpu0)
        if not keep_raw:
            shutil.rmtree(workdir)
    dist_util.barrier()  # the manifest exists
    return TargetStore.open(out)  # the manifest holds this very fingerprint: no need to hash again


def _session_wall(done: dict, key: str) -> float:
    """Sum over sessions of the busiest rank's total `key` seconds in that session."""
    per_session: dict[str, dict[int, float]] = {}
    for rec in done.values():
        ranks = per_session.setdefault(rec.get("session", ""), {})
        rank = rec.get("rank", 0)
        ranks[rank] = ranks.get(rank, 0.0) + rec.get(key, 0.0)
    return sum(max(ranks.values()) for ranks in per_session.values())


def _write_manifest(job: _Job, done: dict[int, dict], white: Whitening, skipped: list[int], finalize_s: float,
                    session_cpu_s: float) -> None:
    # Wall clock: within one invocation (session) the ranks ran side by side, so it lasted as long
    # as its busiest rank's chunks; sessions (a killed run, its resumption) add up. A session's
    # chunk seconds start when its rank starts extracting, so loader start-up is included.
    # process_seconds is the sum over every rank: what the conversion cost in device time.
    prior, n, world = job.prior, len(job.dataset), dist_util.rank_world()[1]
    targets = (job.out / TARGETS).stat()
    process_s = sum(rec.get("seconds", 0.0) for rec in done.values())
    extract_s, infer_s = (_session_wall(done, key) for key in ("seconds", "infer_seconds"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "library": {"name": "rela", "version": __version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": job.fingerprint,
        "prior": prior.identity,
        "preprocessing": prior.preprocessing(),
        "n": n,
        "dim": job.dim,
        "raw_dim": prior.dim,
        "dtype": "float16",
        "whitening": {"method": "pca", "eps": white.eps,
                      "explained_variance_ratio": white.explained_variance_ratio},
        "skipped": skipped,
        # targets.npy as written (every row checked finite): opening trusts an unchanged file
        "targets_file": {"bytes": targets.st_size, "mtime_ns": targets.st_mtime_ns},
        "skipped_reasons": {str(i): r for rec in done.values() for i, r in rec.get("skipped", {}).items()},
        "cost": {"extract_seconds": round(extract_s, 3), "inference_seconds": round(infer_s, 3),
                 "finalize_seconds": round(finalize_s, 3),
                 "seconds": round(extract_s + finalize_s, 3),
                 "process_seconds": round(process_s, 3), "processes": world,
                 # this process's CPU (its threads and ended workers) in the session that finished
                 # the store: the whole conversion for one process that was not interrupted
                 "cpu_seconds": round(session_cpu_s, 3),
                 "device": str(prior.device),
                 "images_per_second": round(n / extract_s, 2) if extract_s else None},
    }
    atomic_write_bytes(job.out / MANIFEST, json.dumps(manifest, indent=1).encode())
