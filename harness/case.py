"""`MoECase`: everything needed to run the routing chain once, deterministically.

A case is configuration plus tensor *sources*: a generator (seed, distribution) with sparse
patches, or an explicit tensor. A 400,000-token case is therefore a few hundred bytes on disk,
and materialisation (`materialize`) gives bit-identical tensors for every backend (they are
always generated on the CPU with torch's own generator, then moved).

A case may also *override* a stage's input (`Overrides`), entering the chain at that stage, and
carry *faults*: corruptions the runner applies to a stage's output before the next stage reads
it ("what does the next stage do when the previous one is wrong?").
"""

from __future__ import annotations

import collections
import dataclasses
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from harness.errors import CaseError
from harness.memory import bits_view

Scoring = Literal["softmax", "sigmoid"]
DType = Literal["fp32", "fp16", "bf16"]
Distribution = Literal["normal", "uniform", "zeros", "quantized"]
PatchKind = Literal["cell", "row", "column", "all"]
Boundary = Literal["gating", "dispatch", "sort_align", "experts"]
FaultKind = Literal["nan", "inf", "bitflip", "garbage", "stale", "zero_rows", "drop", "duplicate"]
GraphPadding = Literal["zero", "nan", "stale"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
SPECIAL_VALUES = ("nan", "inf", "-inf", "huge", "denormal", "-0.0", "tie")
PATCH_TARGETS = ("gating_logits", "hidden_states", "correction_bias")
DISTRIBUTIONS = ("normal", "uniform", "zeros", "quantized")
SCORINGS = ("softmax", "sigmoid")
FAULT_KINDS = ("nan", "inf", "bitflip", "garbage", "stale", "zero_rows", "drop", "duplicate")
#: what the padding rows of a CUDA-graph capture hold (graph mode only)
GRAPH_PADDINGS = ("zero", "nan", "stale")

#: the tensors a fault may corrupt, per boundary (the stage whose output it follows)
FAULT_TENSORS: dict[str, dict[str, str]] = {
    "gating": {"topk_ids": "int", "topk_weights": "float"},
    "dispatch": {"recv_topk_ids": "int", "recv_topk_weights": "float", "recv_counters": "int"},
    "sort_align": {"permuted_row": "int", "sorted_token_ids": "int", "expert_ids": "int"},
    "experts": {"expert_out": "float"},
}

MAX_TOKENS = 1_000_000
MAX_EXPERTS = 1024
MAX_TOPK = 32
MAX_HIDDEN = 256
MAX_EP = 64
MAX_LORAS = 64
#: the value the warp top-k kernels write over a chosen expert: a correction bias must stay
#: above it (and be a number) for the selection to be defined
BIAS_FLOOR = -10000.0
#: the largest buffer the chain may allocate (int32 indexing, as the kernels use) and the most
#: its principal buffers may take together (`MoECase.memory_estimate`)
MAX_BUFFER_ELEMENTS = 2**31 - 1
MAX_CASE_BYTES = 8 * 2**30


@dataclass(frozen=True)
class Generated:
    """A tensor drawn from torch's CPU generator: reproducible from (seed, distribution, scale)."""

    seed: int = 0
    distribution: Distribution = "normal"
    scale: float = 1.0


TensorSource = Generated | torch.Tensor


@dataclass(frozen=True)
class Patch:
    """A sparse overwrite of a generated or explicit tensor.

    `kind` picks cells: one cell (row, col), a whole row, a whole column, or everything. `value`
    is a float or one of SPECIAL_VALUES; "huge" is the dtype's largest finite value, "denormal"
    its smallest subnormal, "tie" copies column 0 of the same row (a tie with the lowest index).
    Rows and columns are taken modulo the tensor's shape, so a patch never goes out of range.
    """

    target: str = "gating_logits"
    kind: PatchKind = "cell"
    value: float | str = "nan"
    row: int = 0
    col: int = 0


@dataclass(frozen=True)
class Fault:
    """A corruption the runner applies to one tensor a stage produced, before the next reads it.

    Rows (dimension 0, modulo its size) come from `rows`, or, where `rows` is empty, a
    `fraction` of them drawn with `seed`. Kinds: nan / inf (float tensors), bitflip (`bit` of
    every element of the rows), garbage (random values), stale (the values of the next row, as
    left by an earlier run), zero_rows, drop (ids -> -1, floats -> 0), duplicate (every slot of
    a row repeats slot 0; a 1-D tensor repeats the previous row).
    """

    boundary: Boundary = "gating"
    tensor: str = "topk_ids"
    kind: FaultKind = "garbage"
    rows: tuple[int, ...] = (0,)
    fraction: float = 0.0
    seed: int = 0
    bit: int = 30


@dataclass(frozen=True, eq=False)
class Overrides:
    """Stage inputs given directly: the chain enters at that stage with these tensors.

    Shapes: gating_logits [T, E] float; topk_ids [T, K] int32 with optional topk_weights
    [T, K] float32 (default 1/K); recv_counters [ep_size, ep_size] int32 (destination, source);
    token_lora_mapping [T] int32; lora_ids [max_loras + 1] int32. Values are not restricted:
    out-of-domain values make the case out of contract (see `MoECase.contract_violations`).
    """

    gating_logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    recv_counters: torch.Tensor | None = None
    token_lora_mapping: torch.Tensor | None = None
    lora_ids: torch.Tensor | None = None

    def fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


class BufferEstimate(NamedTuple):
    """`count` buffers of `shape` and `itemsize` bytes per element; `field` sizes them."""

    name: str
    shape: tuple[int, ...]
    count: int
    itemsize: int
    field: str

    @property
    def elements(self) -> int:
        """Elements of one such buffer."""
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.count * self.elements * self.itemsize


@dataclass(frozen=True, eq=False)
class MoECase:
    """One deterministic run of the routing chain. See the module docstring.

    Sizes: num_tokens T in 1..1,000,000; num_experts E in 1..1024; topk K in 1..min(E, 32);
    hidden_size H in 1..256; block_size a power of two in 1..256; ep_size in 1..min(64, E);
    max_tokens_per_rank >= ceil(T / ep_size) (default exactly that); max_loras in 0..64
    (0 switches the LoRA stage off). graph_padding: what rows T..S-1 hold when the chain runs
    as a CUDA graph captured for S >= T rows (`harness.backends.cuda_graph`): zeros, NaN, or
    whatever the previous replay left there; ignored by the eager backends.
    """

    num_tokens: int
    num_experts: int
    topk: int
    scoring: Scoring = "softmax"
    renormalize: bool = False
    dtype: DType = "fp32"
    hidden_size: int = 8
    block_size: int = 16
    seed: int = 0
    logits: TensorSource = field(default_factory=Generated)
    correction_bias: TensorSource | None = None
    patches: tuple[Patch, ...] = ()
    ep_size: int = 1
    max_tokens_per_rank: int | None = None
    #: expert -> owning rank; None = contiguous blocks of ceil(E / ep_size) experts
    expert_to_rank: tuple[int, ...] | None = None
    max_loras: int = 0
    #: per-adapter switch, length max_loras; None = all enabled
    adapter_enabled: tuple[bool, ...] | None = None
    overrides: Overrides = field(default_factory=Overrides)
    faults: tuple[Fault, ...] = ()
    graph_padding: GraphPadding = "zero"

    # -- derived configuration -------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def tokens_per_rank(self) -> int:
        return math.ceil(self.num_tokens / self.ep_size)

    @property
    def recv_slots(self) -> int:
        """max_tokens_per_rank, defaulted."""
        return self.max_tokens_per_rank or self.tokens_per_rank

    def rank_of_expert(self) -> torch.Tensor:
        """[E] int32: the rank that owns each expert."""
        if self.expert_to_rank is not None:
            return torch.tensor(self.expert_to_rank, dtype=torch.int32)
        per = math.ceil(self.num_experts / self.ep_size)
        return (torch.arange(self.num_experts, dtype=torch.int32) // per).to(torch.int32)

    def expert_map(self) -> torch.Tensor:
        """[ep_size, E] int32: each rank's global -> local expert id, -1 where not owned."""
        owner = self.rank_of_expert().long()
        out = torch.full((self.ep_size, self.num_experts), -1, dtype=torch.int32)
        for r in range(self.ep_size):
            mine = torch.nonzero(owner == r).flatten()
            out[r, mine] = torch.arange(mine.numel(), dtype=torch.int32)
        return out

    def local_experts(self) -> list[int]:
        """Number of experts each rank owns."""
        owner = self.rank_of_expert().long()
        return [int((owner == r).sum()) for r in range(self.ep_size)]

    def replace(self, **changes) -> MoECase:
        return dataclasses.replace(self, **changes)

    def memory_estimate(self) -> list[BufferEstimate]:
        """The chain's principal buffers, each with the field that sizes it.

        What the CPU model materialises (and a GPU backend allocates) for one run: the
        logits and the fallback top-k's workspace, the receive buffers of all ranks, each
        rank's sort and expert outputs (all kept in the `RunResult`) and the LoRA layout.
        Temporaries come on top (about as much again at the peak).
        """
        from harness.geometry import max_num_tokens_padded, uses_warp_path

        T, E, K, H = self.num_tokens, self.num_experts, self.topk, self.hidden_size
        ep, M, bs, L = self.ep_size, self.recv_slots, self.block_size, self.max_loras
        recv = ("max_tokens_per_rank" if self.max_tokens_per_rank is not None
                else "ep_size" if ep > 1 else "num_tokens")
        local = (-(-E // ep) if self.expert_to_rank is None  # experts of the fullest rank
                 else max(collections.Counter(self.expert_to_rank).values()))
        padded = max_num_tokens_padded(ep * M, K, local, bs)  # a rank's sorted_token_ids
        bufs = [BufferEstimate("gating_logits", (T, E), 1, 4, "num_tokens"),
                BufferEstimate("recv_topk_ids", (ep, ep, M, K), 3, 4, recv),  # + weights,
                BufferEstimate("recv_hidden", (ep, ep, M, H), 1,  # garbage
                               self.torch_dtype.itemsize, recv),
                BufferEstimate("sorted_token_ids", (padded,), 2 * ep, 4, recv),  # + perm
                BufferEstimate("expert_out", (padded, H), ep, 4, recv),
                BufferEstimate("rank_outputs", (ep, ep * M, H), 1, 4, recv)]
        if not uses_warp_path(E):
            bufs.append(BufferEstimate("gating_workspace", (T, E), 1, 4, "num_tokens"))
        if L:
            bufs.append(BufferEstimate("lora sorted_token_ids",
                                       (L, max_num_tokens_padded(T, K, E, bs)), 1, 4,
                                       "max_loras"))
        return bufs

    def _validate_memory(self) -> None:
        """`CaseError` for a problem whose buffers cannot be materialised: one buffer beyond
        int32 indexing, or all of them beyond MAX_CASE_BYTES (named by the largest)."""
        bufs = self.memory_estimate()
        for b in bufs:
            if b.elements > MAX_BUFFER_ELEMENTS:
                raise CaseError(b.field, f"buffer {b.name} {list(b.shape)} would have "
                                         f"{b.elements:,} elements, more than int32 indexing "
                                         f"allows ({MAX_BUFFER_ELEMENTS:,})")
        total = sum(b.bytes for b in bufs)
        if total > MAX_CASE_BYTES:
            big = max(bufs, key=lambda b: b.bytes)
            raise CaseError(big.field, f"the case's buffers would need {total / 2**30:.1f} GiB, "
                                       f"more than {MAX_CASE_BYTES / 2**30:.0f} GiB (largest: "
                                       f"{big.name} {list(big.shape)}, "
                                       f"{big.bytes / 2**30:.1f} GiB)")

    # -- validation --------------------------------------------------------------------------

    def validate(self) -> MoECase:
        """Raise `CaseError` naming the first impossible field; return self otherwise.

        A case found valid remembers it (fields are frozen; validity does not depend on
        tensor values), so the runner's repeated checks cost nothing."""
        if self.__dict__.get("_valid"):
            return self

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise CaseError(name, msg)

        for name in ("num_tokens", "num_experts", "topk", "hidden_size", "block_size",
                     "seed", "ep_size", "max_loras"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), name, f"must be an int, got {v!r}")
        T, E, K = self.num_tokens, self.num_experts, self.topk
        need(1 <= T <= MAX_TOKENS, "num_tokens", f"must be in 1..{MAX_TOKENS}, got {T}")
        need(1 <= E <= MAX_EXPERTS, "num_experts", f"must be in 1..{MAX_EXPERTS}, got {E}")
        need(1 <= K <= min(E, MAX_TOPK), "topk",
             f"must be in 1..min(num_experts, {MAX_TOPK}) = {min(E, MAX_TOPK)}, got {K}")
        need(self.scoring in SCORINGS, "scoring",
             f"must be one of {SCORINGS}, got {self.scoring!r}")
        need(self.dtype in TORCH_DTYPES, "dtype",
             f"must be one of {tuple(TORCH_DTYPES)}, got {self.dtype!r}")
        need(1 <= self.hidden_size <= MAX_HIDDEN, "hidden_size",
             f"must be in 1..{MAX_HIDDEN}, got {self.hidden_size}")
        bs = self.block_size
        need(1 <= bs <= 256 and bs & (bs - 1) == 0, "block_size",
             f"must be a power of two in 1..256, got {bs}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(1 <= self.ep_size <= min(MAX_EP, E), "ep_size",
             f"must be in 1..min({MAX_EP}, num_experts), got {self.ep_size}")
        if self.max_tokens_per_rank is not None:
            need(self.tokens_per_rank <= self.max_tokens_per_rank <= MAX_TOKENS,
                 "max_tokens_per_rank",
                 f"must be in ceil(T/ep_size) = {self.tokens_per_rank}..{MAX_TOKENS}, "
                 f"got {self.max_tokens_per_rank}")
        if self.expert_to_rank is not None:
            need(len(self.expert_to_rank) == E, "expert_to_rank", f"must have {E} entries")
            need(all(0 <= r < self.ep_size for r in self.expert_to_rank), "expert_to_rank",
                 f"ranks must be in 0..{self.ep_size - 1}")
        need(0 <= self.max_loras <= MAX_LORAS, "max_loras",
             f"must be in 0..{MAX_LORAS}, got {self.max_loras}")
        if self.adapter_enabled is not None:
            need(len(self.adapter_enabled) == self.max_loras, "adapter_enabled",
                 f"must have max_loras = {self.max_loras} entries, got {len(self.adapter_enabled)}")
        need(self.graph_padding in GRAPH_PADDINGS, "graph_padding",
             f"must be one of {GRAPH_PADDINGS}, got {self.graph_padding!r}")
        self._validate_memory()
        self._validate_sources()
        self._validate_overrides()
        for i, f in enumerate(self.faults):
            name = f"faults[{i}]"
            need(f.boundary in FAULT_TENSORS, name, f"unknown boundary {f.boundary!r}")
            kinds = FAULT_TENSORS[f.boundary]
            need(f.tensor in kinds, name,
                 f"boundary {f.boundary!r} has no tensor {f.tensor!r} (has {sorted(kinds)})")
            need(f.kind in FAULT_KINDS, name, f"unknown kind {f.kind!r}")
            need(not (f.kind in ("nan", "inf") and kinds[f.tensor] == "int"), name,
                 f"{f.kind} cannot be injected into integer tensor {f.tensor!r}")
            need(0.0 <= f.fraction <= 1.0, name, "fraction must be in [0, 1]")
            need(0 <= f.bit < 32, name, "bit must be in 0..31")
            need(f.seed >= 0, name, "seed must be >= 0")
        object.__setattr__(self, "_valid", True)
        return self

    def _validate_sources(self) -> None:
        T, E = self.num_tokens, self.num_experts
        for name, src, shape in (("logits", self.logits, (T, E)),
                                 ("correction_bias", self.correction_bias, (E,))):
            if isinstance(src, torch.Tensor):
                if tuple(src.shape) != shape:
                    raise CaseError(name, f"explicit tensor must have shape {shape}, "
                                          f"got {tuple(src.shape)}")
                if not src.is_floating_point():
                    raise CaseError(name, "explicit tensor must be floating point")
            elif isinstance(src, Generated):
                if src.distribution not in DISTRIBUTIONS:
                    raise CaseError(name, f"distribution must be one of {DISTRIBUTIONS}")
                if not math.isfinite(src.scale):
                    raise CaseError(name, "scale must be finite")
                if src.seed < 0:
                    raise CaseError(name, "seed must be >= 0")
            elif src is not None or name == "logits":
                raise CaseError(name, f"must be a Generated source or a tensor, got {type(src)}")
        for i, p in enumerate(self.patches):
            if p.target not in PATCH_TARGETS:
                raise CaseError(f"patches[{i}]", f"target must be one of {PATCH_TARGETS}")
            if p.target == "correction_bias" and self.correction_bias is None:
                raise CaseError(f"patches[{i}]", "patches correction_bias, which the case lacks")
            if p.kind not in ("cell", "row", "column", "all"):
                raise CaseError(f"patches[{i}]", f"unknown kind {p.kind!r}")
            if isinstance(p.value, str) and p.value not in SPECIAL_VALUES:
                raise CaseError(f"patches[{i}]",
                                f"value must be a float or one of {SPECIAL_VALUES}")
            if p.row < 0 or p.col < 0:
                raise CaseError(f"patches[{i}]", "row and col must be >= 0")

    def _validate_overrides(self) -> None:
        T, K, ep = self.num_tokens, self.topk, self.ep_size
        shapes = {
            "gating_logits": (T, self.num_experts), "topk_ids": (T, K), "topk_weights": (T, K),
            "recv_counters": (ep, ep), "token_lora_mapping": (T,),
            "lora_ids": (self.max_loras + 1,),
        }
        ints = {"topk_ids", "recv_counters", "token_lora_mapping", "lora_ids"}
        for name, t in self.overrides.fields().items():
            where = f"overrides.{name}"
            if tuple(t.shape) != shapes[name]:
                raise CaseError(where, f"must have shape {shapes[name]}, got {tuple(t.shape)}")
            if name in ints and t.dtype != torch.int32:
                raise CaseError(where, f"must be int32, got {t.dtype}")
            if name not in ints and not t.is_floating_point():
                raise CaseError(where, "must be floating point")
        if self.overrides.topk_weights is not None and self.overrides.topk_ids is None:
            raise CaseError("overrides.topk_weights", "needs overrides.topk_ids")
        if self.max_loras == 0 and (self.overrides.lora_ids is not None
                                    or self.overrides.token_lora_mapping is not None):
            raise CaseError("overrides.lora_ids", "LoRA overrides need max_loras >= 1")

    def contract_violations(self) -> list[str]:
        """Why this case is outside the chain's contract (empty for a legal case).

        Legal inputs include NaN/Inf logits: the fixed chain must handle them. Out of contract
        are overrides the previous stage could never produce (ids out of range, duplicate ids,
        recv_counters beyond the buffer, unknown LoRA ids), and a correction bias at or below
        the -10000 the kernels write over a chosen expert (or NaN, -inf): with it even the
        fixed top-k selects an expert twice (`harness.invariants` then does not judge the
        selection).
        """
        out: list[str] = []
        o = self.overrides
        E = self.num_experts
        if self.correction_bias is not None:
            bias = correction_bias(self)
            if not bool((bias > BIAS_FLOOR).all()):  # NaN fails the comparison too
                out.append(f"correction_bias entry NaN, -inf or <= {BIAS_FLOOR:g} (the kernels' "
                           "winner mask): a chosen expert can be selected again")
        if o.topk_ids is not None:
            ids = o.topk_ids
            if bool(((ids < 0) | (ids >= E)).any()):
                out.append("topk_ids outside [0, num_experts)")
            if ids.shape[1] > 1:
                s, _ = ids.sort(dim=1)
                if bool((s[:, 1:] == s[:, :-1]).any()):
                    out.append("duplicate expert ids in a token's topk_ids")
        if o.topk_weights is not None and not bool(torch.isfinite(o.topk_weights).all()):
            out.append("non-finite topk_weights")
        if o.recv_counters is not None:
            rc = o.recv_counters
            if bool(((rc < 0) | (rc > self.recv_slots)).any()):
                out.append("recv_counters outside [0, max_tokens_per_rank]")
            else:
                out.append("recv_counters given directly (may disagree with the routing)")
        if o.token_lora_mapping is not None:
            m = o.token_lora_mapping
            if bool(((m < -1) | (m >= self.max_loras)).any()):
                out.append("token_lora_mapping outside [-1, max_loras)")
        if o.lora_ids is not None:
            m = o.lora_ids
            if bool(((m < -1) | (m >= self.max_loras)).any()):
                out.append("lora_ids outside [-1, max_loras)")
            valid = m[m >= 0]
            if valid.numel() != valid.unique().numel():
                out.append("duplicate lora_ids")
        return out

    @property
    def severity(self) -> str:
        """'fault' with injected faults, 'out-of-contract' with illegal overrides, else 'legal'."""
        if self.faults:
            return "fault"
        return "out-of-contract" if self.contract_violations() else "legal"


# -- materialisation ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Materialized:
    """The concrete CPU tensors of a case, identical for every backend.

    gating_logits [T, E] case dtype; correction_bias [E] fp32 or None; hidden_states [T, H]
    case dtype; expert_weights [E, H, H] fp32; token_lora_mapping [T] int32 (None without
    LoRA); lora_ids [max_loras + 1] int32; adapter_enabled [max_loras + 1] int32 (the extra
    slot 0, as the real kernels allocate it); recv_garbage: int32 values the receive buffer's
    padding slots hold before sanitize, [ep_size, ep_size, max_tokens_per_rank, K].
    """

    gating_logits: torch.Tensor
    correction_bias: torch.Tensor | None
    hidden_states: torch.Tensor
    expert_weights: torch.Tensor
    token_lora_mapping: torch.Tensor | None
    lora_ids: torch.Tensor | None
    adapter_enabled: torch.Tensor | None


def stream_seed(seed: int, name: str) -> int:
    """A per-tensor seed: independent streams for independent tensors of one case."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, name))


def draw(src: Generated, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Draw an fp32 tensor from a `Generated` source."""
    g = generator(src.seed, name)
    if src.distribution == "zeros":
        return torch.zeros(shape)
    if src.distribution == "uniform":
        return (torch.rand(shape, generator=g) * 2 - 1) * src.scale
    x = torch.randn(shape, generator=g)
    if src.scale != 1.0:  # x * 1.0 is x, bit for bit
        x.mul_(src.scale)
    if src.distribution == "quantized":  # coarse values: ties between experts are common
        x = torch.round(x * 2) / 2
    return x


def special_value(value: float | str, dtype: torch.dtype) -> float:
    if not isinstance(value, str):  # any NaN is the quiet NaN "nan": the sign is not kept
        return math.nan if math.isnan(value) else float(value)
    info = torch.finfo(dtype)
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": info.max,
            "denormal": info.smallest_normal / 4, "-0.0": -0.0}[value]


def apply_patches(x: torch.Tensor, patches: list[Patch]) -> torch.Tensor:
    """Apply patches in order to a 1-D or 2-D tensor (a copy is returned)."""
    if not patches:
        return x
    x = x.clone()
    view = x if x.dim() == 2 else x.view(1, -1)
    rows, cols = view.shape
    for p in patches:
        r, c = p.row % rows, p.col % cols
        index = {"cell": (r, c), "row": (r, slice(None)), "column": (slice(None), c),
                 "all": (slice(None), slice(None))}[p.kind]
        if p.value == "tie":
            src = view[:, 0:1].expand(rows, cols)
            view[index] = src[index]
        else:
            # via a tensor: a float beyond the dtype's range rounds to +-inf instead of raising
            view[index] = torch.tensor(special_value(p.value, x.dtype),
                                       dtype=torch.float64).to(x.dtype)
    return x


def _source(case: MoECase, name: str, src: TensorSource, shape: tuple[int, ...],
            dtype: torch.dtype) -> torch.Tensor:
    """A tensor source (explicit or generated) in `dtype`, with the case's patches of `name`."""
    x = src.to(dtype) if isinstance(src, torch.Tensor) else draw(src, shape, name).to(dtype)
    return apply_patches(x, [p for p in case.patches if p.target == name])


def correction_bias(case: MoECase) -> torch.Tensor | None:
    """The case's materialised correction bias [E] fp32 (None without one)."""
    if case.correction_bias is None:
        return None
    return _source(case, "correction_bias", case.correction_bias, (case.num_experts,),
                   torch.float32)


def materialize(case: MoECase) -> Materialized:
    """The case's tensors, on the CPU, bit-identical on every call and for every backend."""
    case.validate()
    T, E, H, dt = case.num_tokens, case.num_experts, case.hidden_size, case.torch_dtype

    def source(name: str, src: TensorSource, shape: tuple[int, ...], dtype: torch.dtype):
        return _source(case, name, src, shape, dtype)

    logits = case.overrides.gating_logits
    if logits is None:
        logits = source("gating_logits", case.logits, (T, E), dt)
    else:
        logits = apply_patches(logits.to(dt), [p for p in case.patches
                                               if p.target == "gating_logits"])
    bias = correction_bias(case)
    hidden = source("hidden_states", Generated(case.seed), (T, H), dt)
    weights = draw(Generated(case.seed, scale=H ** -0.5), (E, H, H), "expert_weights")

    mapping = lora_ids = enabled = None
    if case.max_loras > 0:
        L = case.max_loras
        mapping = case.overrides.token_lora_mapping
        if mapping is None:
            mapping = (torch.randint(-1, L, (T,), generator=generator(case.seed, "lora"))
                       .to(torch.int32))
        lora_ids = case.overrides.lora_ids
        if lora_ids is None:
            lora_ids = active_lora_ids(mapping, L)
        flags = case.adapter_enabled if case.adapter_enabled is not None else (True,) * L
        enabled = torch.tensor([int(f) for f in flags] + [0], dtype=torch.int32)
    return Materialized(logits, bias, hidden, weights, mapping, lora_ids, enabled)


def active_lora_ids(mapping: torch.Tensor, max_loras: int) -> torch.Tensor:
    """[max_loras + 1] int32: the ids present in `mapping` in ascending order (-1, the base
    model, first when present), padded with -1, as the serving engines build it."""
    present = torch.unique(mapping.long())
    present = present[(present >= -1) & (present < max_loras)]
    out = torch.full((max_loras + 1,), -1, dtype=torch.int32)
    out[: present.numel()] = present.to(torch.int32)
    return out


# -- equality ----------------------------------------------------------------------------------


def value_key(v: object) -> tuple:
    """Equality of table values: floats by their bits (-0.0 is not 0.0), every NaN one NaN."""
    if isinstance(v, float):
        return ("nan",) if math.isnan(v) else ("f", struct.pack("<d", v))
    return (type(v).__name__, v)


def _same(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return False
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not x.is_floating_point():
            return bool(torch.equal(x, y))
        same = bits_view(x) == bits_view(y)
        return bool((same | (x.isnan() & y.isnan())).all())
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y, strict=True))
    if dataclasses.is_dataclass(x) and type(x) is type(y):
        return all(_same(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x))
    numbers = (int, float)
    if (isinstance(x, numbers) and isinstance(y, numbers) and not isinstance(x, bool)
            and not isinstance(y, bool) and (isinstance(x, float) or isinstance(y, float))):
        return value_key(float(x)) == value_key(float(y))
    return type(x) is type(y) and x == y


def difference(a: MoECase, b: MoECase) -> str | None:
    """The first field in which two cases differ ("patches[2].value"), None if they are equal
    (tensors bit for bit, every NaN equal to every NaN, -0.0 unequal to 0.0)."""
    def walk(x: object, y: object, where: str) -> str | None:
        if _same(x, y):
            return None
        if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                if (found := walk(u, v, f"{where}[{i}]")) is not None:
                    return found
        elif dataclasses.is_dataclass(x) and type(x) is type(y):
            for f in dataclasses.fields(x):
                found = walk(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
                if found is not None:
                    return found
        return where

    for f in dataclasses.fields(MoECase):
        if (found := walk(getattr(a, f.name), getattr(b, f.name), f.name)) is not None:
            return found
    return None
