"""What a gradient step keeps in memory: bytes saved for backward (total and live peak) and process RSS."""
from __future__ import annotations

import os
import resource
import weakref
from typing import Callable

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux: writing 5 to /proc/self/clear_refs). Needed because a child
    started by fork + exec inherits the parent's ru_maxrss: a bench that already ran every method in the parent
    would otherwise report the parent's peak for each of them."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS since the last reset: VmHWM from /proc/self/status, else ru_maxrss (kB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_bytes(fn: Callable[[], torch.Tensor], exclude=()) -> int:
    """Bytes autograd saves for backward while running fn (each storage view once; `exclude`d tensors'
    storages, e.g. the parameters, left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key[0] not in skip and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total[0]


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def peak_saved_bytes(fn, exclude=()) -> int:
    """The peak, while fn() runs, of the bytes of tensors autograd holds for backward (each storage counted once,
    `exclude`d storages such as the parameters left out); a saved tensor counts until its graph is released."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    live, now, peak = {}, [0], [0]

    def release(ptr):
        live[ptr][0] -= 1
        if live[ptr][0] == 0:
            now[0] -= live.pop(ptr)[1]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in skip:
            return t
        if ptr not in live:
            live[ptr] = [0, t.untyped_storage().nbytes()]
            now[0] += live[ptr][1]
            peak[0] = max(peak[0], now[0])
        live[ptr][0] += 1
        holder = _Saved(t.detach())  # detached: a saved output holding its own grad_fn would be a C++ cycle (a leak)
        weakref.finalize(holder, release, ptr)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t if isinstance(h, _Saved) else h):
        out = fn()
    del out
    return peak[0]
