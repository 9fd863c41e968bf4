"""Thread workers (and the loop without workers) reuse their batch buffers (batch_pool): a buffer
goes back to the pool only when the user has dropped every tensor using it."""

import gc

import pytest
import torch

from rela import Loader
from rela.data.datasets import ImageFolder
from rela.loading.backends.batch_pool import BatchPool
from rela.loading.views import byol_views
from tests.conftest import make_folder


def test_a_buffer_comes_back_only_when_nothing_uses_it():
    pool = BatchPool(2)
    a = pool.take((4, 3, 8, 8), torch.float32)
    first = a.data_ptr()
    assert first % 64 == 0  # the decoder's whole-line stores need it
    keep = a[1]  # a view the user keeps: the buffer is still in use
    del a
    gc.collect()
    b = pool.take((4, 3, 8, 8), torch.float32)
    assert b.data_ptr() != first
    del keep
    gc.collect()
    assert pool.take((4, 3, 8, 8), torch.float32).data_ptr() == first
    assert pool.take((4, 3, 8, 8), torch.uint8).data_ptr() != first  # another shape or dtype: its own


def test_the_pool_keeps_at_most_slots_free_buffers():
    pool = BatchPool(2)
    lent = [pool.take((2, 5), torch.float32) for _ in range(4)]  # all lent out: new ones, no waiting
    assert len({t.data_ptr() for t in lent}) == 4
    del lent
    gc.collect()
    assert len(pool.free[((2, 5), torch.float32)]) == 2


@pytest.mark.parametrize("views", ["plain", "byol"])
def test_thread_workers_batches_kept_or_dropped_stay_intact(tmp_path, views):
    """Every batch kept, or each dropped as the loop goes (its buffers reused), against the same
    pass built in-process and copied out."""
    folder = ImageFolder(make_folder(tmp_path / "imgs", classes=2, per_class=30))
    kw = dict(image_size=16, views="eval" if views == "plain" else list(byol_views(16, blur=True)), seed=4,
              drop_last=False)
    ref = [[v.clone() for v in b["views"]] for b in Loader(folder, 2, num_workers=0, **kw)]
    kept = list(Loader(folder, 2, num_workers=2, worker_type="thread", **kw))
    seen, dropped, pooled = set(), [], set()
    loader = Loader(folder, 2, num_workers=2, worker_type="thread", **kw)
    for b in loader:
        seen.add(b["views"][0].data_ptr())
        dropped.append([v.clone() for v in b["views"]])
        del b
        gc.collect()
        pool = loader._backend.builder.pool
        pooled |= {t.data_ptr() for t in pool.free.get(((2, 3, 16, 16), torch.float32), [])}
    assert len(ref) == len(kept) == len(dropped) == 30
    assert len(seen) < 30 and seen & pooled  # the pool's buffers, lent again as batches were dropped
    gc.collect()  # the pass is over: emptied then, it holds at most what was still lent (the last batch)
    assert sum(map(len, loader._backend.builder.pool.free.values())) <= len(ref[0])
    for a, b, c in zip(ref, kept, dropped, strict=True):
        for x, y, z in zip(a, b["views"], c, strict=True):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_a_batch_dropped_while_the_pool_is_locked_comes_back_without_deadlock():
    # A garbage collection inside take() (which holds the lock) can run a lent batch's finaliser on
    # the same thread; run in a thread so that a deadlock fails the test instead of hanging it.
    import threading

    pool = BatchPool(2)
    box = [pool.take((3, 4), torch.float32)]

    def drop_under_lock():
        with pool.lock:
            box.clear()
            gc.collect()

    t = threading.Thread(target=drop_under_lock, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and len(pool.free[((3, 4), torch.float32)]) == 1
