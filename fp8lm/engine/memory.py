"""How much memory there is, and how much a piece of work takes at its peak (the profile forward
that sizes the KV cache)."""
from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return _proc_kib("/proc/meminfo", "MemAvailable:") * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: how far memory in use rose above
    its level at the start. CUDA: the caching allocator's peak. CPU: the process's resident peak
    (VmHWM, reset through /proc/self/clear_refs, after glibc's free heap went back to the system);
    where either is not possible the figure is a lower bound."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _give_back_free_heap()
            self._base = _proc_kib("/proc/self/status", "VmRSS:") * 1024
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                 # resets VmHWM to the current resident size
            except OSError as e:
                log.warning("cannot reset the resident-memory peak (%s): the profile's figure is a lower bound", e)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.empty_cache()             # else free memory reads the peak's blocks as taken
        else:
            peak = _proc_kib("/proc/self/status", "VmHWM:") * 1024
        self.bytes = max(0, peak - self._base)


# Measured (benchmarks/cpu_fp8.py, SmolLM2 FP8): the first 512-token prefill took 1.01 s against 0.77 s
# for the next one; with these thresholds set, 0.73 s the first time.
STEP_MMAP_THRESHOLD = 16 << 20
STEP_TRIM_THRESHOLD = 256 << 20


def keep_freed_memory_for_reuse() -> bool:
    """glibc maps every block above its mmap threshold (128 KiB at first, raised only as such blocks
    are freed) fresh from the system and unmaps it when freed, so each new tensor size of a step
    page-faults all its memory in again. Fixed thresholds keep a step's tensors up to 16 MiB in the
    heap for reuse by later steps; larger ones (a long prompt's masks and scores) are still mapped
    and returned, not left to fragment the heap (with a 256 MiB threshold a 7,000-token prompt once
    raised the peak by 543 MiB, past its test's 400 MiB bound). The process's setting; False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1          # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, STEP_MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, STEP_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _give_back_free_heap() -> None:
    """glibc keeps freed memory resident and hands it out again without a page fault, which the
    resident peak cannot see; malloc_trim returns it to the system first."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):         # not glibc: the figure is a lower bound
        pass


def _proc_kib(path: str, key: str) -> int:
    with open(path) as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])
