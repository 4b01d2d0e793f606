"""What the tools in bench/ share: the repository on sys.path (importing this module puts it there, so a
tool runs as `python bench/TOOL.py` from anywhere), wall-clock timing that waits for the GPU, and the
kernel's view of this process's memory."""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def sync(device=None):
    """Wait for the GPU's queued work (a no-op on a CPU)."""
    if (device is None and torch.cuda.is_available()) or getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def timed(fn, device=None):
    """(seconds, fn()) with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def proc_status(key):
    """One field of /proc/self/status in bytes ("VmRSS", "VmHWM", "RssAnon", "RssFile", ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)
