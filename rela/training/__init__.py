"""The third floor: ReLA-F training on top of the loader.

- `accelerate`: the `Accelerator` (transfer head, RELA loss, phase control), usable in any loop,
- `methods`: the self-supervised methods it hands over to (BYOL, SimCLR, MoCo, DINO, VICReg,
  Barlow Twins) and supervised training, one module each (student backbones: `rela.models`),
- `optim`, `precision`, `memory_format`: optimizers and schedules, autocast, channels_last,
- `lightning`: `LoaderState` and `RelaCallback` for Lightning code,
- `run`: what a run directory holds (config, checkpoints, logs) — shared by `train` and `evaluate`,
- `train`: the `rela train` loop, in named steps,
- `evaluate`: frozen-feature probes (linear, kNN) and `rela eval`.
"""
