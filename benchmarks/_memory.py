"""Peak memory of one call.

CUDA: max_memory_allocated() minus the allocation before the call. CPU: the allocator keeps no peak, so the
resident-set high-water mark is used: free heap is returned to the OS (malloc_trim), /proc/self/clear_refs resets
VmHWM to the current RSS, glibc's mmap threshold is lowered to 64 KiB for the measured call (every sizeable buffer is
a fresh mapping that counts while alive), and VmHWM - VmRSS(before) is the call's peak extra memory, outputs
included. Outside that call the threshold stays at glibc's ceiling (32 MiB), where its dynamic threshold ends up in
any long-running process, so every provider is timed under the same allocator settings.
"""

from __future__ import annotations

import ctypes
import re
import time
from typing import Any
from typing import Callable

import torch

MiB = 1 << 20


class _Malloc:
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    STEADY_MMAP, PROBE_MMAP = 32 * MiB, 64 * 1024

    def __init__(self):
        self.libc, self.method = None, "none"
        try:
            libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.status()
            self.libc, self.method = libc, "rss_hwm"
        except (OSError, AttributeError, ValueError):
            pass

    @staticmethod
    def status() -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        with open("/proc/self/status") as f:
            text = f.read()
        return tuple(int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))

    def steady(self) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.STEADY_MMAP)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 2 * self.STEADY_MMAP)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int | None, int | None, float]:
        """(result, peak extra bytes, absolute peak RSS bytes, seconds) of one call (None, None without the probe)."""
        if self.libc is None:
            start = time.perf_counter()
            out = fn()
            return out, None, None, time.perf_counter() - start
        self.libc.mallopt(self.M_MMAP_THRESHOLD, self.PROBE_MMAP)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, self.PROBE_MMAP)
        self.libc.malloc_trim(0)  # else allocations served from retained heap pages would not raise the RSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM <- VmRSS
            before, _ = self.status()
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            _, hwm = self.status()
        finally:
            self.steady()
        return out, max(0, hwm - before), hwm, seconds


MALLOC = _Malloc()


def measure_call(fn: Callable[[], Any], device: str) -> tuple[Any, int | None, int | None, float]:
    """Run fn once: (result, peak extra bytes, absolute peak bytes (CPU RSS / CUDA allocated), seconds)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return out, peak - base, peak, time.perf_counter() - start
    return MALLOC.measure(fn)
