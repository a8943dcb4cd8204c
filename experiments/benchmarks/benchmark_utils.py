"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, reports.

Imported by the scripts next to it (``python experiments/benchmarks/<name>.py`` puts this folder
on ``sys.path``). Peak memory: on CUDA the allocator's peak; on CPU the peak resident set of the
process, reset before each measurement where Linux allows it (``/proc/self/clear_refs``), else
the process-wide ``ru_maxrss``.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import machine_description  # noqa: F401 (re-exported for the benchmarks)

from drdm.utils.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings cover the work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], object], device: str | torch.device) -> tuple[float, object]:
    """``(seconds, result)`` of one call, synchronised on accelerators."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: str | torch.device) -> float:
    """Start a peak-memory measurement; returns the current usage in MiB (the baseline).

    CPU: trims the allocator's free memory (glibc), resets the peak resident set (Linux
    ``clear_refs`` 5) and returns the current one; without /proc the peak cannot be reset and
    ``ru_maxrss`` is returned.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    try:
        # hand memory that earlier work freed back to the OS (glibc), so that the resident set
        # at the start reflects live data and the peak's growth what the measured calls need
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        current = _status_kib("VmRSS")
        if current is not None:
            return current / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(device: str | torch.device) -> float:
    """Peak usage in MiB since :func:`reset_peak_memory` (subtract its baseline for growth)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _status_kib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024


def memory_note(device: str | torch.device) -> str:
    if torch.device(device).type == "cuda":
        return "peak memory: CUDA allocator peak during the measured calls (MiB)"
    return (
        "peak memory: growth of the process's peak resident set over the measured calls, the "
        "peak being reset before each configuration (MiB)"
    )


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list:
    """Markdown table lines; ``align``: one character per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_atomic(path: Path, text: str) -> None:
    """Write a report atomically and say where."""
    write_text_atomic(path, text)
    print(f"wrote {path}")


def command_line(script: str, argv) -> str:
    """The command that produced a report, without ``--output PATH`` (a machine's path)."""
    words, skip = [], False
    for word in argv or ():
        if skip:
            skip = False
        elif word == "--output":
            skip = True
        elif not word.startswith("--output="):
            words.append(word)
    return " ".join(["python", f"experiments/benchmarks/{script}", *words])
