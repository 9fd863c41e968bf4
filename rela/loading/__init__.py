"""The second floor: which samples (`subset`), which views (`views`: specs and their random
draws), and the `Loader` that hands batches to a training loop through one of its backends
(`backends`: torch, dali, ffcv behind one contract).

Imports from `rela.data` only, never from `rela.training`.
"""
