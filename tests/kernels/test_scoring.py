"""Score-table update and weights: Triton (interpreted) and PyTorch paths vs a sequential reference."""

import pytest
import torch

import rela.kernels.scoring as sc
from rela.kernels.scoring import (
    inclusion_probabilities,
    loss_scale,
    scores_to_weights,
    update_scores,
    update_scores_reference,
)
from tests.conftest import spy_on_kernels


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("RELA_KERNELS", request.param)
    return request.param


def _table(n, seen_frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(n, generator=g) * 2
    seen = (torch.rand(n, generator=g) < seen_frac).to(torch.int8)
    return score, seen


@pytest.mark.parametrize("n,batch", [(10, 1), (50, 64), (3000, 2000)])
def test_update_matches_sequential_reference_with_duplicates(path, n, batch):
    score, seen = _table(n, seed=n)
    g = torch.Generator().manual_seed(batch)
    index = torch.randint(0, n, (batch,), generator=g)  # duplicates whenever batch is large
    index[: min(4, batch)] = index[0]                   # and certainly some here
    loss = torch.rand(batch, generator=g) * 3
    ref_score, ref_seen = update_scores_reference(score, seen, index, loss, momentum=0.8)
    s, z = score.clone(), seen.clone()
    update_scores(s, z, index, loss, momentum=0.8)
    torch.testing.assert_close(s.double(), ref_score, rtol=1e-5, atol=1e-6)
    assert torch.equal(z, ref_seen)
    # Untouched entries are left exactly as they were.
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(s[untouched], score[untouched])


def test_update_is_deterministic_and_paths_agree(monkeypatch):
    score, seen = _table(500)
    index = torch.randint(0, 500, (4000,), generator=torch.Generator().manual_seed(1))
    loss = torch.rand(4000, generator=torch.Generator().manual_seed(2))
    results = []
    for mode in ("triton", "triton", "torch"):
        monkeypatch.setenv("RELA_KERNELS", mode)
        s, z = score.clone(), seen.clone()
        update_scores(s, z, index, loss, momentum=0.9)
        results.append(s)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], results[2], rtol=1e-6, atol=1e-7)


def test_first_visit_initialises(path):
    score = torch.full((4,), 123.0)
    seen = torch.zeros(4, dtype=torch.int8)
    update_scores(score, seen, torch.tensor([2, 2]), torch.tensor([1.0, 3.0]), momentum=0.5)
    assert score[2].item() == pytest.approx(2.0)  # 1.0, then 0.5·1 + 0.5·3
    assert score[0].item() == 123.0 and seen.tolist() == [0, 0, 1, 0]


def test_update_refuses_bad_input(path):
    score, seen = _table(10)
    with pytest.raises(ValueError, match="NaN"):
        update_scores(score, seen, torch.tensor([1]), torch.tensor([float("nan")]))
    with pytest.raises(IndexError):
        update_scores(score, seen, torch.tensor([10]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="losses"):
        update_scores(score, seen, torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="float32"):
        update_scores(score.double(), seen, torch.tensor([1]), torch.tensor([1.0]))


def _weights_reference(score, seen, valid, temperature, floor):
    s = score.double()
    vis = s[seen != 0]
    z = (s - vis.mean()) / vis.std(unbiased=False) / temperature
    w = z.clamp(-30, 30).exp()
    w = torch.where(seen != 0, w, w[seen != 0].max())
    w = w.clamp_min(floor)
    return torch.where(valid, w, torch.zeros(()).double())


def test_weights_match_reference(path):
    score, seen = _table(5000, seed=4)
    valid = torch.rand(5000, generator=torch.Generator().manual_seed(5)) > 0.1
    w = scores_to_weights(score, seen, valid, temperature=0.5, floor=0.05)
    torch.testing.assert_close(w.double(), _weights_reference(score, seen, valid, 0.5, 0.05), rtol=1e-5, atol=1e-6)
    assert (w[~valid] == 0).all() and (w[valid] >= 0.05).all()
    # Higher score, higher weight (among visited samples above the floor).
    vis = (seen != 0) & valid
    order = torch.argsort(score[vis])
    assert (w[vis][order].diff() >= 0).all()


def test_weights_are_uniform_before_any_visit(path):
    score = torch.zeros(7)
    seen = torch.zeros(7, dtype=torch.int8)
    assert torch.equal(scores_to_weights(score, seen), torch.ones(7))


def test_weights_bad_arguments():
    score, seen = _table(5)
    with pytest.raises(ValueError, match="temperature"):
        scores_to_weights(score, seen, temperature=0)
    with pytest.raises(ValueError, match="floor"):
        scores_to_weights(score, seen, floor=0)


def test_inclusion_probabilities_and_unbiased_scale():
    w = torch.tensor([10.0, 1.0, 1.0, 1.0, 0.5, 0.0, 2.0, 1.0])
    k = 4
    pi = inclusion_probabilities(w, k)
    assert float(pi.sum()) == pytest.approx(k)
    assert pi[0] == 1.0 and pi[5] == 0.0 and (pi <= 1).all()
    scale = loss_scale(w, k)
    # E[(1/K) Σ_{i in S} scale_i·loss_i] = Σ π_i·scale_i·loss_i / K = mean loss over drawable samples.
    loss = torch.rand(8, dtype=torch.float64)
    drawable = w > 0
    expected = float((pi * scale.double() * loss).sum() / k)
    assert expected == pytest.approx(float(loss[drawable].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="cannot draw"):
        inclusion_probabilities(w, 8)


def test_scoring_triton_path_launches(monkeypatch):
    calls = spy_on_kernels(monkeypatch, sc, "_score_update_kernel", "_score_weights_kernel")
    monkeypatch.setenv("RELA_KERNELS", "auto")
    score, seen = _table(100)
    update_scores(score, seen, torch.tensor([1, 2, 2]), torch.tensor([0.1, 0.2, 0.3]))
    scores_to_weights(score, seen)
    assert len(calls) == 2
