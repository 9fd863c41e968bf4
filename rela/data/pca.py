"""Streaming PCA whitening in bounded memory.

Mean and covariance are accumulated in float64 over chunks with Chan et al.'s pairwise update
(each chunk is centred on its own mean before its scatter matrix is added), which avoids the
cancellation of the textbook sum-of-squares formula. Memory does not depend on N:

    state   = 8·D (mean) + 8·D² (scatter)                 bytes
    per chunk ≈ 4·C·D (float32 rows) + 8·C·D (centred float64 copy) bytes
    eigh    ≈ 16·D² bytes (copy + eigenvectors)

For D = 2048, C = 8192: 34 MB state + 200 MB per chunk + 67 MB for eigh ≈ 0.3 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StreamingMoments:
    """Running mean and scatter matrix (sum of outer products of centred rows), float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    @classmethod
    def of(cls, x: np.ndarray) -> StreamingMoments:
        """The moments of one chunk of rows: its mean and centred scatter, float64."""
        m = cls(x.shape[1])
        if len(x) == 0:
            return m
        xc = np.array(x, dtype=np.float64)  # a private float64 copy, centred in place
        m.n = len(xc)
        m.mean = xc.mean(axis=0)
        xc -= m.mean
        m.scatter = xc.T @ xc  # numpy runs this as a symmetric rank-k update (syrk)
        return m

    def update(self, x: np.ndarray) -> None:
        """Fold in a chunk of rows. Exactly `merge(of(x))`: a sharded conversion computes `of` on
        each rank and merges in chunk order, and gets the same bits as one process."""
        self.merge(StreamingMoments.of(x))

    def merge(self, other: StreamingMoments) -> None:
        """Fold in moments from another shard (same pairwise formula)."""
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.scatter += other.scatter + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean += delta * (other.n / n)
        self.n = n

    def pack(self) -> np.ndarray:
        """[n, mean, scatter] as one float64 vector (n < 2**53 is exact), for collectives."""
        return np.concatenate([[float(self.n)], self.mean, self.scatter.ravel()])

    @classmethod
    def unpack(cls, packed: np.ndarray, dim: int) -> StreamingMoments:
        m = cls(dim)
        m.n = int(packed[0])
        m.mean = np.array(packed[1:1 + dim])
        m.scatter = np.array(packed[1 + dim:]).reshape(dim, dim)
        return m

    def covariance(self) -> np.ndarray:
        """Population covariance (divides by n): whitened targets then have unit variance."""
        if self.n == 0:
            raise ValueError("no rows were accumulated")
        return self.scatter / self.n


@dataclass
class Whitening:
    """z = ((x - mean) @ components.T) / scale: the top `d` principal axes, each scaled to unit variance."""

    mean: np.ndarray  # [D] float32
    components: np.ndarray  # [d, D] float32, rows are unit eigenvectors, largest variance first
    eigenvalues: np.ndarray  # [d] float64, variance along each component
    scale: np.ndarray  # [d] float32, sqrt(eigenvalue + eps)
    eps: float
    total_variance: float

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.eigenvalues.sum() / self.total_variance) if self.total_variance > 0 else 0.0

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return ((x - self.mean) @ self.components.T) / self.scale

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "eigenvalues": self.eigenvalues.astype(np.float32),
        }


def fit_whitening(moments: StreamingMoments, dim: int, rel_eps: float = 1e-6) -> Whitening:
    """Eigendecompose the covariance and keep the top `dim` axes.

    The epsilon is relative to the largest eigenvalue (plus a tiny absolute floor), so components
    with (numerically) zero variance come out as zeros instead of inf/NaN.
    """
    cov = moments.covariance()
    D = cov.shape[0]
    if not 1 <= dim <= D:
        raise ValueError(f"dim must be in [1, {D}], got {dim}")
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1][:dim]
    evals = np.clip(evals[order], 0.0, None)
    comps = evecs[:, order].T.copy()  # [dim, D]
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    pivot = np.abs(comps).argmax(axis=1)
    signs = np.sign(comps[np.arange(dim), pivot])
    signs[signs == 0] = 1.0
    comps *= signs[:, None]
    eps = rel_eps * max(float(evals[0]) if dim else 0.0, 0.0) + 1e-12
    scale = np.sqrt(evals + eps)
    return Whitening(
        mean=moments.mean.astype(np.float32),
        components=comps.astype(np.float32),
        eigenvalues=evals,
        scale=scale.astype(np.float32),
        eps=eps,
        total_variance=float(np.trace(cov)),
    )
