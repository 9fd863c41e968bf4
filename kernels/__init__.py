"""Fused Triton kernels, shipped as `rela.kernels`.

- `rela.kernels.rela_loss`: the RELA target-matching loss (1 − cosine), forward and backward.
- `rela.kernels.scoring`: the per-sample score table and sampling weights for scored subsets.

Each op runs its Triton kernel on CUDA tensors (or on CPU under TRITON_INTERPRET=1) and a plain
PyTorch path otherwise; see `rela.kernels._dispatch`. triton itself is optional.
"""
