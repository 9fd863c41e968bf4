"""WebDataset shards in S3, against a real S3 server (SeaweedFS on loopback, no mocks): the same
batches as the same shards on disk, warm opens that ask nothing, DDP shares, exact resume, skips,
and the faults a cluster meets (a restarting server, a deleted shard, a wrong key, no bucket)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rela import Loader
from rela.data import object_store
from rela.data.datasets import open_dataset
from rela.data.object_store import ObjectStoreError
from rela.data.pack import pack
from rela.errors import CorruptImageError
from tests.conftest import make_folder, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """40 photos-like JPEGs in 4 classes, packed locally into 4 shards (with their indexes)."""
    root = tmp_path_factory.mktemp("remote")
    folder = make_folder(root / "src", classes=4, per_class=10)
    shards = pack(str(folder), root / "shards", shard_mb=0.02, progress=False)
    return folder, root / "shards", len(shards)


def _upload(server, bucket: str, shards_dir, prefix: str, index: bool = True) -> None:
    c = server.client()
    for p in sorted(shards_dir.iterdir()):
        if p.suffix == ".tar" or (index and p.name.endswith(".tar.index")):
            c.upload_file(str(p), bucket, f"{prefix}/{p.name}")


def _spec(bucket: str, n: int, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}/{{000000..{n - 1:06d}}}.tar"


def _epoch(loader) -> list[dict]:
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"], strict=True))


def _requests(counter: list):
    """Count the S3 requests this process sends from now on."""
    object_store.client().meta.events.register("before-send.s3", lambda **_: counter.append(1))


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_s3_gives_the_batches_of_the_same_shards_on_disk(s3, source, worker_type):
    server, bucket, prefix = s3
    _, shards, n = source
    _upload(server, bucket, shards, prefix)
    kw = dict(views="byol", image_size=24, seed=7, num_workers=2, worker_type=worker_type)
    local = _epoch(Loader(str(shards / "*.tar"), 6, **kw))
    remote = _epoch(Loader(_spec(bucket, n, prefix), 6, **kw))
    _same(local, remote)
    listed = _epoch(Loader(f"s3://{bucket}/{prefix}/", 6, **kw))  # a prefix: every .tar under it
    _same(local, listed)
