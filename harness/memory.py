"""Checked device-memory model for the CPU backend: bounds checks and poison.

Every output and workspace buffer of the CPU model is a `CheckedBuffer`: a flat tensor filled
with a poison pattern at allocation, whose vectorised `read` and `write` raise `IllegalAccess`
for any index outside it. A read may also insist that the memory was written (`initialized`),
the CPU analogue of compute-sanitizer's initcheck. The same poison patterns are used by the CUDA
backend's pre-filled outputs and guard bands, so "never written" means the same thing on both.
The poison is one word of a family (see POISON_HALF_MIN) chosen per run from the case's seed
(`vary_poison`), and `is_poison` recognises every word of the family.
"""

from __future__ import annotations

import torch

from harness.errors import IllegalAccess

#: the integer dtype of each element size: a tensor's bits, for exact comparisons and fills
BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_view(x: torch.Tensor) -> torch.Tensor:
    """`x`'s bits as integers of its element size (contiguous): exact comparison of values,
    NaN payloads and -0.0 included, and fills of any bit pattern."""
    return x.contiguous().view(BITS_DTYPE[x.element_size()])


#: The poison family: 32-bit patterns whose two 16-bit halves both lie in
#: POISON_HALF_MIN..0x7FFF. Read as int32 such a word is above 2**31 - 2**24 (an expert id,
#: row or position far outside every [-1, E) or [0, N), and not a -1 or -2 - rank sentinel);
#: as float32 a quiet NaN with a payload (quiet: arithmetic keeps its bits, so a result computed
#: from poison still reads as poison); each half, as fp16 and as bf16, a quiet NaN other than
#: the canonical ones (bf16's 0x7FC0 is below the range). A stray read of a
#: guard or of never-written memory therefore trips the range checks of ids and the finiteness
#: checks of values, whatever the dtype of the buffer read. (Before, int poison was 0xCDCDCDCD,
#: a negative id, and the cuda guards' 0xA5A5A5A5 read as a tiny float: plausible data.)
POISON_HALF_MIN = 0x7FC1
_HALVES = 0x7FFF - POISON_HALF_MIN + 1
#: the dtypes with a poison pattern
POISONED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)


def poison_pattern(seed: int = 0) -> int:
    """The family's 32-bit word for `seed` (unsigned): deterministic, different seeds give
    (mostly) different words, so a kernel cannot learn one value."""
    h = (seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    hi = POISON_HALF_MIN + (h >> 16) % _HALVES
    lo = POISON_HALF_MIN + (h & 0xFFFF) % _HALVES
    return hi << 16 | lo


_pattern = poison_pattern(0)


def vary_poison(seed: int) -> int:
    """Make the family's word for `seed` the current poison (the runner calls this once per
    run with the case's seed: varied per run, the same for a replay); returns it."""
    global _pattern
    _pattern = poison_pattern(seed)
    return _pattern


def current_poison() -> int:
    """The current 32-bit poison word (unsigned), as the cuda guards are filled with it."""
    return _pattern


def poison_bits(dtype: torch.dtype, pattern: int | None = None) -> int:
    """The bit pattern (signed, as `bits_view` holds it) that poisons one element of `dtype`:
    the 32-bit word for 4-byte types, its high half for 2-byte types."""
    word = _pattern if pattern is None else pattern
    if torch.empty((), dtype=dtype).element_size() == 2:
        return word >> 16  # < 0x8000: a positive int16
    return word - (1 << 32) if word >= 1 << 31 else word


#: the family's word for seed 0 per dtype (what a run poisons with before any `vary_poison`)
POISON_BITS: dict[torch.dtype, int] = {dt: poison_bits(dt, poison_pattern(0))
                                       for dt in POISONED_DTYPES}
POISON_I32 = POISON_BITS[torch.int32]


def poison_like(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` filled with the current poison of `dtype`."""
    bits = BITS_DTYPE[torch.empty((), dtype=dtype).element_size()]
    return torch.full(shape if isinstance(shape, tuple) else (shape,), poison_bits(dtype),
                      dtype=bits).view(dtype)


def _in_family(half: torch.Tensor) -> torch.Tensor:
    return (half >= POISON_HALF_MIN) & (half <= 0x7FFF)


def is_poison(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: does `x` hold a word of the poison family (compared bitwise)? Any member
    counts, whichever seed filled it, so checks need not know the run's word."""
    bits = bits_view(x)
    if bits.dtype == torch.int16:
        return _in_family(bits)
    return _in_family(bits >> 16) & _in_family(bits & 0xFFFF)


def guarded(t: torch.Tensor, guard: int = 64) -> torch.Tensor:
    """A copy of `t` (contiguous) inside storage with `guard` poison elements on each side:
    a stage that reads past the tensor (through `as_strided`, a pointer, a C++ extension on
    the CPU) reads poison, as a kernel reading past a cuda input reads its guard band."""
    flat = poison_like(t.numel() + 2 * guard, t.dtype)
    flat[guard:guard + t.numel()] = t.reshape(-1)
    return flat[guard:guard + t.numel()].view(t.shape)


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
