"""Fused Triton kernels, shipped as `rela.kernels` (the RELA loss and subset scoring land here)."""
