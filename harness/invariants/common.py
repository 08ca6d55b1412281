"""What every check shares: the per-stage report, JSON-ready details, shape guards."""

from __future__ import annotations

import math

import torch

from harness.case import BIAS_FLOOR
from harness.findings import Finding

#: offending entries kept in a finding's details
MAX_ENTRIES = 4
#: the value the warp top-k kernel writes over a chosen expert (see harness.chain.gating): a
#: bias at or below it (or NaN) puts the case out of contract (`MoECase.contract_violations`)
MASK_VALUE = BIAS_FLOOR
#: the smallest normal fp32: renormalisation sums below it are implementation-defined
TINY = torch.finfo(torch.float32).tiny


class Malformed(Exception):
    """An output whose shape makes the stage's checks meaningless (-> 'output-shape')."""


def jsonable(x):
    """Tensors / numbers -> JSON-ready lists and scalars (non-finite floats as strings)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def first(mask: torch.Tensor) -> torch.Tensor:
    """The first MAX_ENTRIES indices (dim 0) where `mask` holds (anywhere in the row)."""
    if mask.dim() > 1:
        mask = mask.flatten(1).any(1)
    return torch.nonzero(mask)[:MAX_ENTRIES].squeeze(1)


def shape_of(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t`, or `Malformed` when it is not a tensor of exactly `shape`."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise Malformed(f"{name} has shape {got}, expected {tuple(shape)}")
    return t


def len_at_least(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """`t`, or `Malformed` when it is not a 1-D tensor of at least `n` entries."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < n:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise Malformed(f"{name} has shape {got}, expected 1-D with >= {n} entries")
    return t


class Report:
    """Collects findings of one stage, one per check (the first offence's details)."""

    def __init__(self, stage: str, severity: str, extra: dict | None = None) -> None:
        self.stage = stage
        self.severity = severity
        self.extra = extra or {}
        self.found: dict[str, Finding] = {}

    def add(self, check: str, message: str, **details) -> None:
        if check not in self.found:
            data = {**self.extra, **{k: jsonable(v) for k, v in details.items()}}
            self.found[check] = Finding(self.stage, check, message, self.severity, data)


def finite(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite for float tensors: |x| < inf is False exactly for NaN and +-Inf (one
    op cheaper than isfinite's composite on the small tensors checked per run)."""
    return x.abs() < math.inf
