"""The GPU paths, run where a CUDA device exists (bench/gpu_check.sh; skipped elsewhere): the Triton
kernels compiled for the device against the float64 reference, the score table on the device,
a bf16 + channels_last training step with no host sync between log points, DALI's mixed
decode against the torch backend, pinned batches from worker processes, and a 2-rank NCCL group
when two GPUs exist."""

import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (bench/gpu_check.sh "
                                 "runs these on a GPU host)")]

DEV = torch.device("cuda")


def test_triton_runs_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with RELA_GPU_CHECK=1 (bench/gpu_check.sh)"
    from rela.kernels._dispatch import use_triton

    assert use_triton(torch.zeros(1, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,B,d", [(1, 7, 3), (2, 256, 128), (3, 1000, 2048)])
def test_rela_loss_kernel_on_the_gpu_matches_float64(dtype, V, B, d):
    from rela.kernels.rela_loss import rela_loss, rela_loss_reference

    g = torch.Generator().manual_seed(V * B + d)
    pred = torch.randn(V, B, d, generator=g, dtype=torch.float64)
    target = torch.randn(B, d, generator=g, dtype=torch.float64)
    tdtype = torch.float32 if dtype == torch.float32 else torch.float16
    p = pred.to(DEV, dtype).requires_grad_(True)
    loss = rela_loss(p, target.to(DEV, tdtype), reduction="none")
    up = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    (loss.double() * up.to(DEV)).sum().backward()
    ref_p = pred.to(dtype).double().requires_grad_(True)
    ref = rela_loss_reference(ref_p, target.to(tdtype).double())
    (ref * up).sum().backward()
    assert float((loss.detach().double().cpu() - ref.detach()).abs().max()) < 1e-5
    scale = float(up.abs().max() / pred.norm(dim=-1).min())
    err = float((p.grad.double().cpu() - ref_p.grad).abs().max()) / max(float(ref_p.grad.abs().max()), scale)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_score_table_lives_and_updates_on_the_gpu():
    from rela.loading.subset import Subset

    cpu, gpu = Subset(500, 0.5, "scored", seed=1), Subset(500, 0.5, "scored", seed=1).to(DEV)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        index, loss = torch.randint(0, 500, (128,), generator=g), torch.rand(128, generator=g)
        cpu.update(index, loss)
        gpu.update(index.to(DEV), loss.to(DEV))
    assert gpu.score.is_cuda
    torch.testing.assert_close(gpu.score.cpu(), cpu.score, rtol=1e-5, atol=1e-6)
    assert np.array_equal(gpu.epoch_indices(3), cpu.epoch_indices(3))


def test_bf16_channels_last_training_on_the_gpu_has_no_host_sync(tmp_path):
    from rela import convert
    from rela.training.run import TrainConfig
    from rela.training.train import Trainer
    from tests.conftest import smooth_image

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=np.stack([smooth_image(rng, 36, 36) for _ in range(128)]),
             labels=rng.integers(0, 4, 128))
    store = convert(str(tmp_path / "d.npz"), "random:resnet18", tmp_path / "s", dim=16, input_size=64,
                    progress=False, device=DEV)
    cfg = TrainConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / "run"), prior=str(store.path), epochs=2,
                      batch_size=32, image_size=32, phase="fixed:0.5", policy="scored", precision="bf16",
                      channels_last=True, log_every=100, device="cuda", num_workers=0, probe_at_switch=False)
    trainer = Trainer(cfg, progress=False)
    step = trainer.train_step

    def checked(*a):  # any synchronising CUDA call inside a step raises (torch's sync debug mode)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*a)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer.train_step = checked
    summary = trainer.fit()
    assert summary["steps"] == 8
    assert trainer.loader.subset.score.is_cuda and float(trainer.loader.subset.score.abs().sum()) > 0


def test_dali_mixed_decode_matches_the_torch_backend(tmp_path):
    from rela import Loader
    from rela.loading.backends import available
    from tests.conftest import make_folder

    if not available()["dali"]:
        pytest.skip("DALI not installed on this GPU host (its row is skipped)")
    folder = make_folder(tmp_path / "imgs", classes=2, per_class=6)
    kw = dict(views="eval", image_size=24, shuffle=False, drop_last=False, num_workers=1)
    ref = list(Loader(folder, 4, **kw))
    got = list(Loader(folder, 4, backend="dali", device="cuda", **kw))
    for a, b in zip(ref, got, strict=True):
        assert b["views"][0].is_cuda and torch.equal(a["index"], b["index"].cpu())
        assert float((a["views"][0] - b["views"][0].cpu()).abs().mean()) < 0.03  # nvJPEG vs libjpeg-turbo IDCT


def _nccl_worker(rank: int, init: str) -> None:
    import torch.distributed as dist

    from rela import Loader
    from rela.data.datasets import ArrayDataset

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    try:
        rng = np.random.default_rng(0)
        ds = ArrayDataset(rng.integers(0, 255, (64, 12, 12), dtype=np.uint8), np.zeros(64, int))
        loader = Loader(ds, 8, image_size=8, policy="scored", subset=0.5, device=f"cuda:{rank}", num_workers=0)
        for b in loader:
            loader.update_scores(b["index"], b["index"].float() * (rank + 1))  # gathered on the GPUs
        total = loader.subset.score.sum().reshape(1)
        both = [torch.zeros_like(total) for _ in range(2)]
        dist.all_gather(both, total)
        assert torch.equal(both[0], both[1])
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU here: the 2-rank NCCL group needs two")
def test_pinned_batches_from_worker_processes_free_their_buffers_and_stay_intact(tmp_path):
    """pin_memory=True: torch's pin thread copies each batch out of the worker's reused shared
    buffer (shm_ring frees it at once); 30 batches kept on the GPU equal the in-process pass."""
    from rela import Loader
    from rela.data.datasets import ImageFolder
    from tests.conftest import make_folder

    folder = ImageFolder(make_folder(tmp_path / "imgs", classes=2, per_class=30))
    kw = dict(image_size=16, views="eval", seed=4, drop_last=False)
    ref = list(Loader(folder, 2, num_workers=0, **kw))
    got = list(Loader(folder, 2, num_workers=2, device="cuda", pin_memory=True, backend="torch",
                      worker_type="process", **kw))
    assert len(got) == len(ref) == 30
    for a, b in zip(ref, got, strict=True):
        assert b["views"][0].device.type == "cuda"
        assert torch.equal(a["index"], b["index"].cpu()) and torch.equal(a["views"][0], b["views"][0].cpu())


def test_two_rank_nccl_group_keeps_the_scores_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(f"file://{tmp_path / 'rdv'}",), nprocs=2, join=True)
