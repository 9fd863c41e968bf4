"""The third floor: ReLA-F training on top of the loader.

- `accelerate`: the `Accelerator` (transfer head, RELA loss, phase control), usable in any loop,
- `ssl`: the self-supervised methods it hands over to (BYOL),
- `models`: student backbones,
- `run`: what a run directory holds (config, checkpoints, logs) — shared by `train` and `evaluate`,
- `train`: the `rela train` loop, in named steps,
- `evaluate`: frozen-feature probes (linear, kNN) and `rela eval`.
"""
