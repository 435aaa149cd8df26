"""Process settings that make CPU training fast: threads and the memory allocator.

The allocator matters more than it looks. Every training step allocates the same few hundred
MB of activations and gradients; glibc hands blocks over 32 MB straight to the kernel (mmap)
and returns them on free (munmap), so each step faults in every page afresh and the kernel
zeroes it first. On this 2-core machine that made a ReLU over the first feature map 4x slower
than the arithmetic needs, and the seed CNN's step ~1.5x slower overall. Keeping freed memory
in the heap (no mmap, no trimming) lets the next step reuse warm pages. The cost: the process
keeps its peak footprint until it exits, which training reaches in its first step anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from the heap and never give it back to the OS.

    Returns whether it took effect (False off Linux/glibc, where it is simply skipped).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_threads(requested: int) -> int:
    """Intra-op threads for this process: `requested`, or the cores shared among the local
    processes torchrun started (LOCAL_WORLD_SIZE)."""
    if requested:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local)


def configure_cpu(threads: int, reuse_memory: bool) -> None:
    torch.set_num_threads(cpu_threads(threads))
    if reuse_memory:
        keep_freed_memory()
