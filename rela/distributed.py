"""torch.distributed glue: rela runs on PyTorch's own process groups, launched by `torchrun`.

`torchrun --nproc-per-node N -m rela convert|train ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; `init()` joins that group. On GPUs the group is "cpu:gloo,cuda:nccl" (NCCL for
CUDA tensors, gloo for the CPU-side bookkeeping such as the conversion's covariance), on CPUs
gloo. Library code never requires this: every function here degrades to a single process when no
group is initialised, so `rela.convert(...)` and `rela.train(...)` work the same inside a user's
own torchrun script.

Failure handling: a rank that raises exits non-zero and torchrun stops the others; decisions that
only one rank may take (deleting an old store, choosing what to resume) are taken on rank 0 by
`main_decides`, which hands every rank the same result or the same error, so no rank waits in a
collective for a peer that already gave up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from rela.errors import RelaError

T = TypeVar("T")
_cpu_group = None


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU. Under torchrun a bare "cuda"/"auto" is the rank's
    own GPU (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RelaError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank() if active() else torch.cuda.current_device())
    return device


def cpu_share() -> int:
    """CPU cores for this process: the node's, divided among torchrun's local ranks. Decode
    workers are sized from it: two ranks on two cores with two workers each ran six busy
    processes and converted JPEGs 0.6× as fast as with one worker each (bench/scaling.py)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def timeout() -> timedelta:
    """Collective timeout: RELA_DIST_TIMEOUT seconds (default 1800, PyTorch's gloo default).

    It bounds how long a rank waits for a peer that is still working (conversion shards finish at
    different times), not how long a crashed peer is waited for: torchrun stops the job then."""
    return timedelta(seconds=float(os.environ.get("RELA_DIST_TIMEOUT", "1800")))


def init(device: str = "auto") -> bool:
    """Join the torchrun group when launched as several ranks; returns whether it did.

    device "auto"/"cuda" with CUDA present: each rank takes cuda:LOCAL_RANK and NCCL carries CUDA
    tensors; otherwise gloo."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RelaError("this PyTorch build has no torch.distributed; run a single process")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise RelaError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPUs here: "
                            "lower --nproc-per-node")
        torch.cuda.set_device(local_rank())
    from torch.distributed.rendezvous import rendezvous

    store, rank, world = next(rendezvous("env://", timeout=timeout()))
    # torchrun's agent keeps one store across restarts (--max-restarts): without a prefix per
    # attempt, restarted ranks can read the dead ranks' addresses and fail or hang connecting.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"rela/attempt-{attempt}", store)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout())
    return True


def shutdown() -> None:
    """Leave the group cleanly (a barrier first: a rank tearing gloo down early can abort a peer)."""
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _cpu_group = None


def cpu_group():
    """A group that takes CPU tensors: the default one unless it is NCCL-only (then a gloo group)."""
    global _cpu_group
    if not active():
        return None
    if "gloo" in str(dist.get_backend()):
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo", timeout=timeout())
    return _cpu_group


def barrier() -> None:
    if active():
        dist.barrier(group=cpu_group())


def broadcast_object(obj: T, src: int = 0) -> T:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cpu_group())
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def main_decides(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on rank 0 only; every rank returns its result or raises its error (as a RelaError
    with the same message on the other ranks).

    For decisions with side effects that must happen once (deleting, creating, reading many
    files): the other ranks wait here instead of racing rank 0. It does not wait for them before
    `fn` runs: put a `barrier()` first when `fn` must see what the other ranks did."""
    if not active():
        return fn(*args, **kwargs)
    result, error, message = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # every rank must leave this call, whatever rank 0 ran into
            error, message = e, str(e) if isinstance(e, RelaError) else f"rank 0: {type(e).__name__}: {e}"
    result, message = broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise RelaError(message)
    return result


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank went away (so the useful
    message is that rank's, not this traceback)."""
    kinds = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError") if hasattr(dist, name))
    text = str(error)
    return isinstance(error, kinds) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def check_same(name: str, value) -> None:
    """Refuse to go on when ranks disagree on `value` (configuration, dataset size, ...)."""
    if not active():
        return
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise RelaError(f"ranks disagree on {name} ({detail}); every rank must see the same data, "
                        "arguments and files (a filesystem all nodes share)")
