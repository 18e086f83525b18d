"""Resident memory of this process, for the benchmarks' peak-memory columns (Linux /proc)."""

from __future__ import annotations

from pathlib import Path


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (writing 5 to /proc/self/clear_refs, Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
