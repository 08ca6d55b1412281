from __future__ import annotations

import torch

from harness.case import Fault
from harness.chain.faults import apply_fault, fault_rows


def test_rows_modulo_and_fraction():
    assert fault_rows(Fault(rows=(1, 5, 9)), 4).tolist() == [1]
    rows = fault_rows(Fault(rows=(), fraction=0.5, seed=3), 10)
    assert rows.numel() == 5 and rows.unique().numel() == 5
    assert fault_rows(Fault(), 0).numel() == 0


def test_each_kind_changes_exactly_its_rows():
    ids = torch.arange(12, dtype=torch.int32).view(4, 3)
    w = torch.ones(4, 3)
    f = lambda kind, **kw: Fault("gating", "topk_ids", kind, rows=(2,), **kw)  # noqa: E731
    assert apply_fault(ids, f("drop"))[2].tolist() == [-1, -1, -1]
    assert apply_fault(ids, f("duplicate"))[2].tolist() == [6, 6, 6]
    assert apply_fault(ids, f("stale"))[2].tolist() == [9, 10, 11]
    assert apply_fault(ids, f("zero_rows"))[2].tolist() == [0, 0, 0]
    assert apply_fault(ids, f("bitflip", bit=4))[2].tolist() == [6 ^ 16, 7 ^ 16, 8 ^ 16]
    assert apply_fault(ids, f("garbage"))[2].tolist() != [6, 7, 8]
    assert torch.isnan(apply_fault(w, f("nan"))[2]).all()
    assert torch.isinf(apply_fault(w, f("inf"))[2]).all()
    for kind in ("drop", "duplicate", "stale", "zero_rows", "bitflip", "garbage"):
        out = apply_fault(ids, f(kind))
        assert torch.equal(out[[0, 1, 3]], ids[[0, 1, 3]]), kind
    assert torch.equal(ids, torch.arange(12, dtype=torch.int32).view(4, 3))  # input untouched


def test_one_dimensional_duplicate_repeats_previous_row():
    x = torch.tensor([5, 6, 7], dtype=torch.int32)
    assert apply_fault(x, Fault("dispatch", "recv_counters", "duplicate", rows=(2,))).tolist() \
        == [5, 6, 6]
