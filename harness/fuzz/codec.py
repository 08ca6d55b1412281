"""Bytes <-> `MoECase` for the fuzzer: a total decoder and its inverse.

libFuzzer mutates bytes and the harness runs cases. `decode` turns *every* byte string into a
case that passes `MoECase.validate()` (some deliberately out of contract: illegal overrides,
injected faults; `case.severity` says which), and `encode` writes a case back, so libFuzzer's
byte mutations and the structured mutators (`harness.fuzz.mutators`) work on one corpus.

Layout, format version 1: a header byte (the version; every value decodes as version 1 for
now), then the fields in dependency order (see `decode`). A `_Reader` yields 0 once the bytes
run out, like atheris' FuzzedDataProvider but deterministic and invertible: a short input is a
small default case, and trailing zero bytes never matter (`encode` drops them). A field is a
selector byte that picks from a weighted table of interesting values (T near 1, powers of two,
CUDA-graph capture sizes, 256/257; E on and off the warp top-k counts) or escapes to a raw
value; T may also be a launch threshold solved from the launch geometry plus a small offset
(`launch_thresholds`). Sizes are clamped into `CodecLimits` (`LIMITS` for the CPU model,
`LARGE_LIMITS` for production-size token counts on a GPU), so every decoded case is cheap
enough to fuzz: a large T is rare (about 1 random input in 100) and always comes with generated
tensors, since explicit tensors are capped at `CodecLimits.explicit_elements`.

The domain of `encode` is every valid case within the limits: there `decode(encode(c))` equals
`c` field for field (tensors bit for bit, NaN payloads aside); outside it `encode` raises
`CodecError`. `strict=False` writes any case, even an invalid one, as near as it can, and
decoding repairs it into the domain: the structured mutators change one field and let the
decoder fix what depends on it (K <= E, shapes of overrides, ...).

(Long for one module on purpose: every field's reader sits beside its writer, its inverse.)
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence

import torch

from harness import geometry
from harness.case import (
    DISTRIBUTIONS,
    FAULT_KINDS,
    FAULT_TENSORS,
    GRAPH_PADDINGS,
    MAX_EP,
    MAX_EXPERTS,
    MAX_LORAS,
    MAX_TOKENS,
    MAX_TOPK,
    SCORINGS,
    SPECIAL_VALUES,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
    difference,
    value_key,
)
from harness.errors import CodecError, HarnessError

# the codec's domain (its limits and caps) lives with case resizing; importable from here too
from harness.fuzz.resize import LARGE_LIMITS as LARGE_LIMITS
from harness.fuzz.resize import LIMITS, CodecLimits, fit_flat, hidden_cap, token_cap

FORMAT_VERSION = 1


#: vLLM's default CUDA-graph capture sizes up to 512: a batch is padded up to one of them
CAPTURE_SIZES = (1, 2, 4, *range(8, 256, 8), *range(256, 513, 16))
SMALL_TOKENS = (16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 17, 24, 31, 32, 33, 40, 48, 63, 64)
MID_TOKENS = tuple(sorted({65, 96, 127, 128, 129, 255, 256, 257, 258, 300, 383, 384, 385, 511,
                           512, 513, 600, *(c for c in CAPTURE_SIZES if c > 64)}))
#: warp-specialised counts (geometry.WARP_EXPERTS) and fallback ones, small first
EXPERTS = (8, 16, 64, 60, 6, 72, 128, 32, 4, 2, 1, 192, 256, 320, 512, 384, 448, 576, 7, 12,
           24, 40, 96, 100, 3, 5, 10, 20, 48, 80, 160, 1024)
TOPK = (2, 1, 4, 8, 6, 3, 22, 32, 16, 5, 7, 9)
BLOCK_SIZES = (16, 64, 128, 1, 2, 4, 8, 32, 256)
EP_SIZES = (1, 1, 1, 1, 2, 2, 4, 4, 8, 3, 5, 6, 7, 16)
HIDDEN_SIZES = (8, 4, 16, 1, 2, 32, 64, 3, 5, 7, 128, 256)
DTYPES = ("fp32", "fp32", "fp16", "bf16")
SCALES = (1.0, 0.5, 2.0, 10.0, 0.01, 100.0, 1e4, 0.0, 3.0, 1e-30, 1e30, -1.0)
MAX_LORAS_CHOICES = (0, 0, 0, 1, 2, 4, 8, 0, 3, 5, 6, 7, 16)
PATCH_TARGETS = ("gating_logits", "gating_logits", "hidden_states", "correction_bias")
PATCH_KINDS = ("row", "cell", "column", "all")
PATCH_FLOATS = (0.0, 1.0, -1.0, 1e4, -1e4, 65504.0, 1e38, -1e38, 1e-40, 0.5)
FRACTIONS = (0.0, 0.5, 0.1, 1.0, 0.25, 0.01, 0.75)
BOUNDARIES = tuple(FAULT_TENSORS)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: tensor elements 0xF0..0xFE; below 0xF0 a multiple of 1/8 in [-15, 14.875] (ties are common),
#: 0xFF a raw float32
FLOAT_SPECIALS = (math.nan, math.inf, -math.inf, -0.0, 65504.0, -65504.0,
                  3.3895313892515355e38, 3.4028234663852886e38, -3.4028234663852886e38,
                  2.0**-149, 2.0**-24, 2.0**-133, 1e4, -1e4, 1e-3)
INT32_MAX = 2**31 - 1
#: the override tensors in the order of their flag bits
OVERRIDE_NAMES = tuple(f.name for f in dataclasses.fields(Overrides))


# -- scalars -----------------------------------------------------------------------------------


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


def _clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


def _selectors(values: Sequence, stop: int, start: int = 0) -> dict[tuple, int]:
    """value key -> the first selector s in [start, stop) with values[(s - start) % len]."""
    out: dict[tuple, int] = {}
    for s in range(start, stop):
        out.setdefault(value_key(values[(s - start) % len(values)]), s)
    return out


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


_SMALL_T = _selectors(SMALL_TOKENS, 128)
_MID_T = _selectors(MID_TOKENS, 192, 128)
_EXPERTS = _selectors(EXPERTS, 224)
_TOPK = _selectors(TOPK, 224)
_EP = _selectors(EP_SIZES, 240)
_HIDDEN = _selectors(HIDDEN_SIZES, 224)
_SCALES = _selectors(SCALES, 255)
_LORAS = _selectors(MAX_LORAS_CHOICES, 240)
_FRACTIONS = _selectors(FRACTIONS, 255)


def _patch_value(s: int) -> float | str:
    """The patch value of selector s < 255 (255 escapes to a raw float64)."""
    if s % 16 < len(SPECIAL_VALUES):
        return SPECIAL_VALUES[s % 16]
    return PATCH_FLOATS[s % len(PATCH_FLOATS)]


def _tensor_value(s: int) -> float:
    """The tensor element of selector s < 0xFF (0xFF escapes to a raw float32)."""
    return _unzigzag(s) / 8 if s < 0xF0 else FLOAT_SPECIALS[s - 0xF0]


_PATCH_VALUES: dict[tuple, int] = {}
for _s in range(255):
    _PATCH_VALUES.setdefault(value_key(_patch_value(_s)), _s)
#: float32 bits -> selector (NaN handled apart)
_F32: dict[int, int] = {}
for _s in range(0xFF):
    if not math.isnan(_tensor_value(_s)):
        _F32.setdefault(_f32_bits(_tensor_value(_s)), _s)


class _Count:
    """A list length: a byte picks 0..3 over weighted ranges starting at `starts`, then 4.. one
    per value up to 254, and 255 reads the length from the next byte (0..255)."""

    def __init__(self, starts: tuple[int, int, int, int, int]) -> None:
        self.starts = starts
        self.inline = 4 + 255 - starts[4] - 1  # the largest length written in one byte

    def read(self, r: _Reader) -> int:
        c = r.u8()
        if c == 255:
            return r.u8()
        if c >= self.starts[4]:
            return 4 + c - self.starts[4]
        return sum(c >= s for s in self.starts[1:4])

    def write(self, w: _Writer, n: int) -> None:
        n = _clamp(n, 0, 255)
        if n < 4:
            w.u8(self.starts[n])
        elif n <= self.inline:
            w.u8(self.starts[4] + n - 4)
        else:
            w.u8(255)
            w.u8(n)


_PATCH_COUNT = _Count((0, 96, 160, 200, 224))
_FAULT_COUNT = _Count((0, 160, 208, 232, 244))
_ROW_COUNT = _Count((0, 64, 160, 208, 232))


class _Reader:
    """Bytes as a stream that yields zeros once it runs out."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def u8(self) -> int:
        p = self.pos
        self.pos = p + 1
        return self.data[p] if p < len(self.data) else 0

    def uint(self, n: int) -> int:
        p = self.pos
        self.pos = p + n
        return int.from_bytes(self.data[p:p + n], "little")  # short: missing bytes are 0

    def varint(self) -> int:
        """LEB128, at most 9 bytes (63 bits)."""
        value = 0
        for shift in range(0, 63, 7):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
        return value

    def f64(self) -> float:
        return struct.unpack("<d", self.uint(8).to_bytes(8, "little"))[0]


class _Writer:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> None:
        self.buf.append(v & 0xFF)

    def uint(self, v: int, n: int) -> None:
        self.buf += (v % (1 << (8 * n))).to_bytes(n, "little")

    def varint(self, v: int) -> None:
        v = _clamp(v, 0, 2**63 - 1)
        while True:
            b = v & 0x7F
            v >>= 7
            if not v:
                self.buf.append(b)
                return
            self.buf.append(b | 0x80)

    def f64(self, v: float) -> None:
        self.buf += struct.pack("<d", v)

    def put(self, write, read, value, *ctx):
        """Write `value` with `write`, and return what `read` makes of those bytes: the value a
        decoder will see (clamped into the domain)."""
        mark = len(self.buf)
        write(self, value, *ctx)
        return read(_Reader(self.buf[mark:]), *ctx)


# -- sizes -------------------------------------------------------------------------------------


def launch_thresholds(num_experts: int, topk: int, block_size: int,
                      ep_size: int = 1) -> tuple[tuple[str, int], ...]:
    """(name, T): the smallest token counts at which a stage's launch changes shape or an
    unchunked launch crosses a device limit, solved from `harness.geometry` for the
    receive rows ep_size * ceil(T / ep_size) of the busiest rank (the first, which owns
    ceil(E / ep_size) experts in the default layout)."""
    ep = ep_size
    local = math.ceil(num_experts / ep)

    def tokens_for_rows(rows: int) -> int:  # smallest T with ep * ceil(T / ep) >= rows
        return max(1, ep * (math.ceil(rows / ep) - 1) + 1)

    max_y = geometry.DeviceLimits().max_grid[1]
    return (
        ("sort_align.three_step", tokens_for_rows(geometry.SORT_SINGLE_BLOCK_MAX_ROWS + 1)),
        ("dispatch.second_block", 256 * ep + 1),
        ("experts.grid_y", tokens_for_rows(
            geometry.overflow_num_tokens(topk, local, block_size, max_y))),
        ("experts.grid_y_x2", tokens_for_rows(
            geometry.overflow_num_tokens(topk, local, block_size, 2 * max_y))),
    )


def _read_experts(r: _Reader) -> int:
    s = r.u8()
    return EXPERTS[s % len(EXPERTS)] if s < 224 else 1 + r.uint(2) % MAX_EXPERTS


def _write_experts(w: _Writer, E: int) -> None:
    E = _clamp(E, 1, MAX_EXPERTS)
    s = _EXPERTS.get(value_key(E))
    if s is None:
        w.u8(224)
        w.uint(E - 1, 2)
    else:
        w.u8(s)


def _read_topk(r: _Reader, E: int) -> int:
    s = r.u8()
    k = TOPK[s % len(TOPK)] if s < 224 else 1 + r.u8()
    return min(k, E, MAX_TOPK)


def _write_topk(w: _Writer, K: int, E: int) -> None:
    K = _clamp(K, 1, min(E, MAX_TOPK))
    s = _TOPK.get(value_key(K))
    if s is None:
        w.u8(224)
        w.u8(K - 1)
    else:
        w.u8(s)


def _read_block(r: _Reader) -> int:
    return BLOCK_SIZES[r.u8() % len(BLOCK_SIZES)]


def _write_block(w: _Writer, bs: int) -> None:
    bs = 1 << (_clamp(bs, 1, 256).bit_length() - 1)  # a power of two, rounded down
    w.u8(BLOCK_SIZES.index(bs))


def _read_ep(r: _Reader, E: int) -> int:
    s = r.u8()
    ep = EP_SIZES[s % len(EP_SIZES)] if s < 240 else 1 + r.u8() % MAX_EP
    return min(ep, E, MAX_EP)


def _write_ep(w: _Writer, ep: int, E: int) -> None:
    ep = _clamp(ep, 1, min(E, MAX_EP))
    s = _EP.get(value_key(ep))
    if s is None:
        w.u8(240)
        w.u8(ep - 1)
    else:
        w.u8(s)


def _read_tokens(r: _Reader, E: int, K: int, bs: int, ep: int, limits: CodecLimits) -> int:
    s = r.u8()
    if s < 128:
        T = SMALL_TOKENS[s % len(SMALL_TOKENS)]
    elif s < 192:
        T = MID_TOKENS[(s - 128) % len(MID_TOKENS)]
    elif s < 251:
        T = 1 + r.uint(2) % 1024
    elif s < 255:
        T = launch_thresholds(E, K, bs, ep)[s - 251][1] + _unzigzag(r.u8())
    else:
        T = 1 + r.uint(4)
    return _clamp(T, 1, token_cap(E, K, ep, limits))


def _write_tokens(w: _Writer, T: int, E: int, K: int, bs: int, ep: int,
                  limits: CodecLimits) -> None:
    T = _clamp(T, 1, token_cap(E, K, ep, limits))
    s = _SMALL_T.get(value_key(T), _MID_T.get(value_key(T)))
    if s is not None:
        w.u8(s)
        return
    if T <= 1024:
        w.u8(192)
        w.uint(T - 1, 2)
        return
    for i, (_, at) in enumerate(launch_thresholds(E, K, bs, ep)):
        if -128 <= T - at <= 127:
            w.u8(251 + i)
            w.u8(_zigzag(T - at))
            return
    w.u8(255)
    w.uint(T - 1, 4)


def _read_hidden(r: _Reader, T: int, K: int, E: int, limits: CodecLimits) -> int:
    s = r.u8()
    H = HIDDEN_SIZES[s % len(HIDDEN_SIZES)] if s < 224 else 1 + r.u8()
    return min(H, hidden_cap(T, K, E, limits))


def _write_hidden(w: _Writer, H: int, T: int, K: int, E: int, limits: CodecLimits) -> None:
    H = _clamp(H, 1, hidden_cap(T, K, E, limits))
    s = _HIDDEN.get(value_key(H))
    if s is None:
        w.u8(224)
        w.u8(H - 1)
    else:
        w.u8(s)


def _read_recv_slots(r: _Reader, T: int, ep: int, K: int, limits: CodecLimits) -> int | None:
    s = r.u8()
    if s < 192:
        return None
    per_rank = math.ceil(T / ep)
    extra = s - 192 if s < 255 else r.varint()
    cap = max(per_rank, min(MAX_TOKENS, limits.recv_elements // (ep * ep * K)))
    return min(per_rank + extra, cap)


def _write_recv_slots(w: _Writer, M: int | None, T: int, ep: int) -> None:
    if M is None:
        w.u8(0)
        return
    extra = max(0, M - math.ceil(T / ep))
    if extra < 63:
        w.u8(192 + extra)
    else:
        w.u8(255)
        w.varint(extra)


def _read_loras(r: _Reader) -> int:
    s = r.u8()
    return MAX_LORAS_CHOICES[s % len(MAX_LORAS_CHOICES)] if s < 240 else r.u8() % (MAX_LORAS + 1)


def _write_loras(w: _Writer, L: int) -> None:
    L = _clamp(L, 0, MAX_LORAS)
    s = _LORAS.get(value_key(L))
    if s is None:
        w.u8(240)
        w.u8(L)
    else:
        w.u8(s)


# -- tensors -----------------------------------------------------------------------------------


def _lut(values: Sequence[float | int], floats: bool) -> torch.Tensor:
    """[256] int32: the bits of the element each selector byte stands for (0xFF: raw)."""
    bits = [_f32_bits(v) if floats else v for v in values]
    bits = [b - 2**32 if b >= 2**31 else b for b in bits]
    return torch.tensor(bits + [0] * (256 - len(bits)), dtype=torch.int32)


_FLOAT_LUT = _lut([_tensor_value(s) for s in range(0xFF)], floats=True)
_INT_LUT = _lut([_unzigzag(s) for s in range(0xFE)] + [INT32_MAX], floats=False)
#: signed float32 bits -> selector of the special tensor elements (0xF0..0xFE but NaN)
_SPECIALS = {b - 2**32 if b >= 2**31 else b: s for b, s in _F32.items() if s >= 0xF0}


def _signed(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def _read_elements(r: _Reader, n: int, lut: torch.Tensor) -> torch.Tensor:
    """[n] int32 bits of n elements: a selector byte each, looked up in `lut`, except 0xFF,
    which is followed by the element's 4 raw little-endian bytes."""
    data, p = r.data, r.pos
    chunk = data[p:p + n]
    if 0xFF not in chunk:  # the common case: one byte per element, vectorised
        r.pos = p + n
        if not chunk:
            return lut[:1].expand(n).clone()
        out = lut.index_select(0, torch.frombuffer(bytearray(chunk), dtype=torch.uint8).long())
        return out if len(chunk) == n else torch.cat([out, lut[:1].expand(n - len(chunk))])
    table = lut.tolist()
    bits: list[int] = []
    while len(bits) < n:  # runs of selectors between raw elements
        want = n - len(bits)
        q = data.find(0xFF, p, p + want)
        stop = p + want if q < 0 else q
        run = data[p:stop]
        bits += [table[b] for b in run]
        bits += [table[0]] * (stop - p - len(run))  # past the end: zero bytes
        p = stop
        if q >= 0:
            bits.append(_signed(int.from_bytes(data[q + 1:q + 5], "little")))
            p = q + 5
    r.pos = p
    return torch.tensor(bits, dtype=torch.int32)


def _write_elements(w: _Writer, bits: torch.Tensor, sel: torch.Tensor) -> None:
    """Write `bits` (int32 values or float32 bits) with their selectors `sel` (0xFF: the
    element's 4 raw little-endian bytes follow)."""
    selectors = sel.tolist()  # (no tensor reduction: on a loaded machine those cost ~1 ms)
    if 0xFF not in selectors:
        w.buf += bytes(selectors)
        return
    raw = sel == 0xFF
    b = bits.to(torch.int64) & 0xFFFFFFFF
    stream = torch.stack([sel, b & 0xFF, b >> 8 & 0xFF, b >> 16 & 0xFF, b >> 24], 1)
    keep = torch.cat([torch.ones_like(raw)[:, None], raw[:, None].expand(-1, 4)], 1)
    w.buf += bytes(stream[keep].tolist())


def _read_floats(r: _Reader, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = FLOAT_DTYPES[r.u8() % len(FLOAT_DTYPES)]
    bits = _read_elements(r, math.prod(shape), _FLOAT_LUT)
    return bits.view(torch.float32).to(dtype).reshape(shape)


def _write_floats(w: _Writer, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    t = t.detach().cpu()
    if t.dtype not in FLOAT_DTYPES:
        t = t.to(torch.float32)
    w.u8(FLOAT_DTYPES.index(t.dtype))
    f = fit_flat(t, shape).to(torch.float32).reshape(-1).contiguous()
    bits = f.view(torch.int32)
    k = f * 8  # exact: a power-of-two scale
    ki = k.clamp(-120, 119).nan_to_num(0.0).to(torch.int64)
    grid = (ki.to(torch.float32) == k) & (bits != -2**31)  # -0.0 is a special, not 0
    sel = torch.where(grid, torch.where(ki >= 0, 2 * ki, -2 * ki - 1), 0xFF)
    for b in _SPECIALS.keys() & set(bits.tolist()):
        sel = torch.where(bits == b, _SPECIALS[b], sel)
    sel = torch.where(f.isnan(), 0xF0, sel)  # NaN (its payload is not kept)
    _write_elements(w, bits, sel)


def _read_ints(r: _Reader, shape: tuple[int, ...]) -> torch.Tensor:
    return _read_elements(r, math.prod(shape), _INT_LUT).reshape(shape)


def _write_ints(w: _Writer, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    t = t.detach().cpu()
    if t.is_floating_point():
        t = torch.nan_to_num(t)
    v = fit_flat(t.to(torch.int64), shape).clamp(-2**31, INT32_MAX).reshape(-1)
    small = (v >= -127) & (v <= 126)
    sel = torch.where(small, torch.where(v >= 0, 2 * v, -2 * v - 1),
                      torch.where(v == INT32_MAX, 0xFE, 0xFF))
    _write_elements(w, v, sel)


# -- sources, patches, overrides, faults -------------------------------------------------------


def _read_generated(r: _Reader) -> Generated:
    seed = r.varint()
    distribution = DISTRIBUTIONS[r.u8() % len(DISTRIBUTIONS)]
    s = r.u8()
    scale = SCALES[s % len(SCALES)] if s < 255 else r.f64()
    return Generated(seed, distribution, scale if math.isfinite(scale) else 1.0)


def _write_generated(w: _Writer, g: Generated) -> None:
    w.varint(g.seed)
    w.u8(DISTRIBUTIONS.index(g.distribution) if g.distribution in DISTRIBUTIONS else 0)
    scale = float(g.scale) if math.isfinite(g.scale) else 1.0
    s = _SCALES.get(value_key(scale))
    if s is None:
        w.u8(255)
        w.f64(scale)
    else:
        w.u8(s)


def _read_logits(r: _Reader, T: int, E: int, limits: CodecLimits) -> Generated | torch.Tensor:
    if r.u8() % 8 == 7 and T * E <= limits.explicit_elements:
        return _read_floats(r, (T, E))
    return _read_generated(r)


def _write_logits(w: _Writer, src: object, T: int, E: int, limits: CodecLimits) -> None:
    if isinstance(src, torch.Tensor) and T * E <= limits.explicit_elements:
        w.u8(7)
        _write_floats(w, src, (T, E))
    else:
        w.u8(0)
        _write_generated(w, src if isinstance(src, Generated) else Generated())


def _read_bias(r: _Reader, E: int, limits: CodecLimits) -> Generated | torch.Tensor | None:
    mode = r.u8() % 4
    if mode == 2 and E <= limits.explicit_elements:
        return _read_floats(r, (E,))
    return _read_generated(r) if mode in (1, 2) else None


def _write_bias(w: _Writer, src: object, E: int, limits: CodecLimits) -> None:
    if src is None:
        w.u8(0)
    elif isinstance(src, torch.Tensor) and E <= limits.explicit_elements:
        w.u8(2)
        _write_floats(w, src, (E,))
    else:
        w.u8(1)
        _write_generated(w, src if isinstance(src, Generated) else Generated())


def _read_patch(r: _Reader, has_bias: bool) -> Patch:
    target = PATCH_TARGETS[r.u8() % len(PATCH_TARGETS)]
    if target == "correction_bias" and not has_bias:
        target = "gating_logits"
    kind = PATCH_KINDS[r.u8() % len(PATCH_KINDS)]
    s = r.u8()
    value = r.f64() if s == 255 else _patch_value(s)
    return Patch(target, kind, value, r.varint(), r.varint())


def _write_patch(w: _Writer, p: Patch) -> None:
    w.u8(PATCH_TARGETS.index(p.target) if p.target in PATCH_TARGETS else 0)
    w.u8(PATCH_KINDS.index(p.kind) if p.kind in PATCH_KINDS else 0)
    value = p.value if isinstance(p.value, str) else float(p.value)
    s = _PATCH_VALUES.get(value_key(value))
    if s is not None:
        w.u8(s)
    elif isinstance(value, float):
        w.u8(255)
        w.f64(value)
    else:  # an unknown special value: NaN, the most telling one
        w.u8(0)
    w.varint(p.row)
    w.varint(p.col)


def _override_shapes(T: int, E: int, K: int, ep: int, L: int, has_ids: bool,
                     limits: CodecLimits) -> dict[str, tuple[int, ...] | None]:
    """The shape of each override the codec holds for these sizes (None: not held)."""
    def held(shape: tuple[int, ...], ok: bool = True) -> tuple[int, ...] | None:
        return shape if ok and math.prod(shape) <= limits.explicit_elements else None

    return {"gating_logits": held((T, E)), "topk_ids": held((T, K)),
            "topk_weights": held((T, K), has_ids), "recv_counters": held((ep, ep)),
            "token_lora_mapping": held((T,), L >= 1), "lora_ids": held((L + 1,), L >= 1)}


_INT_OVERRIDES = frozenset({"topk_ids", "recv_counters", "token_lora_mapping", "lora_ids"})


def _read_overrides(r: _Reader, T: int, E: int, K: int, ep: int, L: int,
                    limits: CodecLimits) -> Overrides:
    s = r.u8()
    flags = s & 0x3F if s >= 0xC0 else 0
    got: dict[str, torch.Tensor] = {}
    for bit, name in enumerate(OVERRIDE_NAMES):
        if not flags >> bit & 1:
            continue
        shape = _override_shapes(T, E, K, ep, L, "topk_ids" in got, limits)[name]
        if shape is not None:
            got[name] = (_read_ints if name in _INT_OVERRIDES else _read_floats)(r, shape)
    return Overrides(**got)


def _write_overrides(w: _Writer, o: Overrides, T: int, E: int, K: int, ep: int, L: int,
                     limits: CodecLimits) -> None:
    present = o.fields()
    shapes = _override_shapes(T, E, K, ep, L, "topk_ids" in present, limits)
    held = [(bit, name) for bit, name in enumerate(OVERRIDE_NAMES)
            if name in present and shapes[name] is not None]
    flags = sum(1 << bit for bit, _ in held)
    w.u8(0xC0 | flags if flags else 0)
    for _, name in held:
        (_write_ints if name in _INT_OVERRIDES else _write_floats)(w, present[name],
                                                                   shapes[name])


def _read_fault(r: _Reader) -> Fault:
    boundary = BOUNDARIES[r.u8() % len(BOUNDARIES)]
    tensors = FAULT_TENSORS[boundary]
    names = tuple(tensors)
    tensor = names[r.u8() % len(names)]
    kind = FAULT_KINDS[r.u8() % len(FAULT_KINDS)]
    if kind in ("nan", "inf") and tensors[tensor] == "int":
        kind = "garbage"
    rows = tuple(_unzigzag(r.varint()) for _ in range(_ROW_COUNT.read(r)))
    s = r.u8()
    fraction = FRACTIONS[s % len(FRACTIONS)] if s < 255 else r.f64()
    if not 0.0 <= fraction <= 1.0:
        fraction = 0.0
    return Fault(boundary, tensor, kind, rows, fraction, r.varint(), (r.u8() + 30) % 32)


def _write_fault(w: _Writer, f: Fault) -> None:
    boundary = f.boundary if f.boundary in FAULT_TENSORS else "gating"
    names = tuple(FAULT_TENSORS[boundary])
    w.u8(BOUNDARIES.index(boundary))
    w.u8(names.index(f.tensor) if f.tensor in names else 0)
    w.u8(FAULT_KINDS.index(f.kind) if f.kind in FAULT_KINDS else FAULT_KINDS.index("garbage"))
    rows = f.rows[:255]
    _ROW_COUNT.write(w, len(rows))
    for row in rows:
        w.varint(_zigzag(_clamp(row, -2**62, 2**62 - 1)))
    fraction = float(f.fraction) if 0.0 <= f.fraction <= 1.0 else 0.0
    s = _FRACTIONS.get(value_key(fraction))
    if s is None:
        w.u8(255)
        w.f64(fraction)
    else:
        w.u8(s)
    w.varint(f.seed)
    w.u8((f.bit - 30) % 32)


# -- the case ----------------------------------------------------------------------------------


def decode(data: bytes, limits: CodecLimits = LIMITS) -> MoECase:
    """The case of any byte string; it always passes `MoECase.validate()`."""
    r = _Reader(data)
    r.u8()  # header: the format version
    E = _read_experts(r)
    K = _read_topk(r, E)
    bs = _read_block(r)
    ep = _read_ep(r, E)
    T = _read_tokens(r, E, K, bs, ep, limits)
    dtype = DTYPES[r.u8() % len(DTYPES)]
    scoring = SCORINGS[r.u8() % len(SCORINGS)]
    renormalize = bool(r.u8() & 1)
    H = _read_hidden(r, T, K, E, limits)
    seed = r.varint()
    logits = _read_logits(r, T, E, limits)
    bias = _read_bias(r, E, limits)
    M = _read_recv_slots(r, T, ep, K, limits)
    expert_to_rank = (tuple(r.u8() % ep for _ in range(E)) if r.u8() % 4 == 3 else None)
    L = _read_loras(r)
    enabled = None
    if L and r.u8() % 4:
        masks = [r.u8() for _ in range((L + 7) // 8)]
        enabled = tuple(not masks[i // 8] >> (i % 8) & 1 for i in range(L))
    patches = tuple(_read_patch(r, bias is not None) for _ in range(_PATCH_COUNT.read(r)))
    overrides = _read_overrides(r, T, E, K, ep, L, limits)
    faults = tuple(_read_fault(r) for _ in range(_FAULT_COUNT.read(r)))
    graph_padding = GRAPH_PADDINGS[r.u8() % len(GRAPH_PADDINGS)]
    return _fit_memory(MoECase(
        num_tokens=T, num_experts=E, topk=K, scoring=scoring, renormalize=renormalize,
        dtype=dtype, hidden_size=H, block_size=bs, seed=seed, logits=logits,
        correction_bias=bias, patches=patches, ep_size=ep, max_tokens_per_rank=M,
        expert_to_rank=expert_to_rank, max_loras=L, adapter_enabled=enabled,
        overrides=overrides, faults=faults, graph_padding=graph_padding))


def _fit_memory(case: MoECase) -> MoECase:
    """`case`, or where its buffers together pass `MoECase.validate`'s memory bound (the
    per-field limits cannot see every product of sizes, e.g. under `LARGE_LIMITS`), the same
    case with H = 1 and no extra receive slots, then without LoRA: each step is a case the
    encoder writes exactly, so decoding stays total and round-trips."""
    for repair in (lambda c: c,
                   lambda c: dataclasses.replace(c, hidden_size=1, max_tokens_per_rank=None),
                   lambda c: dataclasses.replace(
                       c, max_loras=0, adapter_enabled=None,
                       overrides=dataclasses.replace(c.overrides, token_lora_mapping=None,
                                                     lora_ids=None))):
        case = repair(case)
        try:
            case.validate()
            return case
        except HarnessError:
            continue
    return case


def encode(case: MoECase, strict: bool = True, limits: CodecLimits = LIMITS) -> bytes:
    """The bytes `decode` turns back into `case`.

    strict: `case` must be valid (`CaseError` otherwise) and within the codec's domain
    (`CodecError` naming the first field that would come back different). Not strict: any case
    is written as near as the format allows, and decoding repairs it into the domain.
    """
    if strict:
        case.validate()
    w = _Writer()
    w.u8(FORMAT_VERSION)
    E = w.put(_write_experts, _read_experts, case.num_experts)
    K = w.put(_write_topk, _read_topk, case.topk, E)
    bs = w.put(_write_block, _read_block, case.block_size)
    ep = w.put(_write_ep, _read_ep, case.ep_size, E)
    T = w.put(_write_tokens, _read_tokens, case.num_tokens, E, K, bs, ep, limits)
    w.u8(DTYPES.index(case.dtype) if case.dtype in DTYPES else 0)
    w.u8(SCORINGS.index(case.scoring) if case.scoring in SCORINGS else 0)
    w.u8(int(bool(case.renormalize)))
    w.put(_write_hidden, _read_hidden, case.hidden_size, T, K, E, limits)
    w.varint(case.seed)
    _write_logits(w, case.logits, T, E, limits)
    _write_bias(w, case.correction_bias, E, limits)
    _write_recv_slots(w, case.max_tokens_per_rank, T, ep)
    if case.expert_to_rank is None:
        w.u8(0)
    else:
        w.u8(3)
        ranks = list(case.expert_to_rank[:E]) + [0] * (E - len(case.expert_to_rank))
        for rank in ranks:
            w.u8(rank % ep)
    L = w.put(_write_loras, _read_loras, case.max_loras)
    if L:
        if case.adapter_enabled is None:
            w.u8(0)
        else:
            w.u8(1)
            flags = list(case.adapter_enabled[:L]) + [True] * (L - len(case.adapter_enabled))
            for i in range(0, L, 8):
                w.u8(sum((not f) << j for j, f in enumerate(flags[i:i + 8])))
    _PATCH_COUNT.write(w, len(case.patches))
    for p in case.patches[:255]:
        _write_patch(w, p)
    _write_overrides(w, case.overrides, T, E, K, ep, L, limits)
    _FAULT_COUNT.write(w, len(case.faults))
    for f in case.faults[:255]:
        _write_fault(w, f)
    w.u8(GRAPH_PADDINGS.index(case.graph_padding) if case.graph_padding in GRAPH_PADDINGS else 0)
    out = bytes(w.buf).rstrip(b"\0")  # the reader yields the zeros back
    if strict:
        where = difference(case, decode(out, limits))
        if where is not None:
            raise CodecError(where, "outside the codec's domain (an explicit tensor over "
                             f"{limits.explicit_elements} elements, sizes over its work "
                             "limits, more than 255 patches or faults): it would not come "
                             "back the same")
    return out


def fits(case: MoECase, limits: CodecLimits = LIMITS) -> bool:
    """Whether `encode(case)` is exact (a valid case within the codec's domain)."""
    try:
        encode(case, strict=True, limits=limits)
    except HarnessError:
        return False
    return True
