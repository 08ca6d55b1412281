"""Choosing a GPU per process: spread parallel workers over the GPUs with the most free memory.

`pytest -n auto` starts several workers; each pins itself to one GPU before anything touches
CUDA (by `CUDA_VISIBLE_DEVICES`, which the isolated children inherit). The GPUs are ranked by
free memory (NVML, via nvidia-ml-py, imported only here and only when asked), and worker i
takes the i-th of that ranking, round-robin, so N workers on N GPUs get one each and the
emptiest GPU is used first. Without NVML (no driver, no package) nothing is pinned: the
default device is used, as without this module.

Indices are NVML's (PCI bus order); pinning sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that CUDA
numbers the GPUs the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from harness.errors import HarnessError


def parse_gpu_list(text: str) -> list[int]:
    """ "0,1" -> [0, 1]; `HarnessError` for anything but non-negative integers."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise HarnessError(f"GPU list {text!r}: expected indices like 0,1 (got {part!r})")
        if int(part) not in out:
            out.append(int(part))
    if not out:
        raise HarnessError(f"GPU list {text!r} is empty")
    return out


def free_memory(nvml: Any = None) -> dict[int, int] | None:
    """Free bytes per GPU index, from NVML; None where NVML cannot be used (no package, no
    driver, no GPU). `nvml`: a stand-in for the `pynvml` module (tests)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no usable GPU
        return None
    try:
        return {i: int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).free)
                for i in range(nvml.nvmlDeviceGetCount())}
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def rank_gpus(free: dict[int, int], candidates: Sequence[int] | None = None) -> list[int]:
    """The candidate GPUs (default: all) present in `free`, most free memory first, ties by
    index."""
    pool = [i for i in (candidates if candidates is not None else sorted(free)) if i in free]
    return sorted(pool, key=lambda i: (-free[i], i))


def choose_gpu(worker_index: int, candidates: Sequence[int] | None = None,
               nvml: Any = None) -> int | None:
    """The GPU worker `worker_index` should use, or None (no NVML, or no candidate exists)."""
    free = free_memory(nvml)
    if not free:
        return None
    ranked = rank_gpus(free, candidates)
    return ranked[worker_index % len(ranked)] if ranked else None


def visible_candidates(env: dict[str, str] | None = None) -> list[int] | None:
    """The GPU indices `CUDA_VISIBLE_DEVICES` already restricts this process to (None: not set,
    or not plain indices, e.g. UUIDs: then it is left alone)."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if not value.strip():
        return []  # no GPU at all
    try:
        return parse_gpu_list(value)
    except HarnessError:
        return None


def pin(gpu: int, env: dict[str, str] | None = None) -> None:
    """Make `gpu` (an NVML index) the only GPU this process and its children see."""
    env = os.environ if env is None else env
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = str(gpu)


def select_gpus(spec: str, nvml: Any = None) -> list[int]:
    """The GPUs a campaign's workers use: "all" (every GPU NVML sees, most free memory first)
    or a list like "0,2" (checked against what NVML sees). `HarnessError` when NVML sees no
    GPU or a listed index does not exist."""
    free = free_memory(nvml)
    if not free:
        raise HarnessError(f"--gpus {spec}: NVML sees no GPU here (no driver, no nvidia-ml-py, "
                           "or no device)")
    if spec == "all":
        return rank_gpus(free)
    wanted = parse_gpu_list(spec)
    missing = [i for i in wanted if i not in free]
    if missing:
        raise HarnessError(f"--gpus {spec}: no GPU {missing[0]} (NVML sees "
                           f"{', '.join(map(str, sorted(free)))})")
    return wanted


def usage(indices: Sequence[int], nvml: Any = None) -> dict[int, dict[str, float]] | None:
    """Utilisation (%) and memory used/total (MB) of each GPU of `indices`, from NVML; None
    where NVML cannot be used. A GPU NVML cannot read is left out."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    out: dict[int, dict[str, float]] = {}
    try:
        for i in indices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception:
                continue
            out[i] = {"util_pct": float(rates.gpu), "mem_used_mb": round(mem.used / 2**20, 1),
                      "mem_total_mb": round(mem.total / 2**20, 1)}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return out
