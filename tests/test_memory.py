from __future__ import annotations

import math

import pytest
import torch

from harness.errors import IllegalAccess
from harness.memory import (
    CheckedBuffer,
    current_poison,
    guarded,
    is_poison,
    poison_bits,
    poison_like,
    poison_pattern,
    vary_poison,
)


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


def test_poison_family_trips_range_and_finiteness_checks():
    """Every word of the family: an int32 far outside [-1, E) (positive: never a -1 or
    -2 - rank sentinel), a quiet NaN in every float dtype, and is_poison knows them all."""
    words = {poison_pattern(seed) for seed in range(200)}
    assert len(words) > 100  # varied per run
    for word in words:
        i32 = torch.tensor([word], dtype=torch.int64).to(torch.int32)
        assert int(i32) > 2**31 - 2**24
        assert bool(torch.isnan(i32.view(torch.float32)).all())
        assert bool(torch.isnan(i32.view(torch.float16)).all())
        assert bool(torch.isnan(i32.view(torch.bfloat16)).all())
        for dtype in (torch.int32, torch.float32, torch.float16, torch.bfloat16):
            assert bool(is_poison(i32.view(dtype)).all())
    # canonical NaNs and ordinary values are not poison
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert not is_poison(torch.tensor([math.nan, 0.0, -1.0, math.inf], dtype=dtype)).any()
    assert not is_poison(torch.tensor([-1, 0, 2**31 - 1, -2**31], dtype=torch.int32)).any()


def test_quiet_poison_survives_arithmetic():
    p = poison_like(4, torch.float32)
    assert bool(is_poison(p * 2.0 + 1.0).all())  # a result computed from poison shows


def test_vary_poison_sets_the_run_word():
    try:
        word = vary_poison(1234)
        assert word == poison_pattern(1234) == current_poison()
        assert poison_like(1, torch.int32).item() == poison_bits(torch.int32)
        assert poison_bits(torch.int32) == word - (1 << 32 if word >= 1 << 31 else 0)
    finally:
        vary_poison(0)


def test_guarded_copy_reads_poison_past_both_ends():
    t = torch.arange(5, dtype=torch.float32)
    g = guarded(t, guard=3)
    assert torch.equal(g, t)
    around = g.as_strided((11,), (1,), g.storage_offset() - 3)
    assert bool(is_poison(around[:3]).all()) and bool(is_poison(around[8:]).all())
