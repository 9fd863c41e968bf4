"""Helpers shared by the benchmarks: what machine this is, and CPU time spent."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from rela._workers import cpu_seconds  # noqa: F401  (the benchmarks' CPU clock: rela's own)


def device_line() -> str:
    """'CPU only: <model>, <cores> cores, torch … with N intra-op threads, numpy …' (or the GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU only"
    return (f"{gpu}: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads, numpy {np.__version__}")


