"""What a result was measured on: one line describing the machine, for results files and logs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of ``/proc/cpuinfo`` (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str] | None:
    """The CPU's native bf16 instruction sets (``avx512_bf16``, ``amx_bf16``); None if unknown.

    Without them torch runs bf16 arithmetic on the CPU emulated, far slower than fp32.
    """
    flags = _cpuinfo_field("flags")
    if flags is None:
        return None
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags.split()]


def machine_description(device: str | torch.device | None = None) -> str:
    """One line: GPU (when ``device`` is CUDA), CPU model, cores, torch threads, load, versions."""
    parts = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, torch threads "
        f"{torch.get_num_threads()}",
        f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}",
    ]
    if device is not None and torch.device(device).type == "cuda":
        parts.insert(0, f"GPU: {torch.cuda.get_device_name()}")
    return "; ".join(parts)
