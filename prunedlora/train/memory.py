"""Memory probes for ``metrics.jsonl`` and ``summary.json``: CUDA allocator statistics on GPU, the process's
resident set on CPU (Linux ``/proc``; ``getrusage`` elsewhere)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _proc_status_mb(field: str) -> float | None:
    """``VmHWM`` / ``VmRSS`` of this process from ``/proc/self/status`` in MiB (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of the process on CPU, both since the last
    :func:`reset_peak_memory` (on CPU: since process start where ``/proc/self/clear_refs`` is unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def resident_memory_mb(device: torch.device) -> float | None:
    """CUDA memory allocated now, or the process's resident set now (CPU, Linux)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _proc_status_mb("VmRSS")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: training memory is then measured without the model-loading spikes before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current VmRSS
    except OSError:
        pass
