from __future__ import annotations

import pytest
import torch

from harness.errors import IllegalAccess
from harness.memory import CheckedBuffer, is_poison, poison_like


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float16, torch.bfloat16])
def test_poison_round_trip(dtype):
    p = poison_like((3, 4), dtype)
    assert is_poison(p).all()
    assert not is_poison(torch.zeros(3, dtype=dtype)).any()
    if dtype.is_floating_point:
        assert torch.isnan(p.float()).all()  # poison propagates as NaN


def test_checked_reads_and_writes():
    buf = CheckedBuffer("stage", "buf", 4, torch.int32)
    buf.write(torch.tensor([0, 3]), torch.tensor([7, 9]))
    assert buf.read(torch.tensor([3, 0])).tolist() == [9, 7]
    for bad in ([4], [-1], [0, 100]):
        with pytest.raises(IllegalAccess) as exc:
            buf.read(torch.tensor(bad))
        assert exc.value.buffer == "buf" and exc.value.stage == "stage"
        with pytest.raises(IllegalAccess):
            buf.write(torch.tensor(bad), 1)
    with pytest.raises(IllegalAccess, match="uninitialized"):
        buf.read(torch.tensor([1]), initialized=True)
    assert buf.read(torch.tensor([1])).tolist() == [poison_like(1, torch.int32).item()]
