"""Real 2-process gloo groups on this machine: subsets split disjointly with equal batch counts,
and scored subsets stay identical on every rank after `update_scores`."""

import json
import socket

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from rela import Loader
from rela.datasets import ArrayDataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, policy: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(0)
        ds = ArrayDataset(rng.integers(0, 255, (101, 12, 12), dtype=np.uint8), rng.integers(0, 3, 101))
        loader = Loader(ds, 8, image_size=8, subset=0.6, policy=policy, num_workers=0, seed=7)
        epochs = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            batches = []
            for b in loader:
                batches.append(b["index"].tolist())
                # Rank-dependent losses: only an all-gather keeps the score tables identical.
                loader.update_scores(b["index"], b["index"].float() * (rank + 1))
            epochs.append(batches)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"epochs": epochs, "score_sum": float(loader.subset.score.sum())})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        # Without a barrier, a rank that tears gloo down first can make its peer abort at exit
        # ("terminate called without an active exception"): always sync before destroying.
        dist.barrier()
        dist.destroy_process_group()


def _run(tmp_path, policy):
    out = tmp_path / f"{policy}.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out), policy), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_two_ranks_uniform(tmp_path):
    res = _run(tmp_path, "uniform")
    for epoch in range(3):
        a, b = (res[r]["epochs"][epoch] for r in range(2))
        assert len(a) == len(b) == 3  # floor(0.6·101) = 60 → 30 per rank → 3 full batches of 8
        fa, fb = sum(a, []), sum(b, [])
        assert not set(fa) & set(fb)
    assert res[0]["epochs"][0] != res[0]["epochs"][1]


def test_two_ranks_scored_stay_in_sync(tmp_path):
    res = _run(tmp_path, "scored")
    assert res[0]["score_sum"] == res[1]["score_sum"]
    for epoch in range(3):
        a, b = (sum(res[r]["epochs"][epoch], []) for r in range(2))
        assert len(a) == len(b) and not set(a) & set(b)
