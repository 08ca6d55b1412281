"""Backends: implementations of the chain's stages (`Target`) the runner drives."""

from __future__ import annotations

from harness.backends.target import Target
from harness.errors import BackendUnavailable

BACKENDS = ("cpu", "cuda")


def get_target(name: str) -> Target:
    """The backend called `name` ("cpu" or "cuda"); `BackendUnavailable` if it cannot run."""
    if name == "cpu":
        from harness.backends.cpu import CpuTarget
        return CpuTarget()
    if name == "cuda":
        try:
            from harness.backends.cuda import CudaTarget
        except ImportError as exc:
            raise BackendUnavailable(f"the cuda backend is not available: {exc}") from None
        return CudaTarget()
    raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Target", "get_target"]
