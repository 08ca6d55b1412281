"""Applying a case's `Fault`s to the tensors a stage produced (see `harness.case.Fault`)."""

from __future__ import annotations

import torch

from harness.case import Fault, generator
from harness.memory import bits_view


def fault_rows(fault: Fault, num_rows: int) -> torch.Tensor:
    """The rows (int64) a fault corrupts, within 0..num_rows-1."""
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.long)
    if fault.rows:
        return torch.unique(torch.tensor(fault.rows, dtype=torch.long) % num_rows)
    count = max(1, round(fault.fraction * num_rows))
    g = generator(fault.seed, "fault-rows")
    return torch.sort(torch.randperm(num_rows, generator=g)[:count]).values


def apply_fault(t: torch.Tensor, fault: Fault, cases: int = 1) -> torch.Tensor:
    """A corrupted copy of `t`; rows are dimension 0 of the tensor viewed as [rows, last dim].
    `cases` > 1: `t` stacks that many same-shape tensors along dimension 0
    (`harness.chain.stacked`), each corrupted as it would be alone."""
    out = t.clone()
    width = out.shape[-1] if out.dim() >= 2 else 1
    view = out.view(cases, -1, width)
    n = view.shape[1]
    rows = fault_rows(fault, n)
    if rows.numel() == 0:
        return out
    is_float = out.is_floating_point()
    kind = fault.kind
    if kind in ("nan", "inf"):
        view[:, rows] = float(kind)
    elif kind == "bitflip":
        bits = bits_view(view[:, rows])
        view[:, rows] = (bits ^ (1 << (fault.bit % (8 * out.element_size())))).view(out.dtype)
    elif kind == "garbage":
        g = generator(fault.seed, "fault-garbage")
        if is_float:
            view[:, rows] = (torch.randn((rows.numel(), width), generator=g) * 1e3).to(out.dtype)
        else:
            view[:, rows] = torch.randint(-2**31, 2**31 - 1, (rows.numel(), width), generator=g,
                                          dtype=torch.int64).to(out.dtype)
    elif kind == "stale":
        view[:, rows] = t.reshape(cases, n, width)[:, (rows + 1) % n]
    elif kind == "zero_rows":
        view[:, rows] = 0
    elif kind == "drop":
        view[:, rows] = 0 if is_float else -1
    elif kind == "duplicate":
        if width > 1:
            view[:, rows] = view[:, rows][..., :1].expand(-1, -1, width)
        else:
            view[:, rows] = t.reshape(cases, n, width)[:, (rows - 1) % n]
    return out
