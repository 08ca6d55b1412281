"""Checked device-memory model for the CPU backend: bounds checks and poison.

Every output and workspace buffer of the CPU model is a `CheckedBuffer`: a flat tensor filled
with a poison pattern at allocation, whose vectorised `read` and `write` raise `IllegalAccess`
for any index outside it. A read may also insist that the memory was written (`initialized`),
the CPU analogue of compute-sanitizer's initcheck. The same poison patterns are used by the CUDA
backend's pre-filled outputs, so "never written" means the same thing on both.
"""

from __future__ import annotations

import torch

from harness.errors import IllegalAccess

#: poison bit patterns per dtype: 0xCD bytes for integers (as debug heaps do), a quiet NaN with
#: a payload for floats, so a read of never-written memory is visible and propagates.
POISON_BITS: dict[torch.dtype, int] = {
    torch.int32: -842150451,  # 0xCDCDCDCD
    torch.float32: 0x7FC0DEAD,
    torch.float16: 0x7EAD,
    torch.bfloat16: 0x7FAD,
}
#: the integer dtype of each element size: a tensor's bits, for exact comparisons and fills
BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_view(x: torch.Tensor) -> torch.Tensor:
    """`x`'s bits as integers of its element size (contiguous): exact comparison of values,
    NaN payloads and -0.0 included, and fills of any bit pattern."""
    return x.contiguous().view(BITS_DTYPE[x.element_size()])

POISON_I32 = POISON_BITS[torch.int32]


def poison_like(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` filled with the poison pattern of `dtype`."""
    bits = BITS_DTYPE[torch.empty((), dtype=dtype).element_size()]
    return torch.full(shape if isinstance(shape, tuple) else (shape,), POISON_BITS[dtype],
                      dtype=bits).view(dtype)


def is_poison(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: does `x` still hold its dtype's poison pattern (compared bitwise)?"""
    return bits_view(x) == POISON_BITS[x.dtype]


class CheckedBuffer:
    """A flat buffer with bounds-checked, vectorised reads and writes.

    `data` is the backing tensor (flat). Indices are int64 tensors of any shape.
    """

    def __init__(self, stage: str, name: str, size: int, dtype: torch.dtype,
                 fill: torch.Tensor | None = None) -> None:
        self.stage = stage
        self.name = name
        self.data = poison_like(size, dtype) if fill is None else fill.reshape(-1).clone()
        self.size = self.data.numel()

    @classmethod
    def wrap(cls, stage: str, name: str, t: torch.Tensor) -> CheckedBuffer:
        """A checked view over an existing tensor's values (an input buffer)."""
        return cls(stage, name, t.numel(), t.dtype, fill=t)

    def _check(self, index: torch.Tensor, access: str) -> torch.Tensor:
        index = index.long()
        bad = (index < 0) | (index >= self.size)
        if bool(bad.any()):
            first = int(index[bad].flatten()[0])
            raise IllegalAccess(self.stage, self.name, first, self.size,
                                f"out-of-bounds {access}")
        return index

    def read(self, index: torch.Tensor, initialized: bool = False) -> torch.Tensor:
        index = self._check(index, "read")
        out = self.data[index]
        if initialized:
            hit = is_poison(out)
            if bool(hit.any()):
                raise IllegalAccess(self.stage, self.name, int(index[hit].flatten()[0]),
                                    self.size, "uninitialized read")
        return out

    def write(self, index: torch.Tensor, values: torch.Tensor | float | int) -> None:
        index = self._check(index, "write")
        if isinstance(values, torch.Tensor):
            values = values.to(self.data.dtype)
        self.data[index] = values

    def view(self, *shape: int) -> torch.Tensor:
        return self.data.view(*shape)


def framed(table: torch.Tensor, fill: int) -> torch.Tensor:
    """[fill, *table, fill] (1-D): a lookup table framed by two "nobody" entries, so an index
    clamped to [-1, n] and shifted by one never reads outside it. (F.pad costs several times
    more on the tiny tables of small cases.)"""
    out = table.new_full((table.numel() + 2,), fill)
    out[1:-1] = table
    return out
