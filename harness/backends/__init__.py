"""Backends: implementations of the chain's stages (`Target`) the runner drives, and the one
place a target spec ("cpu", "cuda" or a user's "module:attr") becomes a `Target`.

Light to import (torch comes with the first target built): the pytest plugin asks
`target_traits` at start-up."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from harness.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from harness.chain.target import Target

BACKENDS = ("cpu", "cuda")
#: each bundled backend's `Target.isolate` (a test holds it to the classes)
_ISOLATE = {"cpu": False, "cuda": True}


def _builtin_class(name: str, graph: bool) -> type[Target]:
    if name == "cpu":
        from harness.backends.cpu import CpuTarget
        return CpuTarget
    try:
        if graph:
            from harness.backends.cuda_graph import GraphTarget
            return GraphTarget
        from harness.backends.cuda import CudaTarget
        return CudaTarget
    except ImportError as exc:
        raise BackendUnavailable(f"the cuda backend is not available: {exc}") from None


def _lookup(spec: str) -> Any:
    """What a "module:attr" spec names (a `Target` instance, a `Target` class or a factory
    returning one), imported; `BackendUnavailable` naming the problem otherwise."""
    module, sep, attr = spec.partition(":")
    if not sep:
        raise BackendUnavailable(f"unknown backend '{spec}': expected {', '.join(BACKENDS)} "
                                 "or module:attr")
    if not module or not attr:
        raise BackendUnavailable(f"target '{spec}': expected {', '.join(BACKENDS)} or "
                                 "module:attr")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"target '{spec}': cannot import {module}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BackendUnavailable(f"target '{spec}': {module} has no attribute {attr}")
        obj = getattr(obj, part)
    return obj


def _instance(spec: str, obj: Any) -> Target:
    from harness.chain.target import Target

    if not isinstance(obj, Target):
        obj = obj() if callable(obj) else obj
    if not isinstance(obj, Target):
        raise BackendUnavailable(f"target '{spec}' is a {type(obj).__name__}, not a "
                                 "harness.backends.Target")
    return obj


def resolve_target(spec: str, *, graph: bool = False, coverage: bool = True,
                   checks: bool = True, capture_sizes: Sequence[int] | None = None) -> Target:
    """The `Target` a spec names, ready to run: "cpu" (the CPU model), "cuda" (the bundled
    kernels, built on first use) or "module:attr" (a user's `Target` instance, class or
    factory, imported). `BackendUnavailable` if it cannot run here.

    `graph=True` (cuda only): the chain replayed as CUDA graphs per capture size
    (`cuda_graph.GraphTarget`; `capture_sizes` default 1, 2, 4, ... 512). `coverage` and
    `checks` switch the cuda kernels' coverage counters and their redzones and poison; the CPU
    model has no counters to switch off and always checks its buffers. Callers resolve once
    and pass the `Target` on."""
    graph = graph or capture_sizes is not None
    if spec not in BACKENDS:
        if graph:
            raise ConfigError("graph", f"CUDA-graph mode needs the cuda backend, not '{spec}'")
        return _instance(spec, _lookup(spec))
    if graph and spec != "cuda":
        raise ConfigError("graph", f"CUDA-graph mode needs the cuda backend, not '{spec}'")
    cls = _builtin_class(spec, graph)
    if spec == "cpu":
        return cls()
    if graph:
        from harness.backends.cuda_graph import DEFAULT_CAPTURE_SIZES

        return cls(DEFAULT_CAPTURE_SIZES if capture_sizes is None else capture_sizes,
                   coverage=coverage, checks=checks)
    return cls(coverage=coverage, checks=checks)


def target_traits(spec: str) -> tuple[str, bool]:
    """(name, isolate) of the target `spec` names, without building a bundled backend: what
    a parent process needs to decide how to run a target its children will resolve. A user's
    factory function is called to learn them; a class or instance is read."""
    from harness.chain.target import Target

    if spec in BACKENDS:
        return spec, _ISOLATE[spec]
    obj = _lookup(spec)
    if isinstance(obj, type) and issubclass(obj, Target):
        return obj.name, bool(obj.isolate)
    target = _instance(spec, obj)
    return target.name, bool(target.isolate)


def __getattr__(name: str) -> Any:
    if name == "Target":  # re-exported on first use (PEP 562): keeps this module light
        from harness.chain.target import Target

        return Target
    raise AttributeError(f"module 'harness.backends' has no attribute {name!r}")


__all__ = ["BACKENDS", "Target", "resolve_target", "target_traits"]
