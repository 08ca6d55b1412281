"""Backends: implementations of the chain's stages (`Target`) the runner drives."""

from __future__ import annotations

from collections.abc import Sequence

from harness.chain.target import Target
from harness.errors import BackendUnavailable, ConfigError

BACKENDS = ("cpu", "cuda")


def get_target(name: str, graph: bool = False,
               capture_sizes: Sequence[int] | None = None, coverage: bool = True,
               checks: bool = True) -> Target:
    """The backend called `name` ("cpu" or "cuda"); `BackendUnavailable` if it cannot run.

    `graph=True` (cuda only): the chain replayed as CUDA graphs per capture size
    (`cuda_graph.GraphTarget`; `capture_sizes` default 1, 2, 4, ... 512). `coverage` and
    `checks` switch the cuda kernels' coverage counters and their redzones and poison; the CPU
    model has no counters to switch off and always checks its buffers."""
    if graph or capture_sizes is not None:
        if name != "cuda":
            raise ConfigError("graph", f"CUDA-graph mode needs the cuda backend, not '{name}'")
        try:
            from harness.backends.cuda_graph import DEFAULT_CAPTURE_SIZES, GraphTarget
        except ImportError as exc:
            raise BackendUnavailable(f"the cuda backend is not available: {exc}") from None
        return GraphTarget(DEFAULT_CAPTURE_SIZES if capture_sizes is None else capture_sizes,
                           coverage=coverage, checks=checks)
    if name == "cpu":
        from harness.backends.cpu import CpuTarget
        return CpuTarget()
    if name == "cuda":
        try:
            from harness.backends.cuda import CudaTarget
        except ImportError as exc:
            raise BackendUnavailable(f"the cuda backend is not available: {exc}") from None
        return CudaTarget(coverage=coverage, checks=checks)
    raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Target", "get_target"]
