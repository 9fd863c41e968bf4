"""The student's memory format, guarded against a oneDNN bug that channels_last meets on CPUs.

oneDNN issue #6035 (open): on its AVX2 (and AVX) kernels, the weight gradient of a 1×1
convolution with stride > 1 in channels_last writes past its workspace when the convolution has
fewer input channels than the kernel's block (8 there). With one thread that is heap corruption
(SIGABRT/SIGSEGV), with more a hang or silently wrong weight gradients. Measured on an AMD EPYC
with `ONEDNN_MAX_CPU_ISA=AVX2`, torch 2.14.1: input channels 1–7 fail, 8 and more pass; stride 1
and 3×3 convolutions pass. A ResNet's first downsample shortcut at width 1/16 is exactly such a
convolution (4 → 8 channels). AVX-512 hosts take another kernel, but a job may move between hosts
and which kernel oneDNN picks can't be read from Python, so the guard applies on every CPU.

Choice: such a model runs contiguous (NCHW) with a one-line warning instead of being refused.
channels_last is a speed setting, not a semantic one — the same run computes the same
function either way — and on the CPU it buys little; a GPU configuration smoke-tested on a CPU
(or a torchrun job, which sets one thread per rank) should run, not fail. GPUs use cuDNN and are
not affected: there channels_last is kept.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rela.errors import RelaWarning

ONEDNN_ISSUE = "oneDNN issue #6035"
MIN_CHANNELS = 8  # oneDNN's channel block on AVX2: fewer input channels than this trigger the bug


def onednn_hazards(model: nn.Module) -> list[str]:
    """Names of the convolutions in `model` that oneDNN #6035 breaks in channels_last on a CPU:
    1×1 kernels with a stride above 1 and fewer than 8 input channels per group."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1 \
                and m.in_channels // m.groups < MIN_CHANNELS:
            bad.append(name or type(m).__name__)
    return bad


def student_memory_format(model: nn.Module, device: torch.device | str, channels_last: bool) -> torch.memory_format:
    """The memory format to train `model` in on `device`: channels_last when asked for, unless the
    device is a CPU and the model holds a convolution oneDNN #6035 breaks there (then contiguous,
    with a warning that says what and why). The loader's views must use the same format: a
    channels_last input alone makes oneDNN pick channels_last for the whole network."""
    if not channels_last:
        return torch.contiguous_format
    if torch.device(device).type != "cpu":
        return torch.channels_last
    bad = onednn_hazards(model)
    if not bad:
        return torch.channels_last
    warnings.warn(
        f"channels_last is off for this run: on a CPU, oneDNN computes wrong gradients or crashes for a 1x1 "
        f"strided convolution with fewer than {MIN_CHANNELS} input channels in channels_last ({ONEDNN_ISSUE}); "
        f"this student has {len(bad)} ({bad[0]}{', ...' if len(bad) > 1 else ''}). Training runs contiguous "
        f"(same results). To keep channels_last on a CPU, widen the student (e.g. --width 0.125)",
        RelaWarning, stacklevel=2)
    return torch.contiguous_format


def compile_options(model: nn.Module, device: torch.device | str) -> dict:
    """Inductor options for `torch.compile` of `model` on `device`. Inductor turns convolutions
    channels_last by itself when it judges that faster (its `layout_optimization`), which meets
    oneDNN #6035 on a CPU although the run asked for no channels_last (measured: `--compile` of
    the width-1/16 student aborts under `ONEDNN_MAX_CPU_ISA=AVX2`). For a model holding such a
    convolution on a CPU that optimisation is off; everywhere else Inductor decides."""
    if torch.device(device).type == "cpu" and onednn_hazards(model):
        return {"layout_optimization": False}
    return {}
