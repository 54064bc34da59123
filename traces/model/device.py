"""Where a real model runs: ``--device`` and ``--threads``, checked once for every command.

Every command that loads a model (capture, calibrate, generate, validate, the benchmarks) goes
through :func:`~memshare.traces.model.loader.load_model`, which calls :func:`check_device` and
:func:`resolve_threads` before it loads anything, so a bad device or thread count is one
line naming the option, never a torch traceback. torch is imported lazily.
"""

from __future__ import annotations

import os

from memshare.errors import InputError

MAX_THREADS = 1024


def check_device(device: str) -> None:
    """``--device``: ``cpu``, or ``cuda`` / ``cuda:N`` where torch sees that CUDA device."""
    if device == "cpu":
        return
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise InputError("--device", f"unknown device {device!r}", "use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise InputError("--device", "cuda was asked for but torch sees no CUDA device", "use cpu")
    count = int(torch.cuda.device_count())
    if colon and int(index) >= count:
        raise InputError(
            "--device",
            f"{device} asked for, but torch sees {count} CUDA device(s)",
            f"use cuda:0 .. cuda:{count - 1}",
        )


def resolve_threads(threads: int | None) -> int | None:
    """Torch CPU threads: ``--threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    ``None`` (torch's own default: one per physical core)."""
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise InputError(
                "--threads", f"must be 1 .. {MAX_THREADS}, got {threads}", "e.g. --threads 2"
            )
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not env:
        return None
    if not env.isdigit() or not 1 <= int(env) <= MAX_THREADS:
        raise InputError(
            "OMP_NUM_THREADS",
            f"{env!r} is not a thread count (1 .. {MAX_THREADS})",
            "unset it or pass --threads N",
        )
    return int(env)


def free_bytes(device: str) -> int | None:
    """Memory this process could still allocate on ``device`` (``cpu``: the kernel's
    MemAvailable; ``cuda``: the driver's free memory), or None when it cannot be told."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
