"""ReLA-D, the first floor of the data flow: datasets → prior → PCA whitening → target store.

- `datasets`: map-style datasets with a stable order and a fingerprint,
- `priors`: the frozen encoders (a registry of builders, each returning a `Prior`),
- `pca`: streaming float64 moments and the whitening fitted from them,
- `store`: the on-disk target store and its writer,
- `convert`: the resumable, shardable conversion that ties them together.

Nothing here imports from `rela.loading` or `rela.training` (tests/test_layout.py checks it).
"""
