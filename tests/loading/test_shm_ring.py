"""Worker processes reuse their shared batch buffers (shm_ring): a buffer goes back to its worker
only when the user has dropped every tensor using it, so batches a loop keeps stay intact."""

import gc

import pytest
import torch

from rela import Loader
from rela.data.datasets import ImageFolder
from rela.loading.backends import Built, shm_ring
from rela.loading.views import byol_views
from tests.conftest import make_folder


def _built(views) -> Built:
    return Built(list(views), torch.zeros(len(views[0]), dtype=torch.int64), torch.arange(len(views[0])))


def test_the_worker_leases_what_it_hands_over_and_frees_the_rest():
    ring = shm_ring.Ring(2)
    a = ring.take((4, 3, 8, 8), torch.float32)
    stage = ring.take((4, 3, 8, 8), torch.uint8)  # built, but not handed over
    leases = ring.handed(_built([a[:, :2]]))  # a view of the buffer, as assemble may hand it
    assert [(v, k) for v, _, k in leases] == [(0, 0)] and not ring.taken
    assert ring.buffers[((4, 3, 8, 8), torch.float32)][0].tolist() == [1, 0]
    assert ring.buffers[((4, 3, 8, 8), torch.uint8)][0].tolist() == [0, 0]  # the uint8 stage: free at once
    assert ring.take((4, 3, 8, 8), torch.uint8).data_ptr() == stage.data_ptr()  # and reused
    assert ring.take((4, 3, 8, 8), torch.float32).data_ptr() != a.data_ptr()  # slot 0 is still leased


def test_the_loop_frees_a_lease_when_the_last_tensor_using_it_is_gone():
    """The loop's copy of the worker's buffer (its own mapping: another storage) is watched; a
    slice the user keeps keeps the lease."""
    flags = torch.tensor([1, 1], dtype=torch.int32)
    received = torch.zeros(4, 3, 8, 8)
    user = shm_ring.claim(Built([received], torch.zeros(4, dtype=torch.int64), torch.arange(4),
                                leases=[(0, flags, 1)])).views[0]
    del received
    gc.collect()
    keep = user[1]
    del user
    gc.collect()
    assert flags.tolist() == [1, 1]
    del keep
    gc.collect()
    assert flags.tolist() == [1, 0]


def test_every_slot_leased_takes_a_new_buffer_instead_of_waiting():
    ring = shm_ring.Ring(1)
    first = ring.take((2, 2), torch.float32)
    extra = ring.take((2, 2), torch.float32)
    assert extra.data_ptr() != first.data_ptr() and extra.is_shared()
    assert len(ring.taken) == 1  # the extra buffer is the batch's own, not a lease


@pytest.mark.parametrize("views", ["plain", "byol"])
def test_worker_processes_batches_kept_by_the_loop_stay_intact(tmp_path, views):
    """More batches than the workers have buffers, every one kept, then compared with the same
    pass built in-process; and a loop that drops each batch (buffers reused) sees the same."""
    folder = ImageFolder(make_folder(tmp_path / "imgs", classes=2, per_class=30))
    kw = dict(image_size=16, views="eval" if views == "plain" else list(byol_views(16, blur=True)), seed=4,
              drop_last=False, worker_type="process")
    ref = list(Loader(folder, 2, num_workers=0, **kw))
    kept = list(Loader(folder, 2, num_workers=2, **kw))  # 30 batches; 2 workers x 5 buffers
    dropped = [[v.clone() for v in b["views"]] for b in Loader(folder, 2, num_workers=2, **kw)]
    assert len(ref) == len(kept) == len(dropped) == 30
    for a, b, c in zip(ref, kept, dropped, strict=True):
        assert torch.equal(a["index"], b["index"])
        for x, y, z in zip(a["views"], b["views"], c, strict=True):
            assert torch.equal(x, y) and torch.equal(x, z)
