"""WebDataset shards in S3, against a real S3 server (SeaweedFS on loopback, no mocks): the same
batches as the same shards on disk, warm opens that ask nothing, DDP shares, exact resume, skips,
and the faults a cluster meets (a restarting server, a deleted shard, a wrong key, no bucket)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
from tests.conftest import REPO, jpeg_bytes, make_folder, run_cli, write_shard

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


@pytest.fixture
def uploaded(s3, source):
    """The source shards (with their indexes) in this test's prefix: (server, bucket, prefix, shards, spec)."""
    server, bucket, prefix = s3
    _, shards, n = source
    _upload(server, bucket, shards, prefix)
    return server, bucket, prefix, shards, _spec(bucket, n, prefix)


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_s3_gives_the_batches_of_the_same_shards_on_disk(uploaded, worker_type):
    server, bucket, prefix, shards, spec = uploaded
    kw = dict(views="byol", image_size=24, seed=7, num_workers=2, worker_type=worker_type)
    local = _epoch(Loader(str(shards / "*.tar"), 6, **kw))
    remote = _epoch(Loader(spec, 6, **kw))
    _same(local, remote)
    listed = _epoch(Loader(f"s3://{bucket}/{prefix}/", 6, **kw))  # a prefix: every .tar under it
    _same(local, listed)


def test_a_warm_open_asks_the_store_nothing_and_an_unindexed_shard_is_indexed_once(s3, source, monkeypatch):
    server, bucket, prefix = s3
    monkeypatch.setenv("RELA_S3_CACHE_GB", "0")  # every member by range: no local copies
    _, shards, n = source
    _upload(server, bucket, shards, prefix, index=False)  # shards another tool wrote: no .index beside them
    cold = open_dataset(_spec(bucket, n, prefix))
    local = open_dataset(str(shards / "*.tar"))
    assert len(cold) == len(local) and cold.labels().tolist() == local.labels().tolist()
    assert cold.fingerprint()["digest"] == local.fingerprint()["digest"]  # a store made on disk fits S3
    assert np.array_equal(cold.load(5), local.load(5))
    sent: list = []
    _requests(sent)
    warm = open_dataset(_spec(bucket, n, prefix))
    warm.fingerprint()
    assert sent == [] and len(warm) == len(local)
    warm.load(3)
    assert len(sent) == 1  # one ranged GET for one sample


def test_s3_shards_open_and_read_with_caching_off(uploaded, monkeypatch):
    """No usable cache folder (rela warns and caches nothing): indexes come from the store each time."""
    from rela.data import folder_scan

    server, bucket, prefix, shards, spec = uploaded
    monkeypatch.setattr(folder_scan, "cache_dir", lambda *a, **k: None)
    remote, local = open_dataset(spec), open_dataset(str(shards / "*.tar"))
    assert len(remote) == len(local) and np.array_equal(remote.load(7), local.load(7))


def test_whole_shard_copies_land_locally_and_then_an_epoch_asks_nothing(uploaded):
    server, bucket, prefix, shards, spec = uploaded
    kw = dict(views="byol", image_size=24, seed=2, num_workers=2)
    loader = Loader(spec, 6, **kw)
    first = _epoch(loader)  # ranged reads, while each shard is copied in the background
    copies = loader.dataset.shards[0].copies
    deadline = time.monotonic() + 30
    while not all(copies.path(s).exists() for s in loader.dataset.shards) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(copies.path(s).read_bytes() == (shards / s.name).read_bytes() for s in loader.dataset.shards)
    sent: list = []
    _requests(sent)
    again = _epoch(Loader(spec, 6, **kw))  # a new open and epoch: all local
    assert sent == []
    _same(first, again)
    _same(_epoch(Loader(str(shards / "*.tar"), 6, **kw)), again)


def test_ddp_ranks_read_disjoint_equal_shares_and_resume_mid_epoch_exactly(uploaded):
    server, bucket, prefix, shards, spec = uploaded
    kw = dict(views="rela", image_size=16, seed=3, num_workers=2)
    ranks = [_epoch(Loader(spec, 4, rank=r, world_size=2, **kw)) for r in (0, 1)]
    local = [_epoch(Loader(str(shards / "*.tar"), 4, rank=r, world_size=2, **kw)) for r in (0, 1)]
    for remote, disk in zip(ranks, local, strict=True):
        _same(disk, remote)
    mine = [set(torch.cat([b["index"] for b in r]).tolist()) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) and not mine[0] & mine[1]
    first = Loader(spec, 4, **kw)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    it.close()
    resumed = Loader(spec, 4, **kw)
    resumed.load_state_dict(state)
    _same(_epoch(Loader(spec, 4, **kw))[2:], _epoch(resumed))


def test_a_corrupt_member_is_skipped_as_on_disk(s3, tmp_path):
    server, bucket, prefix = s3
    items = []
    for i in range(12):
        items += [(f"{i:06d}.jpg", b"not a jpeg at all" if i == 5 else jpeg_bytes(40, 48, seed=i)),
                  (f"{i:06d}.cls", str(i % 2).encode())]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "000000.tar", items)
    _upload(server, bucket, tmp_path / "shards", prefix)
    spec = _spec(bucket, 1, prefix)
    with pytest.raises(CorruptImageError, match=r"000000.tar:000005\.jpg.*on_error='skip'"):
        _epoch(Loader(spec, 4, image_size=16, num_workers=0, shuffle=False))
    kw = dict(image_size=16, num_workers=2, seed=1, on_error="skip")
    remote, local = Loader(spec, 4, **kw), Loader(str(tmp_path / "shards" / "*.tar"), 4, **kw)
    _same(_epoch(local), _epoch(remote))
    assert [i for i, *_ in remote.skipped] == [i for i, *_ in local.skipped] == [5]


def test_an_epoch_survives_a_server_restart_with_the_same_batches(uploaded):
    server, bucket, prefix, shards, spec = uploaded
    kw = dict(views="byol", image_size=16, seed=5, num_workers=2)
    undisturbed = _epoch(Loader(spec, 4, **kw))
    it = iter(Loader(spec, 4, **kw))
    got = [next(it)]
    server.stop()  # mid-epoch: the next reads fail until it is back

    def come_back():
        time.sleep(2)
        server.start()

    t = threading.Thread(target=come_back)
    t.start()
    got += list(it)
    t.join()
    _same(undisturbed, got)


def _one_line(err: Exception, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    for needle in needles:
        assert needle in text, text


def test_a_deleted_shard_a_replaced_one_a_wrong_key_and_no_bucket_are_one_clear_line(uploaded, monkeypatch):
    server, bucket, prefix, shards, spec = uploaded
    loader = Loader(spec, 4, image_size=16, num_workers=0, shuffle=False)
    server.client().delete_object(Bucket=bucket, Key=f"{prefix}/000000.tar")
    with pytest.raises(ObjectStoreError) as e:
        _epoch(loader)
    _one_line(e.value, f"s3://{bucket}/{prefix}/000000.tar", "no such object")
    server.client().upload_file(str(shards / "000001.tar"), bucket, f"{prefix}/000000.tar")  # another shard's bytes
    with pytest.raises(ObjectStoreError) as e:
        _epoch(loader)
    _one_line(e.value, f"s3://{bucket}/{prefix}/000000.tar changed since rela indexed it")
    reopened = open_dataset(spec)  # re-indexed: its first member is now shard 1's first
    assert reopened.describe(0) != loader.dataset.describe(0) and reopened.describe(0).startswith(
        f"s3://{bucket}/{prefix}/000000.tar:")
    with pytest.raises(ObjectStoreError) as e:
        open_dataset(f"s3://no-such-bucket-{prefix}/x/{{000000..000001}}.tar")
    _one_line(e.value, "bucket 'no-such-bucket", "does not exist")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    object_store.reset_client()
    with pytest.raises(ObjectStoreError) as e:
        open_dataset(f"s3://{bucket}/{prefix}/")
    _one_line(e.value, "access denied", "AWS_ACCESS_KEY_ID")


def test_reads_give_up_after_the_retry_budget_with_the_endpoint_named(s3, source, monkeypatch):
    server, bucket, prefix = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("RELA_S3_RETRY_SECONDS", "1.5")
    object_store.reset_client()
    start = time.monotonic()
    with pytest.raises(ObjectStoreError) as e:
        open_dataset(f"s3://{bucket}/{prefix}/{{000000..000001}}.tar")
    assert time.monotonic() - start < 15
    _one_line(e.value, "still failing after", "http://127.0.0.1:9", "RELA_S3_RETRY_SECONDS")


def test_memory_stays_flat_over_five_epochs(uploaded):
    psutil = pytest.importorskip("psutil")
    *_, spec = uploaded
    loader = Loader(spec, 4, views="byol", image_size=32, num_workers=2, worker_type="thread")
    rss = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        _epoch(loader)
        rss.append(psutil.Process().memory_info().rss)
    assert rss[-1] - rss[1] < 32 * 2**20, [r >> 20 for r in rss]


def test_pack_to_s3_then_convert_and_train_from_it_on_the_command_line(s3, tmp_path):
    server, bucket, prefix = s3
    folder = make_folder(tmp_path / "src", classes=2, per_class=8)
    out = f"s3://{bucket}/{prefix}/packed"
    r = run_cli("pack", "--data", str(folder), "--out", out, "--shard-mb", "0.01", "--quiet", env=server.env)
    assert r.returncode == 0, r.stderr
    assert f"rela train --data '{out}/'" in r.stdout
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/packed/")["Contents"]]
    tars = [k for k in keys if k.endswith(".tar")]
    assert len(tars) > 1 and all(k + ".index" in keys for k in tars) and f"{prefix}/packed/pack.json" in keys
    again = run_cli("pack", "--data", str(folder), "--out", out, "--shard-mb", "0.01", "--quiet", env=server.env)
    assert again.returncode == 0, again.stderr  # finished: nothing written twice
    killed = f"s3://{bucket}/{prefix}/killed"
    args = ("pack", "--data", str(folder), "--out", killed, "--shard-mb", "0.01", "--quiet")
    assert run_cli(*args, env={**server.env, "RELA_CRASH_AT": "shard-written:2"}).returncode == -signal.SIGKILL
    assert run_cli(*args, env=server.env).returncode == 0  # resumed after its second shard

    def objects(under):
        c = server.client()
        return {o["Key"].rsplit("/", 1)[1]: c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in
                c.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}/")["Contents"]}

    assert objects("killed") == objects("packed")  # what an uninterrupted pack wrote, byte for byte
    store = tmp_path / "store"
    r = run_cli("convert", "--data", out + "/", "--prior", "random:resnet18", "--dim", "4", "--input-size", "32",
                "--out", str(store), "--quiet", env=server.env)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--data", out + "/", "--prior", str(store), "--image-size", "16", "--epochs", "1",
                "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet",
                env=server.env)
    assert r.returncode == 0, r.stderr
    bad = run_cli("train", "--data", f"s3://{bucket}/{prefix}/nothing-here/", "--out", str(tmp_path / "r2"),
                  "--quiet", env=server.env)
    assert bad.returncode != 0 and "no objects match" in bad.stderr and "Traceback" not in bad.stderr


def _ranks(out) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_torchrun_and_lightning_ddp_ranks_read_disjoint_equal_shares_from_s3_as_from_disk(uploaded, tmp_path):
    server, bucket, prefix, shards, spec = uploaded
    runs = {}
    for name, data in (("s3", spec), ("disk", str(shards / "*.tar"))):
        out = tmp_path / f"torchrun-{name}"
        out.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(REPO / "tests" / "data" / "ddp_read.py"), data, str(out)], capture_output=True,
                           text=True, timeout=300, env={**os.environ, **server.env})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = _ranks(out)
    assert runs["s3"] == runs["disk"]  # the same indices and pixels on each rank
    shares = [set(sum((ix for ix, _ in rank["seen"]), [])) for rank in runs["s3"]]
    assert runs["s3"][0]["len"] == runs["s3"][1]["len"] == 5 and not shares[0] & shares[1]
    assert len(shares[0] | shares[1]) == 40
    out = tmp_path / "lightning"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "training" / "lightning_fit.py"), str(out), "--devices",
                        "2", "--epochs", "1", "--data", spec], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **server.env})
    assert r.returncode == 0, r.stderr[-3000:]
    lit = [set(sum((s["index"] for s in rank["seen"]), [])) for rank in _ranks(out)]
    assert len(lit[0]) == len(lit[1]) == 20 and not lit[0] & lit[1]
